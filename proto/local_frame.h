// The framing of the same-host shared-memory fetch (modelstated
// --local_socket): LocalRequest and LocalResponse messages over a Unix stream
// socket, each a 4-byte little-endian length and the serialized message, with
// at most one file descriptor (SCM_RIGHTS) riding on a frame. Both the daemon
// (server/local_transfer.h) and the client (client/local_fetch.h) use it, so
// the two ends cannot disagree on the wire format.
//
// Thread-safety: every function may be called from any thread; one socket is
// used by one thread at a time.
#ifndef MODELSTATE_PROTO_LOCAL_FRAME_H_
#define MODELSTATE_PROTO_LOCAL_FRAME_H_

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "common/limits.h"
#include "google/protobuf/message_lite.h"
#include "modelstate/v1/model_state.pb.h"

namespace modelstate {

// Alignment of each tensor in a shared-memory region.
inline constexpr uint64_t kLocalRegionAlignment = 64;

// Owns a file descriptor and closes it.
class UniqueFd {
 public:
  UniqueFd() = default;
  explicit UniqueFd(int fd) : fd_(fd) {}
  ~UniqueFd() { Reset(); }
  UniqueFd(UniqueFd&& other) noexcept : fd_(other.Release()) {}
  UniqueFd& operator=(UniqueFd&& other) noexcept;
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;

  int get() const { return fd_; }
  bool valid() const { return fd_ >= 0; }
  int Release();
  void Reset();

 private:
  int fd_ = -1;
};

// Where each tensor of `sizes` lies in a region (each at the next multiple
// of kLocalRegionAlignment) and the region's size. InvalidArgument when the
// total overflows.
struct LocalRegionLayout {
  std::vector<uint64_t> offsets;
  uint64_t region_bytes = 0;
};
absl::StatusOr<LocalRegionLayout> LayOutLocalRegion(
    const std::vector<uint64_t>& sizes);

// Gives `socket` send and receive timeouts (an infinite duration clears
// them), so that a peer that stops reading or writing cannot block the caller
// forever.
absl::Status SetSocketTimeouts(int socket, absl::Duration timeout);

// Writes `message` as one frame, with `fd_to_pass` attached when it is not -1.
// Never raises SIGPIPE. Unavailable when the peer went away, DeadlineExceeded
// after the socket's send timeout.
absl::Status WriteLocalFrame(int socket,
                             const google::protobuf::MessageLite& message,
                             int fd_to_pass = -1);

// Reads one frame into `message`; a descriptor that came with it goes to
// `received_fd` (which may be null to refuse descriptors). The length is
// checked against `max_bytes` before anything is allocated for the body.
// Returns OutOfRange for a clean end of stream before the frame's first byte,
// InvalidArgument for a frame larger than `max_bytes`, a message that does not
// parse, more than one descriptor or an unwanted one (all of them are closed),
// Unavailable when the connection breaks mid-frame, DeadlineExceeded after the
// socket's receive timeout (a gap) or when the whole frame has not arrived by
// `deadline`, however steadily its bytes came.
absl::Status ReadLocalFrame(int socket, uint32_t max_bytes,
                            google::protobuf::MessageLite* message,
                            UniqueFd* received_fd,
                            absl::Time deadline = absl::InfiniteFuture());

// Waits until the next frame's first byte (or the end of the stream) can be
// read. Returns OK then, DeadlineExceeded at `deadline` or after the socket's
// receive timeout, whichever comes first, Unavailable when the socket fails.
absl::Status AwaitLocalFrame(int socket, absl::Time deadline);

// LocalStatus <-> absl::Status. A code out of range reads as Unknown; an OK
// code reads as Unknown too, since the daemon only sends errors.
v1::LocalStatus ToLocalStatus(const absl::Status& status);
absl::Status FromLocalStatus(const v1::LocalStatus& status);

}  // namespace modelstate

#endif  // MODELSTATE_PROTO_LOCAL_FRAME_H_

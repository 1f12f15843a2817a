// The daemon's end of the same-host shared-memory fetch (modelstated
// --local_socket; docs/protocol.md): a Unix socket on which a client on the
// same host asks for a state dict and gets its manifest with the descriptor of
// a sealed memfd holding the tensors (an export, store/memfd_export.h), made on
// the first local fetch of those tensors and handed to every later one: no
// byte is copied per fetch, and none goes through TCP. When no export can be
// had (an old client, a memory limit, the export bound), the client hands
// over a memfd of its own and the daemon fills it, one pwrite per tensor.
//
// Immutability: an export is sealed against every change before any client
// sees it, and a client's own region is filled from a snapshot the daemon
// holds for the duration of the request, so a concurrent load never changes
// what a client received.
//
// Memory: exports count as the store's live bytes (so --memory_limit_bytes
// holds; one that would not fit is not made), at most
// LocalTransferOptions::export_bytes of them are kept (least recently used
// dropped first), and each is dropped once its version is neither retained
// nor held, within a second. Clients' mappings keep an export's pages alive
// until they unmap them, outside the daemon's accounting.
//
// Cleanup: each connection's state (the held snapshot, the received
// descriptor) lives on its handler's stack, so a client that dies or stalls
// (the idle timeout) leaves nothing behind once its handler returns.
//
// Hostile peers: whoever can connect is untrusted until a fetch of theirs is
// authorized. Every request frame is bounded (kMaxLocalRequestBytes) before
// anything is allocated for it and must arrive whole within request_timeout
// of its first byte, however steadily its bytes trickle; a connection with no
// authorized fetch is closed authorization_timeout after it was accepted; and
// one uid holds at most max_connections_per_uid of the connection slots. The
// daemon never maps a client's memory: pwrite(2) into a region sealed
// against shrinking cannot fault, whatever the client does to it meanwhile.
//
// Thread-safety: all methods may be called from any thread.
#ifndef MODELSTATE_SERVER_LOCAL_TRANSFER_H_
#define MODELSTATE_SERVER_LOCAL_TRANSFER_H_

#include <sys/types.h>

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "absl/types/optional.h"
#include "proto/local_frame.h"
#include "store/memfd_export.h"
#include "store/model_store.h"
#include "store/requests.h"

namespace modelstate {

// Who is on the other end of a local connection, from SO_PEERCRED.
struct LocalPeer {
  pid_t pid = 0;
  uid_t uid = 0;
  gid_t gid = 0;
};

// Decides whether `peer`, presenting `token` (LocalFetchRequest.token), may
// read what `request` selects. Returns OK to allow, or the error to send
// (PermissionDenied, Unauthenticated).
using LocalAuthorizer =
    std::function<absl::Status(const LocalPeer& peer, const std::string& token,
                               const FetchRequest& request)>;

struct LocalTransferOptions {
  // Path of the Unix socket. An existing socket there is replaced; the new
  // one gets mode `socket_mode`.
  std::string path;
  mode_t socket_mode = 0660;
  // Without one, every peer that can connect may read every model (as on the
  // gRPC port without an auth policy).
  LocalAuthorizer authorize;
  // A connection that sends nothing (or reads nothing) for this long is
  // closed, releasing whatever it held.
  absl::Duration idle_timeout = absl::Seconds(60);
  // A request frame must arrive whole within this of its first byte, so that
  // a peer cannot hold a connection by sending a byte per idle_timeout.
  absl::Duration request_timeout = absl::Seconds(5);
  // A connection on which no fetch has been authorized yet is closed this
  // long after it was accepted, however it spends the time (silence, slow or
  // refused requests): a peer without a valid token cannot keep a slot.
  absl::Duration authorization_timeout = absl::Seconds(10);
  // Connections served at once; more are refused (ResourceExhausted).
  int max_connections = 64;
  // Connections served at once for one peer uid, so that one local user
  // cannot take every slot; more are refused (ResourceExhausted). 0: a
  // quarter of max_connections (at least 1).
  int max_connections_per_uid = 0;
  // Bytes of sealed exports kept for clients that accept them, least
  // recently used dropped first; 0 makes none (every fetch fills the
  // client's region).
  uint64_t export_bytes = uint64_t{4} << 30;
};

class LocalTransferServer {
 public:
  // Binds and listens on `options.path` and starts accepting. `store` must
  // outlive the server. InvalidArgument for a path too long for a Unix socket
  // or bad options, Unavailable when the socket cannot be created.
  static absl::StatusOr<std::unique_ptr<LocalTransferServer>> Start(
      ModelStore* store, LocalTransferOptions options);

  // Stops accepting, ends every connection, waits for their handlers and
  // removes the socket file.
  ~LocalTransferServer();
  LocalTransferServer(const LocalTransferServer&) = delete;
  LocalTransferServer& operator=(const LocalTransferServer&) = delete;

  // Connections being served now.
  int active_connections() const;
  // Fetches served (a region filled, or an export about to be handed over),
  // since start.
  int64_t fetches_served() const;
  // Of those, the ones served with an export.
  int64_t fetches_from_exports() const;
  // Exports kept now, and their bytes.
  size_t exports() const { return exports_.size(); }
  uint64_t export_bytes() const { return exports_.bytes(); }

 private:
  LocalTransferServer(ModelStore* store, LocalTransferOptions options,
                      UniqueFd listener);
  struct Connection {
    int fd = -1;  // -1 once its handler closed it.
    std::thread handler;
  };

  void AcceptLoop();
  // Starts a handler for a new connection, or refuses it (with an error
  // frame) when its peer has no credentials or no slot is free for it.
  void Admit(UniqueFd connection);
  // OK when a connection of `peer` may be served now, ResourceExhausted when
  // max_connections, or max_connections_per_uid of its uid, are.
  absl::Status CheckRoomFor(const LocalPeer& peer) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Joins the handlers that have finished.
  void Reap();
  // Serves one connection until it ends, then closes it.
  void Serve(uint64_t id, int connection, const LocalPeer& peer);
  // Reads the next request frame on `connection`: its first byte by
  // `first_byte_by` (and within the idle timeout), the whole frame by then
  // too and within request_timeout of that byte. The errors of
  // ReadLocalFrame.
  absl::Status ReadRequest(int connection, absl::Time first_byte_by,
                           v1::LocalRequest* request, UniqueFd* received_fd);
  // Answers one request of `peer`; once a fetch is authorized, sets
  // `*unauthorized_until` to the infinite future. A non-OK return means the
  // connection is no longer usable.
  absl::Status Answer(int connection, const LocalPeer& peer,
                      const v1::LocalRequest& request,
                      absl::Time* unauthorized_until);
  // Answers an authorized fetch on `connection`, through to the filled
  // region. A non-OK return means the connection is no longer usable.
  absl::Status ServeFetch(int connection, const FetchRequest& fetch,
                          bool accept_export);
  // An export holding `tensors`, made now (with `offsets` in `size` bytes)
  // when none is kept; nullopt when none can be had.
  absl::optional<ExportCache::Found> ExportFor(
      const std::vector<Tensor>& tensors, const std::vector<uint64_t>& offsets,
      uint64_t size);
  // Counts a fetch served, from an export or not.
  void CountServed(bool from_export);

  ModelStore* const store_;
  const LocalTransferOptions options_;
  const int max_connections_per_uid_;
  UniqueFd listener_;
  UniqueFd wake_;      // An eventfd that stops AcceptLoop.
  UniqueFd exported_;  // An eventfd that tells AcceptLoop of a new export.
  std::thread acceptor_;
  ExportCache exports_;
  // Serialises making exports, so that workers fetching a version at once
  // make one export of it.
  absl::Mutex making_export_mu_;

  mutable absl::Mutex mu_;
  std::map<uint64_t, Connection> connections_ ABSL_GUARDED_BY(mu_);
  uint64_t next_id_ ABSL_GUARDED_BY(mu_) = 0;
  int active_ ABSL_GUARDED_BY(mu_) = 0;
  std::map<uid_t, int> active_per_uid_ ABSL_GUARDED_BY(mu_);
  int64_t fetches_served_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t fetches_from_exports_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace modelstate

#endif  // MODELSTATE_SERVER_LOCAL_TRANSFER_H_

// modelstate::Client: a thin C++ client of the modelstate.v1.ModelState
// service.
//
// Every call returns absl::Status / absl::StatusOr with the server's gRPC code
// and message. Thread-safety: a Client may be used from several threads at once
// (one channel, many calls).
#ifndef MODELSTATE_CLIENT_CLIENT_H_
#define MODELSTATE_CLIENT_CLIENT_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "absl/types/optional.h"
#include "model/state_dict.h"
#include "model/tensor.h"
#include "modelstate/v1/model_state.grpc.pb.h"
#include "store/requests.h"
#include "transfer/transfer.h"

namespace modelstate {

struct ClientOptions {
  // TLS: set `use_tls` (system roots) or a CA file; a cert and key add a client
  // certificate (mTLS).
  bool use_tls = false;
  std::string tls_ca_file;
  std::string tls_cert_file;
  std::string tls_key_file;
  // Name to verify the server certificate against, when it differs from the
  // target's host.
  std::string tls_server_name;
  // Deadline of each call; infinite by default since transfers can be long.
  absl::Duration timeout = absl::InfiniteDuration();
  // Open a TCP connection of this client's own instead of sharing one with
  // other clients of the same target in this process (gRPC's global subchannel
  // pool). Parallel fetchers in one process want this.
  bool own_connection = false;
  // gRPC load-balancing policy, e.g. "round_robin" to spread calls over every
  // address the target resolves to (a headless Service behind dns:///, or
  // "ipv4:10.0.0.1:50551,10.0.0.2:50551"); empty for gRPC's default
  // (pick_first).
  std::string load_balancing_policy;
  // When positive, the HTTP/2 flow-control window of each stream is fixed at
  // this many bytes instead of grown by gRPC's bandwidth probing: memory-lean
  // receivers (modelstatectl fetch) hold at most this much in flight. 0 keeps
  // gRPC's adaptive window, the fastest on long fat links.
  uint32_t receive_window_bytes = 0;
  // Bearer token sent with every call as "authorization: Bearer <token>"
  // metadata, for a server with an auth policy; empty for none. Plain
  // metadata rather than gRPC call credentials, which refuse plaintext
  // channels: over plaintext the token is readable on the wire, so use TLS
  // beyond loopback.
  std::string token;
  // Same-host shared-memory fetch (docs/protocol.md): the daemon's
  // --local_socket path. When set, and by default for a "unix:PATH" target
  // (then PATH.local), Fetch and FetchInto fetch through shared memory
  // instead of TCP, and through gRPC when nothing listens there. A canceller
  // is checked before and after such a fetch, not during it.
  std::string local_socket;
  // HTTP/2 keepalive, so that a server that went silent without closing (a
  // partitioned network, a hung host) fails the calls on its connection with
  // Unavailable instead of hanging them: when finite, the client pings every
  // `keepalive_time`, with or without calls in flight, and drops the
  // connection when no answer comes within `keepalive_timeout`. Pair it with
  // the server: modelstated takes pings at most every
  // --keepalive_min_ping_interval (10 s by default) and closes the connection
  // of a client that pings more often (GOAWAY, ENHANCE_YOUR_CALM), so
  // keepalive_time must be at least that. Infinite (the default): no pings.
  // Both must be positive.
  absl::Duration keepalive_time = absl::InfiniteDuration();
  absl::Duration keepalive_timeout = absl::Seconds(20);
  // The longest gRPC waits between attempts to reconnect a channel whose
  // connection failed or dropped: its backoff starts at the smaller of 1 s and
  // this and grows to this, and an attempt may take the larger of this and
  // 2 s before it counts as failed. Infinite (the default) keeps gRPC's own
  // (1 s growing to 120 s, 20 s per attempt), after which a server back from a
  // long absence may wait minutes for a client that has calls to make (a
  // follower). Must be positive.
  absl::Duration max_reconnect_backoff = absl::InfiniteDuration();
  // Verify every checksum of a shared-memory fetch that maps the daemon's
  // sealed export (zero copy), as every other fetch does. Off by default: the
  // daemon verified the export when it made it, nothing can change it since,
  // and hashing would cost more than the fetch (about 0.1 s per GiB).
  bool verify_shared_memory = false;
};

// Called with (bytes done, bytes in all) as a transfer advances.
using ProgressCallback = std::function<void(uint64_t, uint64_t)>;

// Stops calls in flight from another thread, e.g. when a user presses Ctrl-C
// while a transfer runs. A cancelled call returns Cancelled; a load cancelled
// before its end leaves the server's model unchanged. Cancelling is final: a
// call started with a canceller that was already cancelled fails at once.
// Thread-safe.
class CallCanceller {
 public:
  CallCanceller() = default;
  CallCanceller(const CallCanceller&) = delete;
  CallCanceller& operator=(const CallCanceller&) = delete;

  // Cancels every call currently attached and every call attached later.
  void Cancel();
  bool cancelled() const;

 private:
  friend class CancelScope;
  // Attaches `context` (a call about to start); cancels it at once when this
  // canceller already was.
  void Attach(grpc::ClientContext* context);
  void Detach(grpc::ClientContext* context);

  mutable absl::Mutex mu_;
  bool cancelled_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<grpc::ClientContext*> contexts_ ABSL_GUARDED_BY(mu_);
};

// How a state dict travels; what it selects is the FetchRequest or
// LoadRequest (store/requests.h).
struct TransferOptions {
  // Bytes per data chunk, at most kMaxChunkBytes; 0: the server's default for
  // fetches, kDefaultChunkBytes for loads.
  uint32_t chunk_bytes = 0;
  ProgressCallback progress;
  // FetchStreaming and FetchToWriter only: called once with the
  // stream's manifest (names, kinds, dtypes and shapes as delivered, after
  // selection and casting), before any tensor. Returning an error stops the
  // transfer with that error.
  std::function<absl::Status(const std::vector<TensorDescription>&)>
      on_manifest;
  // When set, another thread may stop the transfer through it. Must outlive
  // the call.
  CallCanceller* canceller = nullptr;
  // Fetches: when the connection drops mid-stream (Unavailable after the
  // manifest), the fetch resumes from the bytes received so far, of the
  // version the first manifest named; when it drops before the manifest was
  // read (the channel had a connection and lost it), the call is opened
  // again. At most this many times in all (0: never). Resumes share the
  // call's deadline and back off from 50 ms to 1 s. An Unavailable from the
  // server itself is not resumed; telling it from a drop makes such an answer
  // up to 20 ms later.
  int max_resumes = 8;
  // Fetch only: how the received tensors are laid out (transfer/transfer.h).
  // By default tensors under 64 KiB share blocks of up to 2 MiB;
  // kOwnStorage gives each its own, for a holder that keeps a few of many
  // tensors for long (a follower daemon, whose versions share the tensors a
  // load left unchanged).
  TensorPacking packing = TensorPacking::kPackSmall;
};

// Caller-owned memory that FetchInto fills: one state-dict entry, laid
// out as a C-contiguous tensor of `dtype` and `shape` (NumBytes(dtype, shape)
// writable bytes at `data`, no alignment needed). Several destinations may
// name the same memory (torch's tied weights).
struct Destination {
  std::string key;  // As the fetch emits it (see FetchRequest).
  DType dtype = DType::kFloat32;
  Shape shape;
  void* data = nullptr;
};

// Chooses the destinations of a fetch once its manifest is known (the
// tensors in the order they will arrive), e.g. by allocating fresh memory for
// each. Returning an error ends the fetch with it, before any byte is written.
using DestinationAllocator =
    std::function<absl::StatusOr<std::vector<Destination>>(
        const std::vector<TensorDescription>& tensors)>;

// What FetchInto may do to the caller's memory when the fetch fails.
struct IntoOptions {
  // false (the default), verify then copy: every tensor is received into a
  // staging buffer and verified, and destinations are written only once the
  // stream ended intact, so a failed fetch leaves every destination untouched.
  // Cost: the fetched bytes (in the server's dtypes) are held once more, in
  // full, until the copy.
  //
  // true, write in place: bytes go from the received messages straight into
  // the destinations (cast element by element when the dtypes differ) and
  // each checksum is verified as the tensor's last byte lands. No staging, one
  // copy; but a fetch that fails midway leaves the destinations listed in
  // `written_keys` partly or wholly overwritten (the one whose checksum
  // failed included).
  bool allow_partial_write = false;
  // When set, receives the keys whose destination memory was written, in
  // manifest order: every key on success; on failure none in the default mode
  // and those touched so far with allow_partial_write.
  std::vector<std::string>* written_keys = nullptr;
};

struct FetchedStateDict {
  std::string model;
  int64_t version = 0;
  StateDict state;  // Keys in torch's order; every tensor's checksum verified.
};

// The bearer token in the file at `path`, surrounding whitespace stripped:
// how modelstatectl --token_file and modelstated --follow_token_file read one.
// A regular file that group or others may write is refused with
// FailedPrecondition naming the path and its mode (anyone could swap the
// token); one that they may read is read, and `*warning` (when given) is set to
// a line saying so, as ssh warns about a key file, for the caller to print
// (otherwise it is cleared). Other files (a pipe, /dev/stdin) are not checked.
// Also the file's read error, or InvalidArgument if it holds no token.
absl::StatusOr<std::string> ReadTokenFile(const std::string& path,
                                          std::string* warning = nullptr);

class Client {
 public:
  // Creates a client for `target` ("host:port", "dns:///name:port", ...). Does
  // not wait for the connection. Returns InvalidArgument for unreadable TLS
  // files or a token with whitespace or control characters.
  static absl::StatusOr<std::unique_ptr<Client>> Connect(
      const std::string& target, const ClientOptions& options = {});

  // Returns every model, ordered by name.
  absl::StatusOr<std::vector<ModelSummary>> ListModels();

  // Returns a model's manifest (of one submodule when `module` is set).
  // NotFound if unknown. With `min_version` > 0 the server first waits (up to
  // the call's deadline, or its --max_version_wait) until the model is at that
  // version or later, and answers Unavailable if it does not get there: try
  // another replica.
  absl::StatusOr<ModelManifest> GetModel(const std::string& model,
                                         const std::string& module = "",
                                         int64_t version = 0,
                                         int64_t min_version = 0);

  // Makes retained version `version` current again as a new version; returns
  // the model's summary at that new version. NotFound if the version is not
  // retained.
  absl::StatusOr<ModelSummary> RollbackModel(const std::string& model,
                                             int64_t version);

  // Creates a model from an architecture spec. AlreadyExists if the name is
  // taken.
  absl::StatusOr<ModelSummary> CreateModel(const std::string& model,
                                           const std::string& architecture_json,
                                           uint64_t seed = 0);

  absl::Status DeleteModel(const std::string& model);

  // Fetches a state dict. Each tensor is written once, in place, and its
  // checksum verified (DataLoss otherwise). A stream cut short is resumed
  // (TransferOptions::max_resumes) from the byte it reached, of the same
  // version; NotFound if the server no longer retains that version, Aborted if
  // its manifest changed, Unavailable once the resumes are spent. Never a
  // partial result. `request.offset` must be 0 (resumes set it).
  // Unless TransferOptions::packing says otherwise, tensors under 64 KiB lie
  // in shared blocks of up to 2 MiB, each at a 64-byte boundary: one
  // allocation per block rather than per tensor. A block is freed with the
  // last of its tensors; a caller keeping a few small tensors of many keeps
  // their blocks (FetchStreaming gives every tensor its own storage).
  absl::StatusOr<FetchedStateDict> Fetch(const FetchRequest& request,
                                         const TransferOptions& transfer = {});

  // Fetches a state dict tensor by tensor: `on_tensor` gets each one as soon as
  // it is complete and verified, and the client keeps no reference to it
  // afterwards, so a worker can copy into its own buffers while at most one
  // tensor of ours is alive. Returns the version fetched, or the first error
  // (including the callback's).
  absl::StatusOr<int64_t> FetchStreaming(
      const FetchRequest& request, const TransferOptions& transfer,
      const std::function<absl::Status(const TensorDescription&, Tensor)>&
          on_tensor);

  // Where FetchToWriter puts each piece of the stream: `piece` goes
  // `offset` bytes into tensor `index` of the manifest (as
  // TransferOptions::on_manifest describes it). Its bytes are valid only
  // during the call.
  using PieceWriter = std::function<absl::Status(size_t index, uint64_t offset,
                                                 absl::string_view piece)>;

  // Fetches a state dict into storage of the caller's (a file, a device) as
  // its bytes arrive: `write` gets every piece of every tensor in stream
  // order, straight from the received messages, and the client keeps none of
  // them. Each tensor's checksum is computed as its pieces pass and checked
  // once its last piece was written (DataLoss otherwise): what was written is
  // unverified until the call returns OK, so publish nothing before then
  // (modelstatectl fetch writes a temporary file and renames it). Tensors
  // without bytes get no piece. Always over gRPC, never through shared
  // memory. Resumes after a dropped connection as Fetch does, continuing
  // at the next unwritten byte. Returns the version fetched, or the first
  // error: `write`'s and on_manifest's come back as they are (never resumed,
  // never taken for a bad stream).
  absl::StatusOr<int64_t> FetchToWriter(const FetchRequest& request,
                                        const TransferOptions& transfer,
                                        const PieceWriter& write);

  // Fetches a state dict into the caller's memory (the worker's in-place
  // refresh): each fetched key goes to the destination of the same name, cast
  // as torch's copy_ does when the destination's dtype differs. Returns the
  // version fetched.
  //
  // Before any byte is written (whatever the mode), returns:
  // - InvalidArgument for duplicate destination keys, a destination without
  //   memory, or a bad shape;
  // - FailedPrecondition, naming the keys, when the fetched keys and the
  //   destinations' keys differ (use `request.keys` to fetch a subset) or a
  //   shape differs (torch's "size mismatch for ..." text);
  // - the fetch's own errors (NotFound for an unknown model, module or key,
  //   InvalidArgument for a bad dtype cast).
  // During the transfer: DataLoss for a failed checksum or a malformed stream,
  // Unavailable when the connection drops, Cancelled through the canceller.
  // What a failure leaves in the destinations is `into`'s choice.
  absl::StatusOr<int64_t> FetchInto(
      const FetchRequest& request, const std::vector<Destination>& destinations,
      const TransferOptions& transfer = {}, const IntoOptions& into = {});

  // As above, but the destinations come from `allocate`, called once with the
  // manifest before any data (on the calling thread). They are matched to the
  // fetched tensors by key; fetched keys without a destination are received,
  // verified and dropped, while a destination whose key is not fetched, or
  // whose shape differs, is FailedPrecondition. The destinations' memory must
  // stay valid until the call returns.
  absl::StatusOr<int64_t> FetchInto(const FetchRequest& request,
                                    const DestinationAllocator& allocate,
                                    const TransferOptions& transfer = {},
                                    const IntoOptions& into = {});

  // Loads `state` into `request.model` (torch's load_state_dict); all or
  // nothing on the server. Strict-key and shape errors are FailedPrecondition
  // with torch's text; Aborted when `expected_version` differs.
  absl::StatusOr<LoadOutcome> Load(const LoadRequest& request,
                                   const modelstate::StateDict& state,
                                   const TransferOptions& transfer = {});

  // Delivers the model's events to `on_event` until it returns false or the
  // server ends the stream. Returns OK when `on_event` stopped it, otherwise
  // the stream's status.
  // The first event is kCurrent or kAbsent.
  // With `canceller`, another thread may end the watch (Cancelled).
  // With `min_version` > 0 the first event waits until the model is at that
  // version or later (then it is kCurrent); Unavailable if it does not get
  // there within the call's deadline or the server's --max_version_wait.
  absl::Status Watch(const std::string& model,
                     const std::function<bool(const ModelEvent&)>& on_event,
                     CallCanceller* canceller = nullptr,
                     int64_t min_version = 0);

  // Delivers the events of every model to `on_event`, as Watch does: first
  // kCurrent for each model, then kListed, then kCreated, kUpdated and
  // kDeleted of any model (intermediate updates of a model may be skipped,
  // never its newest). What followers use.
  absl::Status WatchAll(const std::function<bool(const ModelEvent&)>& on_event,
                        CallCanceller* canceller = nullptr);

  // Asks grpc.health.v1 about `service` ("" for the whole server). Returns true
  // for SERVING, false for NOT_SERVING, or the call's error (NotFound for an
  // unknown service).
  absl::StatusOr<bool> CheckHealth(const std::string& service = "");

  // Older names, kept for existing callers.
  absl::StatusOr<FetchedStateDict> StateDict(
      const FetchRequest& request, const TransferOptions& transfer = {}) {
    return Fetch(request, transfer);
  }
  absl::StatusOr<int64_t> StateDictStreaming(
      const FetchRequest& request, const TransferOptions& transfer,
      const std::function<absl::Status(const TensorDescription&, Tensor)>&
          on_tensor) {
    return FetchStreaming(request, transfer, on_tensor);
  }
  absl::StatusOr<int64_t> StateDictToWriter(const FetchRequest& request,
                                            const TransferOptions& transfer,
                                            const PieceWriter& write) {
    return FetchToWriter(request, transfer, write);
  }
  absl::StatusOr<int64_t> StateDictInto(
      const FetchRequest& request, const std::vector<Destination>& destinations,
      const TransferOptions& transfer = {}, const IntoOptions& into = {}) {
    return FetchInto(request, destinations, transfer, into);
  }
  absl::StatusOr<int64_t> StateDictInto(const FetchRequest& request,
                                        const DestinationAllocator& allocate,
                                        const TransferOptions& transfer = {},
                                        const IntoOptions& into = {}) {
    return FetchInto(request, allocate, transfer, into);
  }
  absl::StatusOr<LoadOutcome> LoadStateDict(
      const LoadRequest& request, const modelstate::StateDict& state,
      const TransferOptions& transfer = {}) {
    return Load(request, state, transfer);
  }

  // The channel, for other services such as reflection.
  const std::shared_ptr<grpc::Channel>& channel() const { return channel_; }

 private:
  Client(std::shared_ptr<grpc::Channel> channel, ClientOptions options);
  void Prepare(grpc::ClientContext* context) const;
  // The deadline of a call starting now (InfiniteFuture without a timeout).
  absl::Time Deadline() const;
  absl::Status WatchWith(const v1::WatchModelRequest& request,
                         const std::function<bool(const ModelEvent&)>& on_event,
                         CallCanceller* canceller);

  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::ModelState::Stub> stub_;
  ClientOptions options_;
};

}  // namespace modelstate

#endif  // MODELSTATE_CLIENT_CLIENT_H_

// The modelstated server: a ModelStore served over gRPC, with health,
// reflection and TLS.
//
// Thread-safety: Wait() and Shutdown() may be called from different threads.
#ifndef MODELSTATE_SERVER_SERVER_H_
#define MODELSTATE_SERVER_SERVER_H_

#include <cstdint>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "access/access_gate.h"
#include "access/audit_log.h"
#include "access/policy_file.h"
#include "client/client.h"
#include "common/limits.h"
#include "grpcpp/generic/async_generic_service.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/server.h"
#include "grpcpp/server_builder.h"
#include "prometheus/exposer.h"
#include "server/connection_gate.h"
#include "server/follower_upstream.h"
#include "server/grpc_credentials.h"
#include "server/local_transfer.h"
#include "server/memory_release.h"
#include "server/metrics.h"
#include "server/model_state_service.h"
#include "server/rpc_log.h"
#include "store/data_dir.h"
#include "store/follower.h"
#include "store/lineage.h"
#include "store/model_store.h"

namespace modelstate {

// The port modelstated listens on by default.
inline constexpr int kDefaultPort = 50551;

struct ServerOptions {
  // host:port; port 0 picks a free port (see Server::port()).
  std::string listen = "127.0.0.1:" + std::to_string(kDefaultPort);
  // Models to load before reporting SERVING: name -> .safetensors or
  // architecture .json path.
  std::vector<std::pair<std::string, std::string>> preload;
  // Name of the built-in demo model to create at start; empty for none.
  std::string demo_model;
  uint32_t chunk_bytes = kDefaultChunkBytes;
  int64_t memory_limit_bytes = 0;  // 0: unlimited.
  // Loads in flight at once (each holds staging memory); 0: unlimited.
  int max_pending_loads = 16;
  // Load streams that send nothing and fetches whose client reads nothing
  // for this long are ended; infinite disables it.
  absl::Duration stream_idle_timeout = absl::Seconds(60);
  // PEM files. With cert and key the port uses TLS; with a client CA too,
  // clients must present a certificate it signed (mTLS).
  std::string tls_cert_file;
  std::string tls_key_file;
  std::string tls_client_ca_file;
  // A second, plaintext port that serves only grpc.health.v1 (for probes when
  // the main port requires mTLS); empty for none.
  std::string health_listen;
  // host:port of a plaintext HTTP listener serving Prometheus metrics at
  // /metrics; port 0 picks a free port; empty for none. It asks for no
  // credentials.
  std::string metrics_listen;
  // Label the per-model metrics with each model's name; false leaves those
  // series out, so that a scrape names no model (Metrics::SetModelLabels).
  bool metrics_model_labels = true;
  bool log_rpcs = true;
  // Directory where every committed version is persisted and from which models
  // are restored at start; empty keeps state in memory only.
  std::string data_dir;
  // With data_dir: true makes a load return only once its version is durable;
  // false writes in the background (newest version per model, superseded ones
  // skipped).
  bool sync_durability = true;
  // Versions kept in memory per model (and on disk with data_dir), for
  // snapshots of older versions and rollback.
  int retain_versions = 1;

  // Consistent reads: a read with min_version waits at most this long for the
  // model to reach it (less when the client's deadline is nearer).
  absl::Duration max_version_wait = absl::Seconds(60);
  // --- Authentication and authorization (docs/operations.md) ---
  // JSON access policy (access/access_policy.h); empty: no policy, every caller
  // may do everything.
  std::string auth_policy_file;
  // How often the policy file is checked for changes (it is also re-read by
  // Server::ReloadAuthPolicy, on SIGHUP); infinite: never.
  absl::Duration auth_policy_poll_interval = absl::Seconds(5);
  // One line per write (principal, model, version, bytes): "-" for stderr, a
  // path to append to, or empty for none.
  std::string audit_log;
  // Serve gRPC server reflection on the main port.
  bool reflection = true;
  // Same-host shared-memory fetch (server/local_transfer.h):
  // path of a Unix socket (mode 0660) serving it; empty for none.
  std::string local_socket;
  // Per-model check of local fetches; unset: the auth policy's check of the
  // request's token when there is a policy, otherwise every peer that can
  // connect to the socket may read every model.
  LocalAuthorizer local_authorize;
  // Bytes of sealed exports the local socket keeps (LocalTransferOptions).
  uint64_t local_export_bytes = LocalTransferOptions().export_bytes;
  // Connections one peer uid may hold on the local socket at once
  // (LocalTransferOptions::max_connections_per_uid); 0: a quarter of them.
  int local_max_connections_per_uid = 0;
  // Connection limits (docs/operations.md). Clients may ping at
  // most every keepalive_min_ping_interval (with or without calls in flight);
  // after keepalive_max_ping_strikes pings that come sooner the connection is
  // closed with GOAWAY (ENHANCE_YOUR_CALM), 0 bearing any number. The server
  // pings each connection every keepalive_time and closes it if no answer
  // comes within keepalive_timeout, so dead peers release their streams.
  // Connections without calls for max_connection_idle are closed (clients
  // reconnect on their next call); infinite keeps them.
  absl::Duration keepalive_min_ping_interval = absl::Seconds(10);
  int keepalive_max_ping_strikes = 2;
  absl::Duration keepalive_time = absl::Minutes(1);
  absl::Duration keepalive_timeout = absl::Seconds(20);
  absl::Duration max_connection_idle = absl::Minutes(30);
  // Connections open at once on the main port (lowered to three quarters of
  // the open-file limit); past it the oldest connection without an admitted
  // call is closed for the new one, or the new one is refused.
  int max_connections = 4096;
  // A connection on which no call was admitted (authenticated; any call
  // without an auth policy) within this long is closed.
  absl::Duration unauthenticated_connection_timeout = absl::Seconds(10);
  // HTTP/2 streams one connection may have open at once.
  int max_concurrent_streams = 64;
  // Memory gRPC may hold for the main port's connections (receive buffers);
  // past it gRPC cancels streams (RST_STREAM ENHANCE_YOUR_CALM).
  int64_t grpc_memory_bytes = int64_t{512} << 20;
  // Load chunks below this that do not end their stream are refused, and a
  // fetch's chunk_bytes below it is raised to it; 0 disables it.
  uint32_t min_chunk_bytes = kDefaultMinChunkBytes;
  // How often memory freed after bursts goes back to the operating system
  // (server/memory_release.h); zero or infinite never.
  absl::Duration release_memory_interval = absl::Seconds(10);
  // Follower mode (docs/design.md, "Replication"). With `follow` (a gRPC
  // target of another modelstated, primary or follower), this server mirrors
  // every model of it with its version numbers, refuses writes with
  // FAILED_PRECONDITION, and reports NOT_SERVING until its first full sync.
  // No demo model; preloads are refused.
  std::string follow;
  // How to reach `follow`: TLS files, credentials (`timeout` is ignored).
  ClientOptions follow_client;
  // Waits between attempts to reach an unavailable upstream double up to
  // this, and so do gRPC's between attempts to reconnect to it.
  absl::Duration follow_max_backoff = absl::Seconds(10);
  // Which other epoch (another history of the primary, store/lineage.h) the
  // follower may take on, replacing what it holds; by default none, and it
  // keeps serving what it holds.
  EpochAdoption adopt_epoch;
  // A primary's: start a new epoch even if the data dir kept one (after
  // restoring the data dir from a backup, say). Refused with `follow`.
  bool new_epoch = false;
  // A follower of an upstream that authenticates (it is given credentials
  // for it, or refuses an unauthenticated ListModels at start) must have an
  // auth_policy_file of its own, so that it serves no more openly than its
  // upstream; true lets it start without one and serve every model it
  // mirrors to every caller. Ignored with an auth_policy_file.
  bool follow_open_reads = false;
};

// True when `listen` ("host:port") only accepts connections from this host.
bool IsLoopbackListen(const std::string& listen);

class Server {
 public:
  // Starts serving: listens, reports NOT_SERVING while the demo and preload
  // models are loaded, then SERVING. Returns InvalidArgument for bad options,
  // the preload's error for a model that does not load, or Unavailable if the
  // address cannot be bound.
  static absl::StatusOr<std::unique_ptr<Server>> BuildAndStart(
      ServerOptions options);

  ~Server();

  // The bound port of the main listener.
  int port() const { return port_; }
  // The bound port of the health-only listener, or 0.
  int health_port() const { return health_port_; }
  // The bound port of the metrics listener, or 0.
  int metrics_port() const { return metrics_port_; }
  ModelStore& store() { return *store_; }
  // The main port's connections (see ConnectionGate).
  ConnectionGate::Counts connection_counts() const {
    return gate_ ? gate_->counts() : ConnectionGate::Counts{};
  }
  // False while the main port cannot accept (out of descriptors).
  bool accepting() const { return gate_ == nullptr || gate_->accepting(); }
  // Marks the connection of `peer` as having an admitted call.
  void AdmitConnection(absl::string_view peer) {
    if (gate_) gate_->Admit(peer);
  }
  ModelStateService& service() { return *service_; }

  // Re-reads the auth policy file (SIGHUP). On error the previous policy stays
  // in force and the error is returned; FailedPrecondition without a policy.
  absl::Status ReloadAuthPolicy();
  // The shared-memory side channel, or null without local_socket.
  LocalTransferServer* local_transfer() { return local_.get(); }
  // The follower (follower mode), or null.
  const Follower* follower() const { return follower_.get(); }

  // Blocks until the server has shut down.
  void Wait();

  // Graceful stop: health goes NOT_SERVING, watch streams end, transfers in
  // flight get `grace` to finish, then whatever is left is cancelled.
  // Idempotent.
  void Shutdown(absl::Duration grace);

 private:
  Server() = default;
  // Opens the data directory (when set) and creates the store and service.
  absl::Status OpenStore(const ServerOptions& options);
  // Opens the auth policy and audit log, when asked for.
  absl::Status OpenPolicyAndAuditLog(const ServerOptions& options);
  // The main port's credentials: with a policy, calls are first judged from
  // their headers (CheckHeaders).
  std::shared_ptr<grpc::ServerCredentials> CheckingCallHeaders(
      const ServerOptions& options,
      std::shared_ptr<grpc::ServerCredentials> credentials);
  // Starts the shared-memory side channel, when asked for.
  absl::Status ServeLocalTransfer(const ServerOptions& options);
  // Loads the demo model and preloads (store/startup.h), logging its notes.
  absl::Status LoadStartupModels(const ServerOptions& options);
  // Starts the metrics listener, when asked for; `model_labels` as
  // ServerOptions::metrics_model_labels.
  absl::Status ServeMetrics(const std::string& listen, bool model_labels);
  // Follower mode: connects the upstream and makes the follower (not yet
  // running).
  absl::Status PrepareFollower(const ServerOptions& options);
  // Follower mode: runs the follower on a thread of its own; health turns
  // SERVING after its first full sync.
  void StartFollower();
  // A gate on `listen` whose accepting state drives health.
  absl::StatusOr<std::unique_ptr<ConnectionGate>> OpenGate(
      const std::string& listen, int max_connections,
      const ServerOptions& options);
  // Whether a call may go on, from its headers alone (server/header_check.h):
  // the access gate's AccessGate::CheckHeaders, as a gRPC status.
  grpc::Status CheckHeaders(const std::string& method,
                            const std::vector<std::string>& authorization,
                            const grpc::AuthContext* peer);
  // One RPC log line (and an audit line, for a write) of a call that
  // CheckHeaders refused.
  void LogRefusedCall(const std::string& method, const grpc::Status& status);
  // Health turns SERVING once the models are in (and while the main port
  // can accept).
  void MarkReady();
  void OnAcceptingChanged(bool accepting);
  // Adds `listen` to `builder`: a TCP address through a gate of its own
  // (`gate`, with its `acceptor`; started once the server is built), a Unix
  // socket as gRPC's own port. Sets `port` (a Unix socket's only once built).
  absl::Status AddPort(
      const std::string& listen, int max_connections,
      const ServerOptions& options,
      const std::shared_ptr<grpc::ServerCredentials>& credentials,
      grpc::ServerBuilder& builder, std::unique_ptr<ConnectionGate>& gate,
      std::unique_ptr<grpc::experimental::ExternalConnectionAcceptor>& acceptor,
      int& port);
  // Starts the main and health listeners.
  absl::Status Listen(
      const ServerOptions& options,
      const std::shared_ptr<grpc::ServerCredentials>& credentials);

  std::unique_ptr<MemoryReleaser> memory_releaser_;
  std::unique_ptr<DataDir> data_dir_;
  std::unique_ptr<AsyncPersister> async_;
  std::unique_ptr<ModelStore> store_;
  std::unique_ptr<Metrics> metrics_;
  // Before service_, which uses them.
  std::unique_ptr<PolicyFile> policy_file_;
  std::unique_ptr<AuditLog> audit_;
  std::unique_ptr<AccessGate> access_gate_;
  std::unique_ptr<ModelStateService> service_;
  std::unique_ptr<GrpcUpstream> upstream_;
  std::unique_ptr<Follower> follower_;
  std::thread follower_thread_;
  // The exposer holds collectables weakly; this keeps the follower's alive.
  std::shared_ptr<prometheus::Collectable> follower_metrics_;
  std::shared_ptr<prometheus::Collectable> connection_metrics_;
  std::unique_ptr<grpc::Server> server_;
  grpc::CallbackGenericService health_unimplemented_;
  std::unique_ptr<grpc::Server> health_server_;
  // Accept connections for server_ and health_server_; after them, so that
  // they stop handing over connections before the servers go.
  std::unique_ptr<grpc::experimental::ExternalConnectionAcceptor> acceptor_;
  std::unique_ptr<grpc::experimental::ExternalConnectionAcceptor>
      health_acceptor_;
  std::unique_ptr<ConnectionGate> gate_;
  std::unique_ptr<ConnectionGate> health_gate_;
  // Uses store_, so it is declared (and destroyed) after it.
  std::unique_ptr<LocalTransferServer> local_;
  int port_ = 0;
  int health_port_ = 0;
  int metrics_port_ = 0;
  // Declared last: it scrapes the store and metrics, so it goes first.
  std::unique_ptr<prometheus::Exposer> exposer_;
  absl::Mutex shutdown_mu_;
  bool shut_down_ ABSL_GUARDED_BY(shutdown_mu_) = false;
  bool ready_ ABSL_GUARDED_BY(shutdown_mu_) = false;
  // Calls refused from their headers that get log lines, a second.
  static constexpr int kLoggedRefusalsPerSecond = 20;
  LogRateLimit refused_log_limit_{kLoggedRefusalsPerSecond};
  bool accepting_ ABSL_GUARDED_BY(shutdown_mu_) = true;
};

}  // namespace modelstate

#endif  // MODELSTATE_SERVER_SERVER_H_

#include "server/server.h"

#include <algorithm>
#include <climits>
#include <cstdio>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "common/file_util.h"
#include "common/status_macros.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/health_check_service_interface.h"
#include "grpcpp/impl/server_builder_option.h"
#include "grpcpp/resource_quota.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/server_builder.h"
#include "proto/grpc_status.h"
#include "server/header_check.h"
#include "server/rpc_log.h"
#include "store/startup.h"

namespace modelstate {
namespace {

// How long connections stay open after the last call of a graceful stop (see
// Server::Shutdown).
const absl::Duration kShutdownLinger = absl::Seconds(1);

// Connections the health-only port keeps open at once, and the memory its
// gRPC may hold for them (a probe's request is a few bytes).
constexpr int kHealthConnections = 64;
constexpr size_t kHealthGrpcMemoryBytes = 16 << 20;

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> Credentials(
    const ServerOptions& options) {
  if (options.tls_cert_file.empty() && options.tls_key_file.empty()) {
    if (!options.tls_client_ca_file.empty()) {
      return absl::InvalidArgumentError(
          "--tls_client_ca needs --tls_cert and --tls_key");
    }
    return grpc::InsecureServerCredentials();
  }
  if (options.tls_cert_file.empty() || options.tls_key_file.empty()) {
    return absl::InvalidArgumentError(
        "TLS needs both --tls_cert and --tls_key");
  }
  grpc::SslServerCredentialsOptions ssl;
  ASSIGN_OR_RETURN(std::string cert, ReadFileToString(options.tls_cert_file));
  ASSIGN_OR_RETURN(std::string key, ReadFileToString(options.tls_key_file));
  ssl.pem_key_cert_pairs.push_back({key, cert});
  if (!options.tls_client_ca_file.empty()) {
    ASSIGN_OR_RETURN(ssl.pem_root_certs,
                     ReadFileToString(options.tls_client_ca_file));
    ssl.client_certificate_request =
        GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY;
  }
  return grpc::SslServerCredentials(ssl);
}

// Turns server reflection on or off for the one ServerBuilder it is set on.
// Linking gRPC's reflection library registers its plugin with every builder
// of the process (a static initializer), so "off" must remove it here.
class ReflectionOption : public grpc::ServerBuilderOption {
 public:
  explicit ReflectionOption(bool enabled) : enabled_(enabled) {}
  void UpdateArguments(grpc::ChannelArguments* args) override {}
  void UpdatePlugins(std::vector<std::unique_ptr<grpc::ServerBuilderPlugin>>*
                         plugins) override {
    auto reflection =
        std::make_unique<grpc::reflection::ProtoServerReflectionPlugin>();
    const std::string name = reflection->name();
    plugins->erase(std::remove_if(plugins->begin(), plugins->end(),
                                  [&name](const auto& plugin) {
                                    return plugin->name() == name;
                                  }),
                   plugins->end());
    if (enabled_) plugins->push_back(std::move(reflection));
  }

 private:
  const bool enabled_;
};

void SetServing(grpc::Server* server, bool serving) {
  if (server == nullptr) return;
  grpc::HealthCheckServiceInterface* health = server->GetHealthCheckService();
  if (health == nullptr) return;
  health->SetServingStatus(serving);
  health->SetServingStatus("modelstate.v1.ModelState", serving);
}

// A duration as a gRPC channel argument: whole milliseconds, infinite (and
// anything past INT_MAX ms) as INT_MAX, which gRPC reads as "never".
int ChannelArgMillis(absl::Duration duration) {
  if (duration >= absl::Milliseconds(INT_MAX)) return INT_MAX;
  return static_cast<int>(absl::ToInt64Milliseconds(duration));
}

absl::Status ValidateConnectionLimits(const ServerOptions& options) {
  for (const auto& [name, value] :
       {std::pair<const char*, absl::Duration>{
            "keepalive_min_ping_interval", options.keepalive_min_ping_interval},
        {"keepalive_time", options.keepalive_time},
        {"keepalive_timeout", options.keepalive_timeout},
        {"max_connection_idle", options.max_connection_idle}}) {
    if (value < absl::Milliseconds(1)) {
      return absl::InvalidArgumentError(
          absl::StrCat(name, " must be at least 1ms"));
    }
  }
  if (options.grpc_memory_bytes < (16 << 20)) {
    return absl::InvalidArgumentError("grpc_memory_bytes must be >= 16 MiB");
  }
  if (options.max_concurrent_streams < 1) {
    return absl::InvalidArgumentError("max_concurrent_streams must be >= 1");
  }
  if (options.keepalive_max_ping_strikes < 0) {
    return absl::InvalidArgumentError(
        "keepalive_max_ping_strikes must be >= 0");
  }
  if (options.min_chunk_bytes > kMaxChunkBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("min_chunk_bytes must be at most ", kMaxChunkBytes));
  }
  return absl::OkStatus();
}

// Keepalive enforcement and idle connections (ServerOptions).
void ApplyConnectionLimits(const ServerOptions& options,
                           grpc::ServerBuilder& builder) {
  builder.AddChannelArgument(
      GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS,
      ChannelArgMillis(options.keepalive_min_ping_interval));
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MAX_PING_STRIKES,
                             options.keepalive_max_ping_strikes);
  // Pings without calls are held to the same interval instead of gRPC's
  // two hours, so pooled idle connections with keepalive are not dropped.
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIME_MS,
                             ChannelArgMillis(options.keepalive_time));
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIMEOUT_MS,
                             ChannelArgMillis(options.keepalive_timeout));
  // The server's own pings go out on idle connections too: those are the
  // ones whose peer may have vanished.
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MAX_PINGS_WITHOUT_DATA, 0);
  builder.AddChannelArgument(GRPC_ARG_MAX_CONNECTION_IDLE_MS,
                             ChannelArgMillis(options.max_connection_idle));
  builder.AddChannelArgument(GRPC_ARG_MAX_CONCURRENT_STREAMS,
                             options.max_concurrent_streams);
}

// The credential a follower presents to its upstream, as the flag that gives
// it; empty for none.
std::string UpstreamCredentialFlag(const ClientOptions& client) {
  if (!client.token.empty()) return "--follow_token_file";
  if (!client.tls_cert_file.empty()) return "--follow_tls_cert";
  return "";
}

// A follower serves whatever its upstream let it read. Credentials for the
// upstream mean that the upstream checks its callers, so a follower without a
// policy of its own would hand what they protect to every caller.
absl::Status ValidateFollowerAccess(const ServerOptions& options) {
  if (options.follow.empty()) {
    if (!options.follow_open_reads) return absl::OkStatus();
    return absl::InvalidArgumentError("--follow_open_reads needs --follow");
  }
  if (!options.auth_policy_file.empty() || options.follow_open_reads)
    return absl::OkStatus();
  const std::string credential = UpstreamCredentialFlag(options.follow_client);
  if (credential.empty()) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(
      "this follower presents credentials to ", options.follow, " (",
      credential,
      ") but has no --auth_policy of its own: it would serve the models its "
      "upstream protects to every caller. Give it an --auth_policy, or "
      "--follow_open_reads to serve them to everyone on purpose"));
}

// A data dir a daemon with a policy wrote may hold protected models: a
// follower without a policy would serve them to every caller, whether or not
// its upstream can be asked at start.
absl::Status CheckDataDirAccess(const ServerOptions& options,
                                DataDir& data_dir) {
  if (!options.auth_policy_file.empty()) return data_dir.RecordAccessPolicy();
  if (options.follow.empty() || options.follow_open_reads ||
      !data_dir.WrittenUnderAccessPolicy()) {
    return absl::OkStatus();
  }
  return absl::FailedPreconditionError(absl::StrCat(
      "data dir ", data_dir.path(),
      " holds models written under an --auth_policy: this follower has none "
      "and would serve them to every caller. Give it an --auth_policy, or "
      "--follow_open_reads to serve them to everyone on purpose"));
}

// How a follower reaches its upstream: as --follow_* say, and reconnecting
// within follow_max_backoff once it is back, whatever gRPC's backoff had
// grown to while it was away.
ClientOptions FollowClient(const ServerOptions& options) {
  ClientOptions client = options.follow_client;
  client.max_reconnect_backoff = options.follow_max_backoff;
  return client;
}

// How long a follower's start waits for ProbeUpstreamAccess's answer.
constexpr absl::Duration kUpstreamProbeTimeout = absl::Seconds(3);

// A follower with neither credentials nor a policy of its own asks its
// upstream for the listing without credentials: UNAUTHENTICATED means the
// upstream checks its callers, and the follower refuses to start rather than
// serve openly what its data dir kept from a time it had credentials. Any
// other answer passes, an unreachable upstream's too: such a follower gets
// nothing from an upstream that checks callers.
absl::Status ProbeUpstreamAccess(const ServerOptions& options) {
  if (!options.auth_policy_file.empty() || options.follow_open_reads)
    return absl::OkStatus();
  ClientOptions probe = FollowClient(options);
  probe.timeout = kUpstreamProbeTimeout;
  probe.own_connection = true;
  ASSIGN_OR_RETURN(std::unique_ptr<Client> client,
                   Client::Connect(options.follow, probe));
  const absl::Status listed = client->ListModels().status();
  if (!absl::IsUnauthenticated(listed)) return absl::OkStatus();
  return absl::FailedPreconditionError(absl::StrCat(
      options.follow,
      " checks its callers (ListModels without credentials: ", listed.message(),
      "): a follower of it needs credentials for it (--follow_token_file or "
      "--follow_tls_cert) and an --auth_policy of its own, or "
      "--follow_open_reads to serve its models to everyone on purpose"));
}

// The metrics listener's civetweb settings. A worker thread serves one
// connection at a time from its first byte, so a client that sends nothing,
// or half a request, holds a thread: the request timeout bounds for how long
// (civetweb's default is 30 s), and threads beyond prometheus-cpp's two keep a
// few such clients from delaying a scrape at all. Keep-alive stays off: an idle
// kept-alive connection would hold a thread too.
constexpr int kMetricsThreads = 8;
constexpr absl::Duration kMetricsRequestTimeout = absl::Seconds(3);

std::vector<std::string> MetricsListenerOptions(const std::string& listen) {
  return {"listening_ports",
          listen,
          "num_threads",
          std::to_string(kMetricsThreads),
          "request_timeout_ms",
          std::to_string(absl::ToInt64Milliseconds(kMetricsRequestTimeout)),
          "enable_keep_alive",
          "no"};
}

absl::Status ValidateServerOptions(const ServerOptions& options) {
  if (options.chunk_bytes == 0 || options.chunk_bytes > kMaxChunkBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("chunk_bytes must be between 1 and ", kMaxChunkBytes));
  }
  if (options.retain_versions < 1) {
    return absl::InvalidArgumentError("retain_versions must be at least 1");
  }
  if (options.max_pending_loads < 0) {
    return absl::InvalidArgumentError("max_pending_loads must be >= 0");
  }
  if (options.stream_idle_timeout <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError("stream_idle_timeout must be positive");
  }
  if (options.max_version_wait < absl::ZeroDuration()) {
    return absl::InvalidArgumentError("max_version_wait must not be negative");
  }
  if (!options.follow.empty() && !options.preload.empty()) {
    return absl::InvalidArgumentError(
        "--preload can't be used with --follow: a follower's models come from "
        "its upstream");
  }
  if (options.follow_max_backoff <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError("--follow_retry_max must be positive");
  }
  if (!options.follow.empty() && options.new_epoch) {
    return absl::InvalidArgumentError(
        "--new_epoch can't be used with --follow: a follower's epoch is its "
        "upstream's (see --adopt_epoch)");
  }
  if (options.follow.empty() &&
      (options.adopt_epoch.any || options.adopt_epoch.epoch != 0)) {
    return absl::InvalidArgumentError("--adopt_epoch needs --follow");
  }
  RETURN_IF_ERROR(ValidateFollowerAccess(options));
  return ValidateConnectionLimits(options);
}

}  // namespace

bool IsLoopbackListen(const std::string& listen) {
  const size_t colon = listen.rfind(':');
  std::string host =
      listen.substr(0, colon == std::string::npos ? listen.size() : colon);
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']')
    host = host.substr(1, host.size() - 2);
  return host == "localhost" || host == "::1" || absl::StartsWith(host, "127.");
}

absl::Status Server::OpenStore(const ServerOptions& options) {
  StatePersister* persister = nullptr;
  if (!options.data_dir.empty()) {
    DataDirOptions dir_options;
    dir_options.keep_versions = options.retain_versions;
    ASSIGN_OR_RETURN(data_dir_, DataDir::Open(options.data_dir, dir_options));
    RETURN_IF_ERROR(CheckDataDirAccess(options, *data_dir_));
    persister = data_dir_.get();
    if (!options.sync_durability) {
      async_ = std::make_unique<AsyncPersister>(data_dir_.get());
      persister = async_.get();
    }
  }
  ModelStore::Options store_options;
  store_options.memory_limit_bytes = options.memory_limit_bytes;
  store_options.retain_versions = options.retain_versions;
  store_options.persister = persister;
  store_options.max_pending_loads = options.max_pending_loads;
  store_options.replica_of = options.follow;
  store_ = std::make_unique<ModelStore>(store_options);
  metrics_ = std::make_unique<Metrics>(
      store_.get(), options.memory_limit_bytes,
      [this] { return service_ ? service_->active_calls() : 0; });
  metrics_->SetModelLabels(options.metrics_model_labels);
  Metrics* metrics = metrics_.get();
  access_gate_ = std::make_unique<AccessGate>(
      policy_file_.get(), audit_.get(), [metrics](AuthFailure failure) {
        metrics->RecordAuthFailure(AuthFailureName(failure));
      });
  ServiceOptions service;
  service.default_chunk_bytes = options.chunk_bytes;
  service.log_rpcs = options.log_rpcs;
  service.stream_idle_timeout = options.stream_idle_timeout;
  service.metrics = metrics_.get();
  service.max_version_wait = options.max_version_wait;
  service.gate = access_gate_.get();
  service.min_chunk_bytes = options.min_chunk_bytes;
  service.on_admitted = [this](const std::string& peer) {
    AdmitConnection(peer);
  };
  service_ = std::make_unique<ModelStateService>(store_.get(), service);
  return absl::OkStatus();
}

absl::Status Server::OpenPolicyAndAuditLog(const ServerOptions& options) {
  if (options.follow_open_reads && options.auth_policy_file.empty()) {
    std::fprintf(stderr,
                 "modelstated: WARNING: --follow_open_reads: every client that "
                 "reaches %s%s%s may read every model mirrored from %s, also "
                 "those %s protects\n",
                 options.listen.c_str(),
                 options.local_socket.empty() ? "" : " or ",
                 options.local_socket.c_str(), options.follow.c_str(),
                 options.follow.c_str());
  }
  if (!options.audit_log.empty()) {
    ASSIGN_OR_RETURN(audit_, AuditLog::Open(options.audit_log));
  }
  if (options.auth_policy_file.empty()) {
    if (!IsLoopbackListen(options.listen)) {
      std::fprintf(stderr,
                   "modelstated: WARNING: no --auth_policy: every client that "
                   "reaches %s may read, overwrite and delete every model\n",
                   options.listen.c_str());
    }
    return absl::OkStatus();
  }
  ASSIGN_OR_RETURN(policy_file_,
                   PolicyFile::Open(options.auth_policy_file,
                                    options.auth_policy_poll_interval));
  if (options.tls_cert_file.empty() && !IsLoopbackListen(options.listen)) {
    std::fprintf(stderr,
                 "modelstated: WARNING: bearer tokens travel in plaintext to "
                 "%s; serve TLS (--tls_cert, --tls_key) beyond loopback\n",
                 options.listen.c_str());
  }
  return absl::OkStatus();
}

absl::Status Server::ReloadAuthPolicy() {
  if (policy_file_ == nullptr)
    return absl::FailedPreconditionError("no --auth_policy to reload");
  return policy_file_->Reload();
}

absl::Status Server::ServeMetrics(const std::string& listen,
                                  bool model_labels) {
  if (listen.empty()) return absl::OkStatus();
  // prometheus-cpp reports a listener it cannot start by throwing.
  try {
    exposer_ =
        std::make_unique<prometheus::Exposer>(MetricsListenerOptions(listen));
  } catch (const std::exception& error) {
    return absl::UnavailableError(
        absl::StrCat("cannot serve metrics on ", listen, ": ", error.what()));
  }
  exposer_->RegisterCollectable(metrics_->rpc_metrics());
  exposer_->RegisterCollectable(metrics_->state_metrics());
  if (gate_) {
    connection_metrics_ = ConnectionMetrics(gate_.get());
    exposer_->RegisterCollectable(connection_metrics_);
  }
  if (follower_) {
    follower_metrics_ = FollowerMetrics(follower_.get(), model_labels);
    exposer_->RegisterCollectable(follower_metrics_);
  }
  const std::vector<int> ports = exposer_->GetListeningPorts();
  metrics_port_ = ports.empty() ? 0 : ports[0];
  return absl::OkStatus();
}

absl::Status Server::PrepareFollower(const ServerOptions& options) {
  if (options.follow.empty()) return absl::OkStatus();
  RETURN_IF_ERROR(ProbeUpstreamAccess(options));
  ASSIGN_OR_RETURN(
      upstream_, GrpcUpstream::Connect(options.follow, FollowClient(options)));
  FollowerOptions follower_options;
  follower_options.max_backoff = options.follow_max_backoff;
  follower_options.adoption = options.adopt_epoch;
  follower_options.log = [](const std::string& line) {
    std::fprintf(stderr, "modelstated: %s\n", line.c_str());
  };
  follower_options.on_first_sync = [this] { MarkReady(); };
  follower_ = std::make_unique<Follower>(store_.get(), upstream_.get(),
                                         std::move(follower_options));
  return absl::OkStatus();
}

void Server::StartFollower() {
  std::fprintf(stderr,
               "modelstated: following %s; NOT_SERVING until its models are "
               "mirrored\n",
               upstream_->name().c_str());
  follower_thread_ = std::thread([this] { follower_->Run(); });
}

absl::StatusOr<std::unique_ptr<ConnectionGate>> Server::OpenGate(
    const std::string& listen, int max_connections,
    const ServerOptions& options) {
  ConnectionGateOptions gate;
  gate.listen = listen;
  gate.max_connections = max_connections;
  gate.admission_timeout = options.unauthenticated_connection_timeout;
  // Health speaks for the main port: only its gate drives it, and its cap
  // leaves room for the other listeners' descriptors.
  if (listen == options.listen) {
    gate.on_accepting_changed = [this](bool accepting) {
      OnAcceptingChanged(accepting);
    };
    if (!options.health_listen.empty())
      gate.reserved_descriptors += kHealthConnections;
    if (!options.local_socket.empty())
      gate.reserved_descriptors += LocalTransferOptions().max_connections;
  }
  return ConnectionGate::Listen(std::move(gate));
}

absl::Status Server::AddPort(
    const std::string& listen, int max_connections,
    const ServerOptions& options,
    const std::shared_ptr<grpc::ServerCredentials>& credentials,
    grpc::ServerBuilder& builder, std::unique_ptr<ConnectionGate>& gate,
    std::unique_ptr<grpc::experimental::ExternalConnectionAcceptor>& acceptor,
    int& port) {
  // Only local processes reach a Unix socket, and its file mode says which:
  // gRPC's own listener serves it.
  if (absl::StartsWith(listen, "unix:") ||
      absl::StartsWith(listen, "unix-abstract:")) {
    builder.AddListeningPort(listen, credentials, &port);
    return absl::OkStatus();
  }
  ASSIGN_OR_RETURN(gate, OpenGate(listen, max_connections, options));
  port = gate->port();
  acceptor = builder.experimental().AddExternalConnectionAcceptor(
      grpc::ServerBuilder::experimental_type::ExternalConnectionType::FROM_FD,
      credentials);
  return absl::OkStatus();
}

absl::Status Server::Listen(
    const ServerOptions& options,
    const std::shared_ptr<grpc::ServerCredentials>& credentials) {
  grpc::EnableDefaultHealthCheckService(true);
  grpc::ServerBuilder builder;
  builder.SetOption(std::make_unique<ReflectionOption>(options.reflection));
  RETURN_IF_ERROR(AddPort(options.listen, options.max_connections, options,
                          credentials, builder, gate_, acceptor_, port_));
  builder.RegisterService(service_.get());
  builder.SetMaxReceiveMessageSize(kMaxMessageBytes);
  builder.SetMaxSendMessageSize(kMaxMessageBytes);
  ApplyConnectionLimits(options, builder);
  // gRPC reads a message whole, whatever its length prefix says, before it
  // checks the size, and the calls that need no credentials (health,
  // reflection) are read: only its memory quota, which cancels streams
  // under pressure, bounds what such a caller makes it hold.
  builder.SetResourceQuota(
      grpc::ResourceQuota("modelstate")
          .Resize(static_cast<size_t>(options.grpc_memory_bytes)));
  server_ = builder.BuildAndStart();
  if (server_ == nullptr || port_ == 0) {
    return absl::UnavailableError(
        absl::StrCat("cannot listen on ", options.listen));
  }
  if (gate_) gate_->Start(acceptor_.get());
  if (options.health_listen.empty()) return absl::OkStatus();
  grpc::ServerBuilder health_builder;
  health_builder.SetOption(
      std::make_unique<ReflectionOption>(options.reflection));
  // Answers every other method with UNIMPLEMENTED. It also gives the server
  // a callback method, without which gRPC refuses to build a server whose
  // only service is the default health check (reflection off).
  health_builder.RegisterCallbackGenericService(&health_unimplemented_);
  // Probes connect, ask and leave: a few slots are plenty, and the oldest
  // gives way to a new one.
  RETURN_IF_ERROR(AddPort(options.health_listen, kHealthConnections, options,
                          grpc::InsecureServerCredentials(), health_builder,
                          health_gate_, health_acceptor_, health_port_));
  ApplyConnectionLimits(options, health_builder);
  health_builder.SetResourceQuota(
      grpc::ResourceQuota("modelstate-health").Resize(kHealthGrpcMemoryBytes));
  health_server_ = health_builder.BuildAndStart();
  if (health_server_ == nullptr || health_port_ == 0) {
    return absl::UnavailableError(
        absl::StrCat("cannot listen on ", options.health_listen));
  }
  if (health_gate_) health_gate_->Start(health_acceptor_.get());
  return absl::OkStatus();
}

grpc::Status Server::CheckHeaders(const std::string& method,
                                  const std::vector<std::string>& authorization,
                                  const grpc::AuthContext* peer) {
  CallerCredentials credentials;
  credentials.authorization = authorization;
  credentials.certificate = CertificateNamesOf(peer);
  const grpc::Status status =
      ToGrpcStatus(access_gate_->CheckHeaders(method, credentials));
  if (!status.ok()) LogRefusedCall(method, status);
  return status;
}

// The call was not read, so its lines name no model, and the peer is not
// known at this step.
void Server::LogRefusedCall(const std::string& method,
                            const grpc::Status& status) {
  const std::optional<Action> action = ActionOfMethod(method);
  int64_t suppressed = 0;
  const bool logged = refused_log_limit_.Allow(&suppressed);
  if (suppressed > 0) {
    std::fprintf(stderr,
                 "modelstated: %lld calls refused for want of credentials "
                 "were not logged (more than %d a second)\n",
                 static_cast<long long>(suppressed), kLoggedRefusalsPerSecond);
  }
  // Counted in the metrics whether logged or not.
  RpcRecord record(action ? ActionName(*action) : "unknown",
                   logged && service_->options().log_rpcs, metrics_.get());
  record.Log(status);
  if (logged && action) {
    // The numbering of status codes is shared.
    access_gate_->Audit(nullptr, *action, "", 0, 0,
                        static_cast<absl::StatusCode>(status.error_code()), "");
  }
}

void Server::MarkReady() {
  absl::MutexLock lock(&shutdown_mu_);
  if (shut_down_) return;
  ready_ = true;
  SetServing(server_.get(), accepting_);
  SetServing(health_server_.get(), accepting_);
}

void Server::OnAcceptingChanged(bool accepting) {
  absl::MutexLock lock(&shutdown_mu_);
  accepting_ = accepting;
  if (shut_down_ || !ready_) return;
  SetServing(server_.get(), accepting);
  SetServing(health_server_.get(), accepting);
}

std::shared_ptr<grpc::ServerCredentials> Server::CheckingCallHeaders(
    const ServerOptions& options,
    std::shared_ptr<grpc::ServerCredentials> credentials) {
  if (policy_file_ == nullptr) return credentials;
  return CheckingHeaders(
      options.tls_cert_file.empty() ? nullptr : std::move(credentials),
      [this](const std::string& method,
             const std::vector<std::string>& authorization,
             const grpc::AuthContext* peer) {
        return CheckHeaders(method, authorization, peer);
      });
}

absl::Status Server::ServeLocalTransfer(const ServerOptions& options) {
  if (options.local_socket.empty()) return absl::OkStatus();
  LocalTransferOptions local;
  local.path = options.local_socket;
  local.authorize = options.local_authorize;
  local.export_bytes = options.local_export_bytes;
  local.max_connections_per_uid = options.local_max_connections_per_uid;
  if (!local.authorize && policy_file_ != nullptr) {
    // The side channel's token answers to the same gate as the gRPC port.
    const AccessGate* gate = access_gate_.get();
    local.authorize = [gate](const LocalPeer&, const std::string& token,
                             const FetchRequest& request) {
      return gate->AdmitToken(token, Action::kStateDict, request.model);
    };
  }
  ASSIGN_OR_RETURN(local_,
                   LocalTransferServer::Start(store_.get(), std::move(local)));
  return absl::OkStatus();
}

absl::Status Server::LoadStartupModels(const ServerOptions& options) {
  std::vector<std::string> notes;
  absl::Status populated =
      PopulateStore(StartupModels{options.demo_model, options.preload},
                    data_dir_.get(), store_.get(), &notes);
  // A follower takes its upstream's epoch (store/follower.h).
  if (populated.ok() && options.follow.empty()) {
    populated = EstablishPrimaryEpoch(options.new_epoch, store_.get(), &notes);
  }
  for (const std::string& note : notes)
    std::fprintf(stderr, "modelstated: %s\n", note.c_str());
  return populated;
}

absl::StatusOr<std::unique_ptr<Server>> Server::BuildAndStart(
    ServerOptions options) {
  RETURN_IF_ERROR(ValidateServerOptions(options));
  ASSIGN_OR_RETURN(auto credentials, Credentials(options));
  std::unique_ptr<Server> server(new Server());
  RETURN_IF_ERROR(server->OpenPolicyAndAuditLog(options));
  credentials = server->CheckingCallHeaders(options, std::move(credentials));
  server->memory_releaser_ =
      std::make_unique<MemoryReleaser>(options.release_memory_interval);
  RETURN_IF_ERROR(server->OpenStore(options));
  RETURN_IF_ERROR(server->PrepareFollower(options));
  if (server->follower_) {
    // A follower's models are its upstream's (and what its data dir holds).
    options.demo_model.clear();
  }
  absl::Status started = server->Listen(options, credentials);
  if (started.ok())
    started = server->ServeMetrics(options.metrics_listen,
                                   options.metrics_model_labels);
  if (started.ok()) started = server->ServeLocalTransfer(options);
  SetServing(server->server_.get(), false);
  SetServing(server->health_server_.get(), false);
  if (started.ok()) started = server->LoadStartupModels(options);
  if (!started.ok()) {
    server->Shutdown(absl::ZeroDuration());
    return started;
  }
  if (server->follower_) {
    server->StartFollower();
    return server;
  }
  server->MarkReady();
  return server;
}

Server::~Server() { Shutdown(absl::ZeroDuration()); }

void Server::Wait() {
  if (server_) server_->Wait();
}

void Server::Shutdown(absl::Duration grace) {
  {
    absl::MutexLock lock(&shutdown_mu_);
    if (shut_down_) return;
    shut_down_ = true;
  }
  SetServing(server_.get(), false);
  SetServing(health_server_.get(), false);
  local_.reset();
  if (follower_) {
    follower_->Stop();
    if (follower_thread_.joinable()) follower_thread_.join();
  }
  const absl::Time end = absl::Now() + grace;
  if (service_) {
    service_->BeginDrain();
    // A finished call's last bytes may still be in socket buffers on their
    // way to its client. gRPC closes each connection as soon as its last call
    // is done, and a socket closed while its client still sends (flow-control
    // updates for those bytes) is reset, which makes the client drop what it
    // has not read yet. So calls finish first, then connections stay open a
    // moment for clients to read their tails, and only then does gRPC's
    // shutdown close them.
    if (service_->WaitForIdle(end) && grace > absl::ZeroDuration())
      absl::SleepFor(std::min(kShutdownLinger, end - absl::Now()));
  }
  const gpr_timespec deadline = gpr_time_add(
      gpr_now(GPR_CLOCK_MONOTONIC),
      gpr_time_from_millis(
          std::max<int64_t>(0, absl::ToInt64Milliseconds(end - absl::Now())),
          GPR_TIMESPAN));
  // No new connections from here on; those open are gRPC's to close.
  if (gate_) gate_->Stop();
  if (health_gate_) health_gate_->Stop();
  if (server_) server_->Shutdown(deadline);
  if (health_server_) health_server_->Shutdown(deadline);
}

}  // namespace modelstate

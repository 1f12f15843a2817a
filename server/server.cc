#include "server/server.h"

#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "core/file_util.h"
#include "core/startup.h"
#include "core/status_macros.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/health_check_service_interface.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/server_builder.h"

namespace modelstate {
namespace {

// How long connections stay open after the last call of a graceful stop (see
// Server::Shutdown).
const absl::Duration kShutdownLinger = absl::Seconds(1);

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

void SetServing(grpc::Server* server, bool serving) {
  if (server == nullptr) return;
  grpc::HealthCheckServiceInterface* health = server->GetHealthCheckService();
  if (health == nullptr) return;
  health->SetServingStatus(serving);
  health->SetServingStatus("modelstate.v1.ModelState", serving);
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
  if (!options.follow.empty() && !options.preload.empty()) {
    return absl::InvalidArgumentError(
        "--preload can't be used with --follow: a follower's models come from "
        "its upstream");
  }
  if (options.follow_max_backoff <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError("--follow_retry_max must be positive");
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status Server::OpenStore(const ServerOptions& options) {
  StatePersister* persister = nullptr;
  if (!options.data_dir.empty()) {
    DataDirOptions dir_options;
    dir_options.keep_versions = options.retain_versions;
    ASSIGN_OR_RETURN(data_dir_, DataDir::Open(options.data_dir, dir_options));
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
  service_ = std::make_unique<ModelStateService>(
      store_.get(),
      ServiceOptions{options.chunk_bytes, options.log_rpcs,
                     options.stream_idle_timeout, metrics_.get()});
  return absl::OkStatus();
}

absl::Status Server::ServeMetrics(const std::string& listen) {
  if (listen.empty()) return absl::OkStatus();
  // prometheus-cpp reports a listener it cannot start by throwing.
  try {
    exposer_ = std::make_unique<prometheus::Exposer>(listen);
  } catch (const std::exception& error) {
    return absl::UnavailableError(
        absl::StrCat("cannot serve metrics on ", listen, ": ", error.what()));
  }
  exposer_->RegisterCollectable(metrics_->rpc_metrics());
  exposer_->RegisterCollectable(metrics_->state_metrics());
  if (follower_) {
    follower_metrics_ = FollowerMetrics(follower_.get());
    exposer_->RegisterCollectable(follower_metrics_);
  }
  const std::vector<int> ports = exposer_->GetListeningPorts();
  metrics_port_ = ports.empty() ? 0 : ports[0];
  return absl::OkStatus();
}

absl::Status Server::PrepareFollower(const ServerOptions& options) {
  if (options.follow.empty()) return absl::OkStatus();
  ASSIGN_OR_RETURN(
      upstream_, GrpcUpstream::Connect(options.follow, options.follow_client));
  FollowerOptions follower_options;
  follower_options.max_backoff = options.follow_max_backoff;
  follower_options.log = [](const std::string& line) {
    std::fprintf(stderr, "modelstated: %s\n", line.c_str());
  };
  follower_options.on_first_sync = [this] {
    absl::MutexLock lock(&shutdown_mu_);
    if (shut_down_) return;
    SetServing(server_.get(), true);
    SetServing(health_server_.get(), true);
  };
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

absl::Status Server::Listen(
    const ServerOptions& options,
    const std::shared_ptr<grpc::ServerCredentials>& credentials) {
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  builder.AddListeningPort(options.listen, credentials, &port_);
  builder.RegisterService(service_.get());
  builder.SetMaxReceiveMessageSize(kMaxMessageBytes);
  builder.SetMaxSendMessageSize(kMaxMessageBytes);
  server_ = builder.BuildAndStart();
  if (server_ == nullptr || port_ == 0) {
    return absl::UnavailableError(
        absl::StrCat("cannot listen on ", options.listen));
  }
  if (!options.health_listen.empty()) {
    grpc::ServerBuilder health_builder;
    health_builder.AddListeningPort(options.health_listen,
                                    grpc::InsecureServerCredentials(),
                                    &health_port_);
    health_server_ = health_builder.BuildAndStart();
    if (health_server_ == nullptr || health_port_ == 0) {
      return absl::UnavailableError(
          absl::StrCat("cannot listen on ", options.health_listen));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<Server>> Server::BuildAndStart(
    ServerOptions options) {
  RETURN_IF_ERROR(ValidateServerOptions(options));
  ASSIGN_OR_RETURN(auto credentials, Credentials(options));
  std::unique_ptr<Server> server(new Server());
  RETURN_IF_ERROR(server->OpenStore(options));
  RETURN_IF_ERROR(server->PrepareFollower(options));
  if (server->follower_) {
    // A follower's models are its upstream's (and what its data dir holds).
    options.demo_model.clear();
  }
  absl::Status started = server->Listen(options, credentials);
  if (started.ok()) started = server->ServeMetrics(options.metrics_listen);
  SetServing(server->server_.get(), false);
  SetServing(server->health_server_.get(), false);
  std::vector<std::string> notes;
  if (started.ok()) {
    started =
        PopulateStore(StartupModels{options.demo_model, options.preload},
                      server->data_dir_.get(), server->store_.get(), &notes);
  }
  for (const std::string& note : notes)
    std::fprintf(stderr, "modelstated: %s\n", note.c_str());
  if (!started.ok()) {
    server->Shutdown(absl::ZeroDuration());
    return started;
  }
  if (server->follower_) {
    server->StartFollower();
    return server;
  }
  SetServing(server->server_.get(), true);
  SetServing(server->health_server_.get(), true);
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
  if (server_) server_->Shutdown(deadline);
  if (health_server_) health_server_->Shutdown(deadline);
}

}  // namespace modelstate

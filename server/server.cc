#include "server/server.h"

#include <cstdio>
#include <set>

#include "absl/strings/str_cat.h"
#include "core/file_util.h"
#include "core/model_files.h"
#include "core/status_macros.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/health_check_service_interface.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/server_builder.h"

namespace modelstate {
namespace {

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

}  // namespace

absl::StatusOr<std::unique_ptr<Server>> Server::BuildAndStart(
    ServerOptions options) {
  if (options.chunk_bytes == 0 || options.chunk_bytes > kMaxChunkBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("chunk_bytes must be between 1 and ", kMaxChunkBytes));
  }
  ASSIGN_OR_RETURN(auto credentials, Credentials(options));
  if (options.retain_versions < 1) {
    return absl::InvalidArgumentError("retain_versions must be at least 1");
  }
  std::unique_ptr<Server> server(new Server());
  StatePersister* persister = nullptr;
  if (!options.data_dir.empty()) {
    DataDirOptions dir_options;
    dir_options.keep_versions = options.retain_versions;
    ASSIGN_OR_RETURN(server->data_dir_,
                     DataDir::Open(options.data_dir, dir_options));
    persister = server->data_dir_.get();
    if (!options.sync_durability) {
      server->async_ =
          std::make_unique<AsyncPersister>(server->data_dir_.get());
      persister = server->async_.get();
    }
  }
  server->store_ = std::make_unique<ModelStore>(ModelStore::Options{
      options.memory_limit_bytes, options.retain_versions, persister});
  server->service_ = std::make_unique<ModelStateService>(
      server->store_.get(),
      ServiceOptions{options.chunk_bytes, options.log_rpcs});

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  builder.AddListeningPort(options.listen, credentials, &server->port_);
  builder.RegisterService(server->service_.get());
  // Chunks stay under 3 MiB; leave room for the envelope and the load header's
  // manifest.
  builder.SetMaxReceiveMessageSize(kMaxMessageBytes);
  builder.SetMaxSendMessageSize(kMaxMessageBytes);
  server->server_ = builder.BuildAndStart();
  if (server->server_ == nullptr || server->port_ == 0) {
    return absl::UnavailableError(
        absl::StrCat("cannot listen on ", options.listen));
  }
  if (!options.health_listen.empty()) {
    grpc::ServerBuilder health_builder;
    health_builder.AddListeningPort(options.health_listen,
                                    grpc::InsecureServerCredentials(),
                                    &server->health_port_);
    server->health_server_ = health_builder.BuildAndStart();
    if (server->health_server_ == nullptr || server->health_port_ == 0) {
      server->Shutdown(absl::ZeroDuration());
      return absl::UnavailableError(
          absl::StrCat("cannot listen on ", options.health_listen));
    }
  }
  SetServing(server->server_.get(), false);
  SetServing(server->health_server_.get(), false);

  auto preload = [&]() -> absl::Status {
    std::set<std::string> restored;
    if (server->data_dir_ != nullptr) {
      RestoreReport report = server->data_dir_->Restore();
      for (const std::string& problem : report.problems) {
        std::fprintf(stderr, "modelstated: restore: %s\n", problem.c_str());
      }
      for (RestoredModel& model : report.models) {
        const Snapshot& snapshot = model.snapshot;
        RETURN_IF_ERROR(server->store_->Restore(snapshot.model, snapshot.root,
                                                snapshot.architecture,
                                                snapshot.version));
        std::fprintf(stderr, "modelstated: restored %s at version %lld\n",
                     snapshot.model.c_str(),
                     static_cast<long long>(snapshot.version));
        restored.insert(snapshot.model);
      }
    }
    if (!options.demo_model.empty() &&
        restored.count(options.demo_model) == 0) {
      ASSIGN_OR_RETURN(ModulePtr demo, BuildModuleFromSpec(kDemoArchitecture));
      RETURN_IF_ERROR(
          server->store_->Create(options.demo_model, demo, kDemoArchitecture));
    }
    for (const auto& [name, path] : options.preload) {
      if (restored.count(name) > 0)
        continue;  // The persisted state wins over the seed.
      absl::StatusOr<ModelFromFile> model = LoadModelFile(path);
      if (!model.ok()) {
        return absl::Status(
            model.status().code(),
            absl::StrCat("preload ", name, ": ", model.status().message()));
      }
      absl::Status created =
          server->store_->Create(name, model->root, model->architecture);
      if (!created.ok()) {
        return absl::Status(created.code(), absl::StrCat("preload ", name, ": ",
                                                         created.message()));
      }
    }
    return absl::OkStatus();
  };
  absl::Status preloaded = preload();
  if (!preloaded.ok()) {
    server->Shutdown(absl::ZeroDuration());
    return preloaded;
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
  if (service_) service_->StopWatches();
  const gpr_timespec deadline = gpr_time_add(
      gpr_now(GPR_CLOCK_MONOTONIC),
      gpr_time_from_millis(absl::ToInt64Milliseconds(grace), GPR_TIMESPAN));
  if (server_) server_->Shutdown(deadline);
  if (health_server_) health_server_->Shutdown(deadline);
}

}  // namespace modelstate

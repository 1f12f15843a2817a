// The channel and its plain calls: connecting (TLS, tokens, keepalive, load
// balancing), each call's deadline and metadata, cancelling, and the small
// admin calls.
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstdio>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "client/client.h"
#include "client/local_fetch.h"
#include "common/bearer.h"
#include "common/file_util.h"
#include "common/limits.h"
#include "common/status_macros.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "proto/convert.h"
#include "proto/grpc_status.h"

namespace modelstate {
namespace {

// Whole milliseconds, at least 1; INT_MAX (gRPC's "never") beyond.
int Millis(absl::Duration duration) {
  return static_cast<int>(
      std::clamp<int64_t>(absl::ToInt64Milliseconds(duration), 1, INT_MAX));
}

// Sets the channel arguments of ClientOptions' keepalive (none when
// keepalive_time is infinite); InvalidArgument for a non-positive duration.
absl::Status ApplyKeepalive(const ClientOptions& options,
                            grpc::ChannelArguments& args) {
  if (options.keepalive_time <= absl::ZeroDuration() ||
      options.keepalive_timeout <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError(
        "keepalive_time and keepalive_timeout must be positive");
  }
  if (options.keepalive_time == absl::InfiniteDuration())
    return absl::OkStatus();
  args.SetInt(GRPC_ARG_KEEPALIVE_TIME_MS, Millis(options.keepalive_time));
  args.SetInt(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, Millis(options.keepalive_timeout));
  // A connection without calls may be just as dead, and the next call on it
  // would hang; modelstated accepts pings without calls.
  args.SetInt(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  // gRPC stops pinging after two pings unless the client sent data in
  // between, which a client that only receives (a watch) never does.
  args.SetInt(GRPC_ARG_HTTP2_MAX_PINGS_WITHOUT_DATA, 0);
  return absl::OkStatus();
}

// The least time a connection attempt gets with a bounded reconnect backoff:
// a TCP and TLS handshake over a slow link takes a few round trips.
constexpr absl::Duration kMinConnectAttempt = absl::Seconds(2);

// Sets the channel arguments of ClientOptions::max_reconnect_backoff (none
// when infinite); InvalidArgument when it is not positive.
absl::Status ApplyReconnectBackoff(const ClientOptions& options,
                                   grpc::ChannelArguments& args) {
  const absl::Duration max = options.max_reconnect_backoff;
  if (max <= absl::ZeroDuration())
    return absl::InvalidArgumentError("max_reconnect_backoff must be positive");
  if (max == absl::InfiniteDuration()) return absl::OkStatus();
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS,
              Millis(std::min(max, absl::Seconds(1))));
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, Millis(max));
  // gRPC's name for the time one connection attempt may take (20 s by
  // default): an attempt hung on a silent network holds the next one back.
  args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS,
              Millis(std::max(max, kMinConnectAttempt)));
  return absl::OkStatus();
}

}  // namespace

void CallCanceller::Cancel() {
  absl::MutexLock lock(&mu_);
  cancelled_ = true;
  for (grpc::ClientContext* context : contexts_) context->TryCancel();
}

bool CallCanceller::cancelled() const {
  absl::MutexLock lock(&mu_);
  return cancelled_;
}

void CallCanceller::Attach(grpc::ClientContext* context) {
  absl::MutexLock lock(&mu_);
  contexts_.push_back(context);
  // gRPC keeps a cancel that comes before the call starts and applies it then.
  if (cancelled_) context->TryCancel();
}

void CallCanceller::Detach(grpc::ClientContext* context) {
  absl::MutexLock lock(&mu_);
  contexts_.erase(std::find(contexts_.begin(), contexts_.end(), context));
}

Client::Client(std::shared_ptr<grpc::Channel> channel, ClientOptions options)
    : channel_(std::move(channel)),
      stub_(v1::ModelState::NewStub(channel_)),
      options_(std::move(options)) {}

namespace {

// Of a token file's mode: FailedPrecondition when group or others may write
// it; OK otherwise, with `*warning` set when they may read it.
absl::Status CheckTokenFileMode(const std::string& path, mode_t mode,
                                std::string* warning) {
  const std::string shown = absl::StrFormat("%04o", mode & 07777);
  if ((mode & (S_IWGRP | S_IWOTH)) != 0) {
    return absl::FailedPreconditionError(absl::StrCat(
        "token file ", path, " has mode ", shown,
        ": group or others may write it, so anyone could replace the token; "
        "refusing it (chmod 600 ",
        path, ")"));
  }
  if ((mode & (S_IRGRP | S_IROTH)) != 0) {
    *warning = absl::StrCat("token file ", path, " has mode ", shown,
                            ": group or others may read the token (chmod 600 ",
                            path, ")");
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::string> ReadTokenFile(const std::string& path,
                                          std::string* warning) {
  std::string ignored;
  if (warning == nullptr) warning = &ignored;
  warning->clear();
  // The mode is taken from the file as opened, so it is the file read.
  std::unique_ptr<std::FILE, int (*)(std::FILE*)> file(
      std::fopen(path.c_str(), "rb"), std::fclose);
  if (file == nullptr) return ErrnoToStatus(errno, "cannot read", path);
  struct stat info;
  if (fstat(fileno(file.get()), &info) != 0)
    return ErrnoToStatus(errno, "cannot read", path);
  // A pipe that others may write feeds them the token as well as a file
  // does; devices (/dev/stdin's terminal) are left alone.
  if (S_ISREG(info.st_mode) || S_ISFIFO(info.st_mode)) {
    RETURN_IF_ERROR(CheckTokenFileMode(path, info.st_mode, warning));
    // As ssh does for keys: another user's file could be swapped under us.
    if (info.st_uid != geteuid() && info.st_uid != 0) {
      return absl::FailedPreconditionError(
          absl::StrCat("token file ", path, " belongs to uid ", info.st_uid,
                       ", neither this user nor root; refusing it"));
    }
  }
  std::string text;
  char buffer[4096];
  size_t got;
  while ((got = std::fread(buffer, 1, sizeof buffer, file.get())) > 0)
    text.append(buffer, got);
  if (std::ferror(file.get()))
    return absl::UnavailableError(absl::StrCat("cannot read ", path));
  const std::string token(absl::StripAsciiWhitespace(text));
  if (token.empty())
    return absl::InvalidArgumentError(absl::StrCat(path, " holds no token"));
  return token;
}

absl::StatusOr<std::unique_ptr<Client>> Client::Connect(
    const std::string& target, const ClientOptions& options) {
  // A token that would make a malformed header is refused here, without
  // echoing it (it is a secret).
  for (char c : options.token) {
    if (!absl::ascii_isgraph(static_cast<unsigned char>(c))) {
      return absl::InvalidArgumentError(
          "the token has whitespace or control characters");
    }
  }
  std::shared_ptr<grpc::ChannelCredentials> credentials;
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(kMaxMessageBytes);
  args.SetMaxSendMessageSize(kMaxMessageBytes);
  if (!options.load_balancing_policy.empty())
    args.SetLoadBalancingPolicyName(options.load_balancing_policy);
  if (options.receive_window_bytes > 0) {
    args.SetInt(GRPC_ARG_HTTP2_BDP_PROBE, 0);
    args.SetInt(GRPC_ARG_HTTP2_STREAM_LOOKAHEAD_BYTES,
                static_cast<int>(options.receive_window_bytes));
  }
  if (options.own_connection)
    args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  RETURN_IF_ERROR(ApplyKeepalive(options, args));
  RETURN_IF_ERROR(ApplyReconnectBackoff(options, args));
  const bool tls = options.use_tls || !options.tls_ca_file.empty() ||
                   !options.tls_cert_file.empty();
  if (tls) {
    grpc::SslCredentialsOptions ssl;
    if (!options.tls_ca_file.empty()) {
      ASSIGN_OR_RETURN(ssl.pem_root_certs,
                       ReadFileToString(options.tls_ca_file));
    }
    if (options.tls_cert_file.empty() != options.tls_key_file.empty()) {
      return absl::InvalidArgumentError(
          "a client certificate needs both --tls_cert and --tls_key");
    }
    if (!options.tls_cert_file.empty()) {
      ASSIGN_OR_RETURN(ssl.pem_cert_chain,
                       ReadFileToString(options.tls_cert_file));
      ASSIGN_OR_RETURN(ssl.pem_private_key,
                       ReadFileToString(options.tls_key_file));
    }
    credentials = grpc::SslCredentials(ssl);
    if (!options.tls_server_name.empty()) {
      args.SetSslTargetNameOverride(options.tls_server_name);
    }
  } else {
    credentials = grpc::InsecureChannelCredentials();
  }
  auto channel = grpc::CreateCustomChannel(target, credentials, args);
  ClientOptions resolved = options;
  resolved.local_socket = LocalSocketFor(target, options.local_socket);
  return std::unique_ptr<Client>(new Client(std::move(channel), resolved));
}

void Client::Prepare(grpc::ClientContext* context) const {
  if (options_.timeout != absl::InfiniteDuration()) {
    context->set_deadline(absl::ToChronoTime(absl::Now() + options_.timeout));
  }
  if (!options_.token.empty())
    context->AddMetadata("authorization", BearerAuthorization(options_.token));
}

absl::StatusOr<std::vector<ModelSummary>> Client::ListModels() {
  grpc::ClientContext context;
  Prepare(&context);
  v1::ListModelsResponse response;
  RETURN_IF_ERROR(FromGrpcStatus(
      stub_->ListModels(&context, v1::ListModelsRequest(), &response)));
  std::vector<ModelSummary> models;
  models.reserve(response.models_size());
  for (const v1::ModelSummary& summary : response.models())
    models.push_back(FromProto(summary));
  return models;
}

absl::StatusOr<ModelManifest> Client::GetModel(const std::string& model,
                                               const std::string& module,
                                               int64_t version,
                                               int64_t min_version) {
  grpc::ClientContext context;
  Prepare(&context);
  FetchRequest selection;
  selection.model = model;
  selection.module = module;
  selection.version = version;
  selection.min_version = min_version;
  v1::GetModelResponse response;
  RETURN_IF_ERROR(FromGrpcStatus(
      stub_->GetModel(&context, ToGetModelRequest(selection), &response)));
  return FromProto(response);
}

absl::StatusOr<ModelSummary> Client::CreateModel(
    const std::string& model, const std::string& architecture_json,
    uint64_t seed) {
  grpc::ClientContext context;
  Prepare(&context);
  v1::CreateModelRequest request;
  request.set_model(model);
  request.set_architecture_json(architecture_json);
  request.set_seed(seed);
  v1::CreateModelResponse response;
  RETURN_IF_ERROR(
      FromGrpcStatus(stub_->CreateModel(&context, request, &response)));
  return FromProto(response.summary());
}

absl::StatusOr<ModelSummary> Client::RollbackModel(const std::string& model,
                                                   int64_t version) {
  grpc::ClientContext context;
  Prepare(&context);
  v1::RollbackModelRequest request;
  request.set_model(model);
  request.set_version(version);
  v1::RollbackModelResponse response;
  RETURN_IF_ERROR(
      FromGrpcStatus(stub_->RollbackModel(&context, request, &response)));
  return FromProto(response.summary());
}

absl::Status Client::DeleteModel(const std::string& model) {
  grpc::ClientContext context;
  Prepare(&context);
  v1::DeleteModelRequest request;
  request.set_model(model);
  v1::DeleteModelResponse response;
  return FromGrpcStatus(stub_->DeleteModel(&context, request, &response));
}

absl::Time Client::Deadline() const {
  return options_.timeout == absl::InfiniteDuration()
             ? absl::InfiniteFuture()
             : absl::Now() + options_.timeout;
}

absl::StatusOr<bool> Client::CheckHealth(const std::string& service) {
  grpc::ClientContext context;
  Prepare(&context);
  grpc::health::v1::HealthCheckRequest request;
  request.set_service(service);
  grpc::health::v1::HealthCheckResponse response;
  RETURN_IF_ERROR(
      FromGrpcStatus(grpc::health::v1::Health::NewStub(channel_)->Check(
          &context, request, &response)));
  return response.status() == grpc::health::v1::HealthCheckResponse::SERVING;
}

}  // namespace modelstate

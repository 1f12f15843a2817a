#include "client/client.h"

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstring>
#include <map>
#include <set>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "client/local_fetch.h"
#include "common/file_util.h"
#include "common/limits.h"
#include "common/status_macros.h"
#include "transfer/transfer.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/impl/codegen/proto_utils.h"
#include "grpcpp/security/credentials.h"
#include "proto/chunk_frame.h"
#include "proto/convert.h"
#include "proto/grpc_status.h"
#include "xxhash.h"

namespace modelstate {
namespace {

TensorDescription Describe(const v1::TensorInfo& info,
                           const TransferEntry& entry) {
  return TensorDescription{info.name(),      FromProto(info.kind()).value(),
                           entry.dtype,      entry.shape,
                           info.num_bytes(), info.xxh3_64()};
}

// The manifest's entries as StateDictStreaming's on_manifest sees them.
std::vector<TensorDescription> Describe(
    const v1::Manifest& manifest, const std::vector<TransferEntry>& entries) {
  std::vector<TensorDescription> described;
  described.reserve(entries.size());
  for (size_t i = 0; i < entries.size(); ++i)
    described.push_back(
        Describe(manifest.tensors(static_cast<int>(i)), entries[i]));
  return described;
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
  // Whole milliseconds, at least 1; INT_MAX (gRPC's "never") beyond.
  auto millis = [](absl::Duration duration) {
    return static_cast<int>(
        std::clamp<int64_t>(absl::ToInt64Milliseconds(duration), 1, INT_MAX));
  };
  args.SetInt(GRPC_ARG_KEEPALIVE_TIME_MS, millis(options.keepalive_time));
  args.SetInt(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, millis(options.keepalive_timeout));
  // A connection without calls may be just as dead, and the next call on it
  // would hang; modelstated accepts pings without calls.
  args.SetInt(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  // gRPC stops pinging after two pings unless the client sent data in
  // between, which a client that only receives (a watch) never does.
  args.SetInt(GRPC_ARG_HTTP2_MAX_PINGS_WITHOUT_DATA, 0);
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

// Attaches a call's context to a canceller (if any) for the scope's lifetime;
// declare it after the context so that it detaches before the context dies.
class CancelScope {
 public:
  CancelScope(CallCanceller* canceller, grpc::ClientContext* context)
      : canceller_(canceller), context_(context) {
    if (canceller_ != nullptr) canceller_->Attach(context_);
  }
  ~CancelScope() {
    if (canceller_ != nullptr) canceller_->Detach(context_);
  }
  CancelScope(const CancelScope&) = delete;
  CancelScope& operator=(const CancelScope&) = delete;

 private:
  CallCanceller* canceller_;
  grpc::ClientContext* context_;
};

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
    context->AddMetadata("authorization", "Bearer " + options_.token);
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

namespace {

absl::Status StatusOf(absl::Status status) { return status; }
template <typename T>
absl::Status StatusOf(const absl::StatusOr<T>& result) {
  return result.status();
}

// One StateDict call read as raw messages, so that chunk bytes go from the
// received slices straight into the tensors (ReadStateDictFrame), copied once.
class RawStateDictCall {
 public:
  // Starts the call; `context` must outlive this object.
  RawStateDictCall(grpc::Channel* channel, grpc::ClientContext* context,
                   const grpc::ByteBuffer& request)
      : context_(context),
        reader_(grpc::internal::ClientReaderFactory<grpc::ByteBuffer>::Create(
            channel, Method(), context, request)) {}

  // Reads the first message, which must be the manifest.
  absl::StatusOr<v1::Manifest> ReadManifest() {
    if (!reader_->Read(&buffer_)) return FromGrpcStatus(reader_->Finish());
    absl::StatusOr<bool> chunk = ReadStateDictFrame(
        &buffer_, &response_, [](uint64_t, absl::string_view) {
          return absl::DataLossError("stream did not start with a manifest");
        });
    if (!chunk.ok())
      return Abandon(absl::DataLossError(chunk.status().message()));
    if (*chunk || !response_.has_manifest()) {
      return Abandon(
          absl::DataLossError("stream did not start with a manifest"));
    }
    return std::move(*response_.mutable_manifest());
  }

  // Feeds every chunk to `receiver` (a ChunkReceiver or a DestinationWriter)
  // until the end marker and the call's end. A bad stream is DataLoss,
  // whatever the receiver called it; the receiver's callback error is
  // returned as it is, whatever the server says after the cancel.
  template <typename Receiver>
  absl::Status ReadToEnd(Receiver& receiver, const ProgressCallback& progress) {
    bool ended = false;
    auto accept = [&](uint64_t offset, absl::string_view piece) {
      if (ended) return absl::DataLossError("data after the end marker");
      return receiver.Accept(offset, piece);
    };
    while (reader_->Read(&buffer_)) {
      absl::StatusOr<bool> chunk =
          ReadStateDictFrame(&buffer_, &response_, accept);
      absl::Status step = chunk.status();
      if (step.ok() && *chunk) {
        if (progress)
          progress(receiver.received_bytes(), receiver.total_bytes());
      } else if (step.ok() && response_.has_end() && !ended) {
        step = StatusOf(receiver.Finish(response_.end().total_bytes()));
        ended = true;
      } else if (step.ok()) {
        step = absl::DataLossError("unexpected message in a StateDict stream");
      }
      if (!step.ok()) {
        // The caller's own error (its callback's or writer's) stays as it is;
        // what the receiver refused is a bad stream.
        if (!receiver.callback_error().ok()) {
          Abandon(step).IgnoreError();
          return receiver.callback_error();
        }
        if (step.code() == absl::StatusCode::kInvalidArgument)
          step = absl::DataLossError(step.message());
        return Abandon(step);
      }
    }
    RETURN_IF_ERROR(FromGrpcStatus(reader_->Finish()));
    if (!ended)
      return absl::DataLossError(
          "StateDict stream ended without its end marker");
    return absl::OkStatus();
  }

  // Stops the stream and reports `status` (the server's status wins if it has
  // one).
  absl::Status Abandon(absl::Status status) {
    context_->TryCancel();
    while (reader_->Read(&buffer_)) {
    }
    absl::Status server = FromGrpcStatus(reader_->Finish());
    return server.ok() || server.code() == absl::StatusCode::kCancelled
               ? status
               : server;
  }

 private:
  static const grpc::internal::RpcMethod& Method() {
    static const grpc::internal::RpcMethod kStateDict(
        "/modelstate.v1.ModelState/StateDict",
        grpc::internal::RpcMethod::SERVER_STREAMING);
    return kStateDict;
  }

  grpc::ClientContext* context_;
  std::unique_ptr<grpc::ClientReader<grpc::ByteBuffer>> reader_;
  grpc::ByteBuffer buffer_;
  v1::StateDictResponse response_;
};

// Whether two manifests describe the same bytes: version, total and every
// tensor's name, kind, dtype, shape, size and checksum.
bool SameTransfer(const v1::Manifest& a, const v1::Manifest& b) {
  if (a.version() != b.version() || a.total_bytes() != b.total_bytes() ||
      a.tensors_size() != b.tensors_size()) {
    return false;
  }
  for (int i = 0; i < a.tensors_size(); ++i) {
    const v1::TensorInfo& x = a.tensors(i);
    const v1::TensorInfo& y = b.tensors(i);
    if (x.name() != y.name() || x.kind() != y.kind() ||
        x.dtype() != y.dtype() || x.num_bytes() != y.num_bytes() ||
        x.xxh3_64() != y.xxh3_64() ||
        !std::equal(x.shape().begin(), x.shape().end(), y.shape().begin(),
                    y.shape().end())) {
      return false;
    }
  }
  return true;
}

// One fetch as one StateDict call, or several when the connection drops: the
// first call's manifest pins the version, and a call that ends Unavailable is
// followed by one for that version from the bytes received so far
// (FetchRequest::offset), whose manifest must match the first's. The receiver,
// with its partly filled tensor and checksum state, carries over, so every
// byte is received once. Every call shares one deadline and the canceller.
// The receiver's callback error ends the fetch as it is, never resumed. A
// first call whose connection drops before its manifest is read is opened
// again, within the same budget.
class ResumableFetch {
 public:
  ResumableFetch(grpc::Channel* channel, absl::Time deadline, std::string token,
                 const FetchRequest& request, const TransferOptions& transfer)
      : channel_(channel),
        deadline_(deadline),
        token_(std::move(token)),
        request_(request),
        transfer_(transfer) {}

  // Starts the first call and returns its manifest, which lives as long as
  // this object (a copy of 100,000 tensors' descriptions is not free). A
  // connection that drops before the manifest is read is opened again, as a
  // resume from byte 0, within the same budget. An Unavailable the server
  // sent (its connection still up) or a channel that cannot connect at all
  // fails at once.
  absl::StatusOr<const v1::Manifest*> Start() {
    if (request_.offset != 0) {
      return absl::InvalidArgumentError(
          "FetchRequest.offset is set by resumed fetches, not by callers");
    }
    Open(request_);
    absl::StatusOr<v1::Manifest> manifest = attempt_->call->ReadManifest();
    while (manifest.status().code() == absl::StatusCode::kUnavailable &&
           MayResume() && ConnectionDropped()) {
      BackOff();
      Open(request_);
      manifest = attempt_->call->ReadManifest();
    }
    ASSIGN_OR_RETURN(first_, std::move(manifest));
    return &first_;
  }

  // Feeds every chunk to `receiver` until the end marker, resuming after
  // dropped connections up to transfer.max_resumes times.
  template <typename Receiver>
  absl::Status ReadToEnd(Receiver& receiver) {
    absl::Status status =
        attempt_->call->ReadToEnd(receiver, transfer_.progress);
    // A connection that dropped is resumed; the caller's own Unavailable
    // (a busy device) is not.
    while (status.code() == absl::StatusCode::kUnavailable &&
           receiver.callback_error().ok() && MayResume()) {
      BackOff();
      status = Resume(receiver.received_bytes());
      if (status.ok())
        status = attempt_->call->ReadToEnd(receiver, transfer_.progress);
    }
    if (status.code() == absl::StatusCode::kUnavailable && resumes_ > 0 &&
        receiver.callback_error().ok()) {
      return absl::UnavailableError(absl::StrCat(
          status.message(), " (gave up after ", resumes_, " resumes, at byte ",
          receiver.received_bytes(), " of ", receiver.total_bytes(), ")"));
    }
    return status;
  }

  // Stops the current call and reports `status` (see RawStateDictCall).
  absl::Status Abandon(absl::Status status) {
    return attempt_->call->Abandon(std::move(status));
  }

 private:
  // One call: its context, canceller attachment and stream, destroyed in the
  // reverse order.
  struct Attempt {
    grpc::ClientContext context;
    std::unique_ptr<CancelScope> cancel_scope;
    std::unique_ptr<RawStateDictCall> call;
  };

  void Open(const FetchRequest& request) {
    attempt_.reset();
    attempt_ = std::make_unique<Attempt>();
    if (deadline_ != absl::InfiniteFuture())
      attempt_->context.set_deadline(absl::ToChronoTime(deadline_));
    if (!token_.empty())
      attempt_->context.AddMetadata("authorization", "Bearer " + token_);
    attempt_->cancel_scope =
        std::make_unique<CancelScope>(transfer_.canceller, &attempt_->context);
    v1::StateDictRequest proto = ToProto(request);
    proto.set_chunk_bytes(transfer_.chunk_bytes);
    attempt_->call = std::make_unique<RawStateDictCall>(
        channel_, &attempt_->context, SerializeToByteBuffer(proto));
  }

  // True when the channel lost the connection it had (IDLE): not a server's
  // answer (the connection stays READY), nor a server that cannot be reached
  // (TRANSIENT_FAILURE, or CONNECTING again). The channel learns of a drop a
  // moment after the call does, so a READY channel is given that moment.
  bool ConnectionDropped() const {
    constexpr absl::Duration kStateSettles = absl::Milliseconds(20);
    grpc_connectivity_state state =
        channel_->GetState(/*try_to_connect=*/false);
    if (state == GRPC_CHANNEL_READY &&
        channel_->WaitForStateChange(
            state, absl::ToChronoTime(absl::Now() + kStateSettles))) {
      state = channel_->GetState(/*try_to_connect=*/false);
    }
    return state == GRPC_CHANNEL_IDLE;
  }

  // True while resumes are left and the next one's back-off ends before the
  // deadline (past it, the last Unavailable is the answer, not a
  // DeadlineExceeded of a call that could not start).
  bool MayResume() const {
    return resumes_ < transfer_.max_resumes &&
           absl::Now() + Delay(resumes_ + 1) < deadline_;
  }

  // The back-off before resume `n` (from 1): 50 ms, doubling, at most 1 s.
  static absl::Duration Delay(int n) {
    return std::min(absl::Milliseconds(50) * (1 << std::min(n - 1, 5)),
                    absl::Seconds(1));
  }

  // Counts one more resume and waits before it.
  void BackOff() {
    ++resumes_;
    absl::SleepFor(Delay(resumes_));
  }

  // Opens the next call at byte `received` of the pinned version and checks
  // that its manifest is the first one's.
  absl::Status Resume(uint64_t received) {
    FetchRequest request = request_;
    request.version = first_.version();
    request.min_version = 0;  // The pinned version is reached by definition.
    request.offset = received;
    Open(request);
    absl::StatusOr<v1::Manifest> manifest = attempt_->call->ReadManifest();
    if (manifest.status().code() == absl::StatusCode::kNotFound) {
      return absl::NotFoundError(absl::StrCat(
          "cannot resume the fetch of \"", first_.model(), "\" version ",
          first_.version(), " at byte ", received, " of ", first_.total_bytes(),
          ": the server no longer has that version (fetch again): ",
          manifest.status().message()));
    }
    if (!manifest.ok()) return manifest.status();
    if (!SameTransfer(first_, *manifest)) {
      return Abandon(absl::AbortedError(absl::StrCat(
          "cannot resume the fetch of \"", first_.model(), "\" version ",
          first_.version(),
          ": the server describes it differently than when the fetch began")));
    }
    return absl::OkStatus();
  }

  grpc::Channel* channel_;
  const absl::Time deadline_;
  const std::string token_;  // Sent with every attempt, as Client::Prepare.
  const FetchRequest request_;
  const TransferOptions& transfer_;
  v1::Manifest first_;
  std::unique_ptr<Attempt> attempt_;
  int resumes_ = 0;  // Calls opened again after a drop, of max_resumes.
};

// Calls `transfer.on_manifest`, if set, with the stream's tensors.
absl::Status Announce(const v1::Manifest& manifest,
                      const std::vector<TransferEntry>& entries,
                      const TransferOptions& transfer) {
  if (!transfer.on_manifest) return absl::OkStatus();
  return transfer.on_manifest(Describe(manifest, entries));
}

// A fetch's manifest (the call's) and its tensors, once on_manifest accepted
// them.
struct StartedFetch {
  const v1::Manifest& manifest;
  std::vector<TransferEntry> entries;
};

// Starts `call` and hands its manifest to `transfer.on_manifest`; on an
// error the call is abandoned.
absl::StatusOr<StartedFetch> StartAndAnnounce(ResumableFetch& call,
                                              const TransferOptions& transfer) {
  ASSIGN_OR_RETURN(const v1::Manifest* manifest, call.Start());
  absl::StatusOr<std::vector<TransferEntry>> entries =
      ToTransferEntries(manifest->tensors());
  if (!entries.ok()) return call.Abandon(entries.status());
  absl::Status accepted = Announce(*manifest, *entries, transfer);
  if (!accepted.ok()) return call.Abandon(accepted);
  return StartedFetch{*manifest, *std::move(entries)};
}

}  // namespace

absl::Time Client::Deadline() const {
  return options_.timeout == absl::InfiniteDuration()
             ? absl::InfiniteFuture()
             : absl::Now() + options_.timeout;
}

namespace {

// Called with each received tensor, its index in the manifest and its entry.
using ReceivedTensorCallback =
    std::function<absl::Status(const v1::Manifest& manifest, size_t index,
                               const TransferEntry& entry, Tensor tensor)>;

// Fetches `fetch`, handing each tensor to `on_tensor` as it completes, packed
// as `packing` says. Returns the version.
absl::StatusOr<int64_t> ReceiveTensors(
    grpc::Channel* channel, absl::Time deadline, const std::string& token,
    const FetchRequest& fetch, const TransferOptions& transfer,
    TensorPacking packing, const ReceivedTensorCallback& on_tensor) {
  ResumableFetch call(channel, deadline, token, fetch, transfer);
  ASSIGN_OR_RETURN(StartedFetch started, StartAndAnnounce(call, transfer));
  const v1::Manifest& manifest = started.manifest;
  absl::StatusOr<std::unique_ptr<ChunkReceiver>> receiver =
      ChunkReceiver::Create(
          std::move(started.entries),
          [&](size_t index, const TransferEntry& entry, Tensor tensor) {
            return on_tensor(manifest, index, entry, std::move(tensor));
          },
          /*min_chunk_bytes=*/0, packing);
  if (!receiver.ok()) return call.Abandon(receiver.status());
  RETURN_IF_ERROR(call.ReadToEnd(**receiver));
  return manifest.version();
}

}  // namespace

absl::StatusOr<int64_t> Client::StateDictStreaming(
    const FetchRequest& fetch, const TransferOptions& transfer,
    const std::function<absl::Status(const TensorDescription&, Tensor)>&
        on_tensor) {
  // Tensors in storages of their own: a consumer that keeps a few of them
  // keeps no one else's bytes alive.
  return ReceiveTensors(
      channel_.get(), Deadline(), options_.token, fetch, transfer,
      TensorPacking::kOwnStorage,
      [&](const v1::Manifest& manifest, size_t index,
          const TransferEntry& entry, Tensor tensor) {
        return on_tensor(
            Describe(manifest.tensors(static_cast<int>(index)), entry),
            std::move(tensor));
      });
}

namespace {

// Keys quoted and joined the way torch lists them, at most 20 of them.
std::string QuotedKeys(const std::vector<std::string>& keys) {
  constexpr size_t kMaxListed = 20;
  std::vector<std::string> quoted;
  for (size_t i = 0; i < keys.size() && i < kMaxListed; ++i)
    quoted.push_back(absl::StrCat("\"", keys[i], "\""));
  std::string text = absl::StrJoin(quoted, ", ");
  if (keys.size() > kMaxListed)
    absl::StrAppend(&text, " and ", keys.size() - kMaxListed, " more");
  return text;
}

// Checks what can be checked before the call: unique keys, usable memory.
absl::Status CheckDestinations(const std::vector<Destination>& destinations) {
  std::set<absl::string_view> keys;
  for (const Destination& destination : destinations) {
    if (!keys.insert(destination.key).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("duplicate destination key \"", destination.key, "\""));
    }
    absl::StatusOr<int64_t> bytes =
        NumBytes(destination.dtype, destination.shape);
    if (!bytes.ok()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "destination \"", destination.key, "\": ", bytes.status().message()));
    }
    if (*bytes > 0 && destination.data == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat("destination \"", destination.key, "\" has no memory"));
    }
  }
  return absl::OkStatus();
}

// Returns, for each fetched entry, its destination. FailedPrecondition naming
// every key without a counterpart and every shape that differs.
// With `drop_unmatched`, fetched keys without a destination get nullptr (to
// be received and dropped) instead.
absl::StatusOr<std::vector<const Destination*>> MatchDestinations(
    const std::vector<TransferEntry>& entries,
    const std::vector<Destination>& destinations, bool drop_unmatched) {
  std::map<absl::string_view, const Destination*> by_key;
  for (const Destination& destination : destinations)
    by_key[destination.key] = &destination;
  std::vector<const Destination*> targets;
  std::vector<std::string> unexpected, mismatched;
  for (const TransferEntry& entry : entries) {
    auto found = by_key.find(entry.key);
    if (found == by_key.end()) {
      if (!drop_unmatched) unexpected.push_back(entry.key);
      targets.push_back(nullptr);
      continue;
    }
    if (found->second->shape != entry.shape) {
      mismatched.push_back(absl::StrCat(
          "size mismatch for ", entry.key, ": copying a param with shape ",
          TorchSizeString(entry.shape),
          " from checkpoint, the shape in current model is ",
          TorchSizeString(found->second->shape), "."));
    }
    targets.push_back(found->second);
    by_key.erase(found);
  }
  std::vector<std::string> missing;
  for (const Destination& destination : destinations) {
    if (by_key.count(destination.key) > 0) missing.push_back(destination.key);
  }
  if (unexpected.empty() && missing.empty() && mismatched.empty())
    return targets;
  std::vector<std::string> problems;
  if (!missing.empty())
    problems.push_back(
        absl::StrCat("destinations not fetched: ", QuotedKeys(missing), "."));
  if (!unexpected.empty())
    problems.push_back(absl::StrCat(
        "fetched keys without a destination: ", QuotedKeys(unexpected), "."));
  for (std::string& problem : mismatched) problems.push_back(problem);
  return absl::FailedPreconditionError(absl::StrCat(
      "cannot fetch into the destinations: ", absl::StrJoin(problems, " ")));
}

// Receives a transfer straight into caller-owned destinations (IntoOptions::
// allow_partial_write): each piece is copied, or cast element by element,
// where it belongs, and each tensor's XXH3-64 is computed as its bytes pass
// and checked when its last byte lands. A tensor without a destination is
// handed to the piece writer, when there is one (StateDictToWriter), or
// verified and dropped. The same contract as ChunkReceiver.
class DestinationWriter {
 public:
  DestinationWriter(std::vector<TransferEntry> entries,
                    std::vector<uint64_t> sizes,
                    std::vector<const Destination*> targets,
                    std::vector<std::string>* written,
                    const Client::PieceWriter* piece_writer = nullptr)
      : entries_(std::move(entries)),
        sizes_(std::move(sizes)),
        targets_(std::move(targets)),
        written_(written),
        piece_writer_(piece_writer),
        hash_(XXH3_createState(), &XXH3_freeState) {
    for (uint64_t size : sizes_) total_ += size;
    XXH3_64bits_reset(hash_.get());
  }

  absl::Status Accept(uint64_t offset, absl::string_view data) {
    RETURN_IF_ERROR(error_);
    if (offset != received_ || data.size() > total_ - received_) {
      error_ = absl::InvalidArgumentError(
          absl::StrCat("chunk at offset ", offset, " with ", data.size(),
                       " bytes, expected offset ", received_, " of ", total_));
      return error_;
    }
    received_ += data.size();
    while (!data.empty()) {
      error_ = CompleteFullTensors();
      RETURN_IF_ERROR(error_);
      const size_t take = static_cast<size_t>(
          std::min<uint64_t>(data.size(), sizes_[current_] - filled_));
      error_ = Write(data.substr(0, take));
      RETURN_IF_ERROR(error_);
      data.remove_prefix(take);
    }
    error_ = CompleteFullTensors();
    return error_;
  }

  absl::Status Finish(uint64_t total_bytes) {
    RETURN_IF_ERROR(error_);
    // Empty tensors after the last byte, or in a transfer without bytes,
    // have had no Accept to complete them.
    error_ = CompleteFullTensors();
    RETURN_IF_ERROR(error_);
    if (received_ != total_ || total_bytes != total_) {
      return absl::InvalidArgumentError(
          absl::StrCat("end marker says ", total_bytes, " bytes; received ",
                       received_, " of ", total_));
    }
    return absl::OkStatus();
  }

  uint64_t received_bytes() const { return received_; }
  uint64_t total_bytes() const { return total_; }
  // The piece writer's error, as ChunkReceiver::callback_error.
  const absl::Status& callback_error() const { return callback_error_; }

 private:
  // Writes the next bytes of the current tensor.
  absl::Status Write(absl::string_view piece) {
    const TransferEntry& entry = entries_[current_];
    XXH3_64bits_update(hash_.get(), piece.data(), piece.size());
    if (targets_[current_] == nullptr) {  // Handed on, or verified and dropped.
      if (piece_writer_ != nullptr) {
        callback_error_ = (*piece_writer_)(current_, filled_, piece);
        RETURN_IF_ERROR(callback_error_);
      }
      filled_ += piece.size();
      return absl::OkStatus();
    }
    const Destination& target = *targets_[current_];
    if (filled_ == 0 && written_ != nullptr) written_->push_back(entry.key);
    auto* out = static_cast<uint8_t*>(target.data);
    if (entry.dtype == target.dtype) {
      std::memcpy(out + filled_, piece.data(), piece.size());
      filled_ += piece.size();
      return absl::OkStatus();
    }
    // Elements may straddle chunks: their first bytes wait in carry_.
    const size_t in_size = ElementSize(entry.dtype);
    const size_t out_size = ElementSize(target.dtype);
    const size_t partial = filled_ % in_size;
    if (partial > 0) {
      const size_t take = std::min(in_size - partial, piece.size());
      std::memcpy(carry_ + partial, piece.data(), take);
      piece.remove_prefix(take);
      filled_ += take;
      if (filled_ % in_size == 0) {
        ConvertElements(entry.dtype, carry_, target.dtype,
                        out + (filled_ / in_size - 1) * out_size, 1);
      }
    }
    const size_t whole = piece.size() / in_size;
    ConvertElements(entry.dtype, piece.data(), target.dtype,
                    out + (filled_ / in_size) * out_size, whole);
    filled_ += whole * in_size;
    piece.remove_prefix(whole * in_size);
    std::memcpy(carry_, piece.data(), piece.size());
    filled_ += piece.size();
    return absl::OkStatus();
  }

  // Verifies the tensors whose every byte has arrived.
  absl::Status CompleteFullTensors() {
    while (current_ < entries_.size() && filled_ == sizes_[current_]) {
      const TransferEntry& entry = entries_[current_];
      if (sizes_[current_] == 0 && written_ != nullptr &&
          targets_[current_] != nullptr)
        written_->push_back(entry.key);
      if (XXH3_64bits_digest(hash_.get()) != entry.checksum) {
        return absl::DataLossError(
            absl::StrCat("checksum mismatch for \"", entry.key, "\""));
      }
      XXH3_64bits_reset(hash_.get());
      ++current_;
      filled_ = 0;
    }
    return absl::OkStatus();
  }

  std::vector<TransferEntry> entries_;
  std::vector<uint64_t> sizes_;
  std::vector<const Destination*> targets_;
  std::vector<std::string>* written_;
  const Client::PieceWriter* piece_writer_;
  std::unique_ptr<XXH3_state_t, decltype(&XXH3_freeState)> hash_;
  uint8_t carry_[8] = {};
  size_t current_ = 0;   // Index of the tensor being filled.
  uint64_t filled_ = 0;  // Bytes of it received.
  uint64_t received_ = 0;
  uint64_t total_ = 0;
  absl::Status error_;
  absl::Status callback_error_;
};

// Copies verified staged tensors into their destinations.
void CopyStaged(const std::vector<Tensor>& staged,
                const std::vector<const Destination*>& targets,
                std::vector<std::string>* written,
                const std::vector<TransferEntry>& entries) {
  for (size_t i = 0; i < staged.size(); ++i) {
    if (targets[i] == nullptr) continue;
    ConvertElements(staged[i].dtype(), staged[i].data(), targets[i]->dtype,
                    targets[i]->data,
                    static_cast<size_t>(staged[i].num_elements()));
    if (written != nullptr) written->push_back(entries[i].key);
  }
}

}  // namespace

namespace {

// Picks each fetched tensor's destination (nullptr: drop it) from the
// manifest.
using DestinationResolver =
    std::function<absl::StatusOr<std::vector<const Destination*>>(
        const v1::Manifest&, const std::vector<TransferEntry>&)>;

// The StateDictInto call on `context` (prepared by the caller): read the
// manifest, resolve destinations, then receive in the mode `into` chooses.
absl::StatusOr<int64_t> FetchInto(grpc::Channel* channel, absl::Time deadline,
                                  const std::string& token,
                                  const FetchRequest& fetch,
                                  const DestinationResolver& resolve,
                                  const TransferOptions& transfer,
                                  const IntoOptions& into) {
  if (into.written_keys != nullptr) into.written_keys->clear();
  ResumableFetch call(channel, deadline, token, fetch, transfer);
  ASSIGN_OR_RETURN(const v1::Manifest* started, call.Start());
  const v1::Manifest& manifest = *started;
  absl::StatusOr<std::vector<TransferEntry>> entries =
      ToTransferEntries(manifest.tensors());
  if (!entries.ok()) return call.Abandon(entries.status());
  absl::StatusOr<std::vector<const Destination*>> targets =
      resolve(manifest, *entries);
  if (!targets.ok()) return call.Abandon(targets.status());
  if (into.allow_partial_write) {
    absl::StatusOr<std::vector<uint64_t>> sizes = TransferSizes(*entries);
    if (!sizes.ok()) return call.Abandon(sizes.status());
    DestinationWriter writer(*entries, std::move(*sizes), *targets,
                             into.written_keys);
    RETURN_IF_ERROR(call.ReadToEnd(writer));
    return manifest.version();
  }
  std::vector<Tensor> staged;
  absl::StatusOr<std::unique_ptr<ChunkReceiver>> receiver =
      ChunkReceiver::Create(
          *entries,
          [&](size_t, const TransferEntry&, Tensor tensor) {
            staged.push_back(std::move(tensor));
            return absl::OkStatus();
          },
          /*min_chunk_bytes=*/0, TensorPacking::kPackSmall);
  if (!receiver.ok()) return call.Abandon(receiver.status());
  RETURN_IF_ERROR(call.ReadToEnd(**receiver));
  CopyStaged(staged, *targets, into.written_keys, *entries);
  return manifest.version();
}

}  // namespace

absl::StatusOr<int64_t> Client::StateDictToWriter(
    const FetchRequest& fetch, const TransferOptions& transfer,
    const PieceWriter& write) {
  ResumableFetch call(channel_.get(), Deadline(), options_.token, fetch,
                      transfer);
  ASSIGN_OR_RETURN(StartedFetch started, StartAndAnnounce(call, transfer));
  absl::StatusOr<std::vector<uint64_t>> sizes = TransferSizes(started.entries);
  if (!sizes.ok()) return call.Abandon(sizes.status());
  const std::vector<const Destination*> no_targets(started.entries.size(),
                                                   nullptr);
  DestinationWriter writer(std::move(started.entries), std::move(*sizes),
                           no_targets, nullptr, &write);
  RETURN_IF_ERROR(call.ReadToEnd(writer));
  return started.manifest.version();
}

namespace {

// The shared-memory way of a fetch (ClientOptions::local_socket): nullopt
// when there is no local socket to use, and the caller goes through gRPC.
absl::StatusOr<absl::optional<LocalFetched>> FetchThroughSharedMemory(
    const ClientOptions& options, const FetchRequest& fetch,
    const TransferOptions& transfer, const LocalManifestCallback& on_manifest) {
  if (options.local_socket.empty()) return absl::nullopt;
  const auto cancelled = [&] {
    return transfer.canceller != nullptr && transfer.canceller->cancelled();
  };
  if (cancelled()) return absl::CancelledError("fetch cancelled");
  LocalFetchSettings settings;
  settings.socket_path = options.local_socket;
  settings.token = options.token;
  settings.timeout = options.timeout;
  settings.verify_exports = options.verify_shared_memory;
  ASSIGN_OR_RETURN(absl::optional<LocalFetched> fetched,
                   FetchLocally(settings, ToProto(fetch), on_manifest));
  if (!fetched.has_value()) return fetched;
  if (cancelled()) return absl::CancelledError("fetch cancelled");
  if (transfer.progress) {
    const uint64_t total = fetched->manifest.total_bytes();
    transfer.progress(total, total);
  }
  return fetched;
}

// StateDictInto through shared memory: destinations are resolved from the
// manifest before any byte moves, and written only once every tensor in the
// region has been verified, so a failure leaves them untouched (which keeps
// the promises of both IntoOptions modes).
absl::StatusOr<absl::optional<int64_t>> FetchIntoThroughSharedMemory(
    const ClientOptions& options, const FetchRequest& fetch,
    const DestinationResolver& resolve, const TransferOptions& transfer,
    const IntoOptions& into) {
  if (into.written_keys != nullptr) into.written_keys->clear();
  std::vector<const Destination*> targets;
  ASSIGN_OR_RETURN(
      const absl::optional<LocalFetched> fetched,
      FetchThroughSharedMemory(
          options, fetch, transfer,
          [&](const v1::Manifest& manifest,
              const std::vector<TransferEntry>& entries) -> absl::Status {
            ASSIGN_OR_RETURN(targets, resolve(manifest, entries));
            return absl::OkStatus();
          }));
  if (!fetched.has_value()) return absl::nullopt;
  CopyStaged(fetched->tensors, targets, into.written_keys, fetched->entries);
  return fetched->manifest.version();
}

// StateDictInto through shared memory when `options` say the daemon is local
// and its socket answers, through gRPC otherwise.
absl::StatusOr<int64_t> FetchIntoEitherWay(
    const ClientOptions& options, grpc::Channel* channel, absl::Time deadline,
    const FetchRequest& fetch, const DestinationResolver& resolve,
    const TransferOptions& transfer, const IntoOptions& into) {
  ASSIGN_OR_RETURN(
      const absl::optional<int64_t> local,
      FetchIntoThroughSharedMemory(options, fetch, resolve, transfer, into));
  if (local.has_value()) return *local;
  return FetchInto(channel, deadline, options.token, fetch, resolve, transfer,
                   into);
}

}  // namespace

absl::StatusOr<int64_t> Client::StateDictInto(
    const FetchRequest& fetch, const std::vector<Destination>& destinations,
    const TransferOptions& transfer, const IntoOptions& into) {
  if (into.written_keys != nullptr) into.written_keys->clear();
  RETURN_IF_ERROR(CheckDestinations(destinations));
  const DestinationResolver resolve =
      [&](const v1::Manifest&, const std::vector<TransferEntry>& entries) {
        return MatchDestinations(entries, destinations,
                                 /*drop_unmatched=*/false);
      };
  return FetchIntoEitherWay(options_, channel_.get(), Deadline(), fetch,
                            resolve, transfer, into);
}

absl::StatusOr<int64_t> Client::StateDictInto(
    const FetchRequest& fetch, const DestinationAllocator& allocate,
    const TransferOptions& transfer, const IntoOptions& into) {
  std::vector<Destination> destinations;
  const DestinationResolver resolve =
      [&](const v1::Manifest& manifest,
          const std::vector<TransferEntry>& entries)
      -> absl::StatusOr<std::vector<const Destination*>> {
    std::vector<TensorDescription> tensors;
    tensors.reserve(entries.size());
    for (size_t i = 0; i < entries.size(); ++i)
      tensors.push_back(
          Describe(manifest.tensors(static_cast<int>(i)), entries[i]));
    ASSIGN_OR_RETURN(destinations, allocate(tensors));
    RETURN_IF_ERROR(CheckDestinations(destinations));
    return MatchDestinations(entries, destinations,
                             /*drop_unmatched=*/true);
  };
  return FetchIntoEitherWay(options_, channel_.get(), Deadline(), fetch,
                            resolve, transfer, into);
}

absl::StatusOr<FetchedStateDict> Client::StateDict(
    const FetchRequest& request, const TransferOptions& transfer) {
  FetchedStateDict fetched;
  fetched.model = request.model;
  const LocalManifestCallback on_manifest =
      [&](const v1::Manifest& manifest,
          const std::vector<TransferEntry>& entries) {
        return transfer.on_manifest
                   ? transfer.on_manifest(Describe(manifest, entries))
                   : absl::OkStatus();
      };
  ASSIGN_OR_RETURN(
      absl::optional<LocalFetched> local,
      FetchThroughSharedMemory(options_, request, transfer, on_manifest));
  if (local.has_value()) {
    fetched.version = local->manifest.version();
    for (size_t i = 0; i < local->tensors.size(); ++i) {
      RETURN_IF_ERROR(fetched.state.Insert(
          local->entries[i].key, std::move(local->tensors[i]),
          FromProto(local->manifest.tensors(static_cast<int>(i)).kind())
              .value()));
    }
    return fetched;
  }
  ASSIGN_OR_RETURN(
      fetched.version,
      ReceiveTensors(channel_.get(), Deadline(), options_.token, request,
                     transfer, transfer.packing,
                     [&](const v1::Manifest& manifest, size_t index,
                         const TransferEntry& entry, Tensor tensor) {
                       if (index == 0)
                         fetched.state.Reserve(manifest.tensors_size());
                       const v1::TensorInfo& info =
                           manifest.tensors(static_cast<int>(index));
                       return fetched.state.Insert(
                           entry.key, std::move(tensor),
                           FromProto(info.kind()).value());
                     }));
  return fetched;
}

namespace {

// One LoadStateDict call written as raw messages, so that chunks go out as
// slices of the tensors' storage (FrameLoadChunk), never copied into a
// message. The bytes on the wire are exactly the proto's.
class RawLoadCall {
 public:
  // Starts the call; `context` must outlive this object.
  RawLoadCall(grpc::Channel* channel, grpc::ClientContext* context)
      : writer_(grpc::internal::ClientWriterFactory<grpc::ByteBuffer>::Create(
            channel, Method(), context, &response_)) {}

  // Sends one message; false once the server has answered (e.g. it refused
  // the header), whose status Finish returns.
  bool Write(const grpc::ByteBuffer& message) {
    open_ = open_ && writer_->Write(message);
    return open_;
  }

  // Ends the stream and returns the server's answer.
  absl::StatusOr<LoadOutcome> Finish() {
    if (open_) writer_->WritesDone();
    RETURN_IF_ERROR(FromGrpcStatus(writer_->Finish()));
    v1::LoadStateDictResponse response;
    if (!grpc::SerializationTraits<v1::LoadStateDictResponse>::Deserialize(
             &response_, &response)
             .ok()) {
      return absl::DataLossError("malformed LoadStateDictResponse");
    }
    return FromProto(response);
  }

 private:
  static const grpc::internal::RpcMethod& Method() {
    static const grpc::internal::RpcMethod kLoadStateDict(
        "/modelstate.v1.ModelState/LoadStateDict",
        grpc::internal::RpcMethod::CLIENT_STREAMING);
    return kLoadStateDict;
  }

  grpc::ByteBuffer response_;
  std::unique_ptr<grpc::ClientWriter<grpc::ByteBuffer>> writer_;
  bool open_ = true;
};

// Counts the pieces of tensor memory one call handed to gRPC and it still
// holds. The call returns only once gRPC has let go of every one: a caller may
// lend memory that lives only as long as the call (the Python binding does),
// and gRPC may drop its last reference after the call's status arrived (a
// write that was in flight when the server ended the call early).
class LentMemory {
 public:
  // Returns `storage` as a handle that counts as lent until gRPC releases it.
  static std::shared_ptr<const Storage> Lend(
      const std::shared_ptr<LentMemory>& lent,
      std::shared_ptr<const Storage> storage) {
    {
      absl::MutexLock lock(&lent->mu_);
      ++lent->held_;
    }
    auto loan = std::make_shared<Loan>(lent, std::move(storage));
    return std::shared_ptr<const Storage>(loan, loan->storage.get());
  }

  // Waits until every lent piece is back. gRPC releases a piece once its
  // bytes are written or dropped with the stream; it does not wait on the
  // peer once the call has ended.
  void WaitUntilReturned() {
    absl::MutexLock lock(&mu_);
    mu_.Await(absl::Condition(
        +[](int64_t* held) { return *held == 0; }, &held_));
  }

 private:
  struct Loan {
    Loan(std::shared_ptr<LentMemory> lent, std::shared_ptr<const Storage> s)
        : lent(std::move(lent)), storage(std::move(s)) {}
    ~Loan() {
      absl::MutexLock lock(&lent->mu_);
      --lent->held_;
    }
    std::shared_ptr<LentMemory> lent;  // Outlives this unlock.
    std::shared_ptr<const Storage> storage;
  };

  absl::Mutex mu_;
  int64_t held_ ABSL_GUARDED_BY(mu_) = 0;
};

// Hashes each tensor (XXH3-64) from the pieces of the chunks that send it, in
// stream order, so that no pass over the data precedes the first byte sent.
class SendHasher {
 public:
  explicit SendHasher(const std::vector<Tensor>& tensors)
      : state_(XXH3_createState(), &XXH3_freeState) {
    sizes_.reserve(tensors.size());
    for (const Tensor& tensor : tensors) sizes_.push_back(tensor.num_bytes());
    checksums_.reserve(tensors.size());
    XXH3_64bits_reset(state_.get());
  }

  // Adds the next piece of the stream, which may span tensors that lie back
  // to back in one storage (ChunkSender).
  void Add(absl::Span<const uint8_t> piece) {
    while (!piece.empty()) {
      CompleteFullTensors();
      if (checksums_.size() == sizes_.size()) return;  // Past the end.
      const uint64_t take =
          std::min<uint64_t>(piece.size(), sizes_[checksums_.size()] - filled_);
      XXH3_64bits_update(state_.get(), piece.data(), take);
      filled_ += take;
      piece.remove_prefix(take);
    }
  }

  // Every tensor's checksum in stream order, once every piece was added.
  std::vector<uint64_t> Finish() {
    CompleteFullTensors();
    return std::move(checksums_);
  }

 private:
  void CompleteFullTensors() {
    while (checksums_.size() < sizes_.size() &&
           filled_ == sizes_[checksums_.size()]) {
      checksums_.push_back(XXH3_64bits_digest(state_.get()));
      XXH3_64bits_reset(state_.get());
      filled_ = 0;
    }
  }

  std::unique_ptr<XXH3_state_t, decltype(&XXH3_freeState)> state_;
  std::vector<uint64_t> sizes_;
  std::vector<uint64_t> checksums_;
  uint64_t filled_ = 0;  // Bytes of the current tensor hashed.
};

}  // namespace

namespace {

// Sends a load over `call`: the header with no checksum, the chunks framed
// around the tensors' memory (lent through `lent`), then the end marker with
// every tensor's checksum, hashed as its bytes went out ("verify at End",
// docs/protocol.md). Returns the server's answer.
absl::StatusOr<LoadOutcome> SendLoad(RawLoadCall& call, const LoadRequest& load,
                                     const modelstate::StateDict& state,
                                     uint32_t chunk_bytes,
                                     const ProgressCallback& progress,
                                     const std::shared_ptr<LentMemory>& lent) {
  ChunkSender sender(state.Tensors(), chunk_bytes);
  SendHasher hasher(sender.tensors());
  v1::LoadStateDictRequest message;
  *message.mutable_header() =
      ToLoadHeaderWithoutChecksums(load, state, sender.total_bytes());
  bool open = call.Write(SerializeToByteBuffer(message));
  ChunkSender::Chunk chunk;
  while (open && sender.Next(&chunk)) {
    for (absl::Span<const uint8_t> piece : chunk.pieces) hasher.Add(piece);
    for (std::shared_ptr<const Storage>& owner : chunk.owners)
      owner = LentMemory::Lend(lent, std::move(owner));
    open = call.Write(FrameLoadChunk(chunk));
    if (progress) progress(chunk.offset + chunk.size, sender.total_bytes());
  }
  if (open) {
    v1::End* end = message.mutable_end();
    end->set_total_bytes(sender.total_bytes());
    const std::vector<uint64_t> checksums = hasher.Finish();
    end->mutable_xxh3_64()->Add(checksums.begin(), checksums.end());
    call.Write(SerializeToByteBuffer(message));
  }
  return call.Finish();
}

}  // namespace

absl::StatusOr<LoadOutcome> Client::LoadStateDict(
    const LoadRequest& load, const modelstate::StateDict& state,
    const TransferOptions& transfer) {
  ASSIGN_OR_RETURN(const uint32_t chunk_bytes,
                   ResolveChunkBytes(transfer.chunk_bytes, kDefaultChunkBytes));
  auto lent = std::make_shared<LentMemory>();
  absl::StatusOr<LoadOutcome> outcome;
  {
    grpc::ClientContext context;
    Prepare(&context);
    CancelScope cancel_scope(transfer.canceller, &context);
    RawLoadCall call(channel_.get(), &context);
    outcome = SendLoad(call, load, state, chunk_bytes, transfer.progress, lent);
  }
  // The call is gone, and with it every message gRPC kept for it.
  lent->WaitUntilReturned();
  return outcome;
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

absl::Status Client::Watch(
    const std::string& model,
    const std::function<bool(const ModelEvent&)>& on_event,
    CallCanceller* canceller, int64_t min_version) {
  v1::WatchModelRequest request;
  request.set_model(model);
  request.set_min_version(min_version);
  return WatchWith(request, on_event, canceller);
}

absl::Status Client::WatchAll(
    const std::function<bool(const ModelEvent&)>& on_event,
    CallCanceller* canceller) {
  v1::WatchModelRequest request;
  request.set_all_models(true);
  return WatchWith(request, on_event, canceller);
}

absl::Status Client::WatchWith(
    const v1::WatchModelRequest& request,
    const std::function<bool(const ModelEvent&)>& on_event,
    CallCanceller* canceller) {
  grpc::ClientContext context;
  Prepare(&context);
  CancelScope cancel_scope(canceller, &context);
  std::unique_ptr<grpc::ClientReader<v1::WatchModelResponse>> reader =
      stub_->WatchModel(&context, request);
  v1::WatchModelResponse response;
  absl::Status stopped;  // Why we stopped reading early, if we did.
  while (reader->Read(&response)) {
    absl::StatusOr<ModelEvent> event = FromProto(response);
    if (!event.ok()) {
      stopped = absl::DataLossError(event.status().message());
    } else if (on_event(*event)) {
      continue;
    }
    context.TryCancel();
    while (reader->Read(&response)) {
    }
    reader->Finish();
    return stopped;
  }
  return FromGrpcStatus(reader->Finish());
}

}  // namespace modelstate

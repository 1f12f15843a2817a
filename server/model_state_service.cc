#include "server/model_state_service.h"

#include <algorithm>
#include <atomic>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "model/names.h"
#include "common/status_macros.h"
#include "transfer/transfer.h"
#include "store/watch_queue.h"
#include "grpcpp/alarm.h"
#include "grpcpp/support/proto_buffer_reader.h"
#include "proto/chunk_frame.h"
#include "proto/convert.h"
#include "proto/grpc_status.h"
#include "server/metrics.h"
#include "server/rpc_log.h"

namespace modelstate {
namespace {

// Finishes a unary call: converts the status and writes the log line.
grpc::ServerUnaryReactor* FinishUnary(grpc::CallbackServerContext* context,
                                      RpcRecord& record,
                                      const absl::Status& status) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  const grpc::Status grpc_status = ToGrpcStatus(status);
  record.Log(grpc_status);
  reactor->Finish(grpc_status);
  return reactor;
}

// The size bounds of a request's names, checked before anything logs, looks
// up or echoes them.
absl::Status CheckRequestNames(absl::string_view model,
                               absl::string_view module = {}) {
  RETURN_IF_ERROR(CheckNameSize("model name", model, kMaxModelNameLength));
  return CheckNameSize("module path", module, kMaxKeyLength);
}

absl::Status CheckRequestNames(const v1::StateDictRequest& request) {
  RETURN_IF_ERROR(CheckRequestNames(request.model(), request.module()));
  for (const std::string& key : request.keys())
    RETURN_IF_ERROR(CheckNameSize("key", key, kMaxKeyLength));
  return absl::OkStatus();
}

absl::Status CheckRequestNames(const v1::LoadHeader& header) {
  // Tensor keys are the store's to bound (ValidateTensorKey), before any use.
  RETURN_IF_ERROR(CheckRequestNames(header.model(), header.module()));
  for (const auto& [module, class_name] : header.class_names()) {
    RETURN_IF_ERROR(CheckNameSize("module path", module, kMaxKeyLength));
    RETURN_IF_ERROR(CheckNameSize("class name", class_name, kMaxKeyLength));
  }
  return absl::OkStatus();
}

const grpc::Status& ShuttingDown() {
  static const grpc::Status* const kStatus =
      new grpc::Status(grpc::StatusCode::UNAVAILABLE, "server shutting down");
  return *kStatus;
}

// A streaming reactor that refuses its call at once with UNAVAILABLE, for
// calls arriving while the server drains.
template <typename Reactor>
class Refused : public Reactor {
 public:
  Refused() { this->Finish(ShuttingDown()); }
  void OnDone() override { delete this; }
};

// Streams a snapshot: manifest, chunks, end marker; one write in flight. It is
// a raw handler so that chunks go out without copying tensor bytes: each chunk
// message is framed by FrameStateDictChunk around slices of tensor storage.
class StateDictReactor : public grpc::ServerWriteReactor<grpc::ByteBuffer>,
                         public IdleStream {
 public:
  StateDictReactor(ModelStateService* service,
                   grpc::CallbackServerContext* context, ModelStore* store,
                   const grpc::ByteBuffer& raw_request)
      : active_(service),
        service_(service),
        context_(context),
        store_(store),
        record_("StateDict", service->options().log_rpcs,
                service->options().metrics) {
    grpc::ByteBuffer copy(raw_request);
    if (!grpc::SerializationTraits<v1::StateDictRequest>::Deserialize(&copy,
                                                                      &request_)
             .ok()) {
      FinishWith(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                              "malformed StateDictRequest"));
      return;
    }
    record_.set_model(request_.model());
    absl::Status admitted = CheckRequestNames(request_);
    if (admitted.ok()) {
      admitted = service->Admit(*context, Action::kStateDict, request_.model())
                     .status();
    }
    if (!admitted.ok()) {
      FinishWith(ToGrpcStatus(admitted));
      return;
    }
    if (request_.min_version() > 0) {
      // The waiter's thread only hands over: the fetch (and any dtype cast)
      // runs on gRPC's executor, as without a wait, so that one slow
      // preparation does not hold up the other waits.
      wait_id_ = service_->version_waiter().Wait(
          request_.model(), request_.min_version(),
          service_->MinVersionDeadline(*context), [this](absl::Status reached) {
            reached_ = std::move(reached);
            handoff_.Set(std::chrono::system_clock::now(),
                         [this](bool) { Start(reached_); });
          });
      return;
    }
    Start(absl::OkStatus());
  }

  // A call that ends while it waits for min_version.
  void OnCancel() override {
    if (wait_id_ != 0 && service_->version_waiter().Cancel(wait_id_))
      FinishWith(grpc::Status(grpc::StatusCode::CANCELLED,
                              "cancelled while waiting for min_version"));
  }

  // A client that stops reading pins its version; cancel it.
  void ExpireIfIdleSince(absl::Time cutoff) override {
    if (absl::FromUnixNanos(last_progress_.load()) < cutoff)
      context_->TryCancel();
  }

  void OnWriteDone(bool ok) override {
    last_progress_ = absl::GetCurrentTimeNanos();
    if (!ok) {
      FinishWith(grpc::Status(grpc::StatusCode::CANCELLED, "client went away"));
      return;
    }
    if (end_sent_) {
      FinishWith(grpc::Status::OK);
      return;
    }
    if (sender_->Next(&chunk_)) {
      buffer_ = FrameStateDictChunk(chunk_);
      record_.add_bytes(chunk_.size);
    } else {
      v1::StateDictResponse end;
      end.mutable_end()->set_total_bytes(sender_->total_bytes());
      buffer_ = SerializeToByteBuffer(end);
      end_sent_ = true;
    }
    StartWrite(&buffer_);
  }

  void OnDone() override {
    // Once Cancel returns, Start is not running on the waiter's thread.
    if (wait_id_ != 0) service_->version_waiter().Cancel(wait_id_);
    service_->Untrack(this);
    record_.Log(status_);
    delete this;
  }

 private:
  // Serves the request once the model is at min_version (`reached` OK), or
  // ends the call with why it is not.
  void Start(const absl::Status& reached) {
    absl::Status prepared = reached;
    if (prepared.ok())
      prepared = Prepare(store_, service_->options(), request_);
    if (!prepared.ok()) {
      FinishWith(ToGrpcStatus(prepared));
      return;
    }
    // Idleness counts from the first write, not from the wait's start.
    last_progress_ = absl::GetCurrentTimeNanos();
    service_->Track(this);
    StartWrite(&buffer_);
  }

  // Decode, one core call, encode: the manifest goes into buffer_ and the
  // tensors into the sender.
  absl::Status Prepare(ModelStore* store, const ServiceOptions& service,
                       const v1::StateDictRequest& proto) {
    ASSIGN_OR_RETURN(const FetchRequest request, FromProto(proto));
    ASSIGN_OR_RETURN(
        uint32_t chunk_bytes,
        ResolveChunkBytes(proto.chunk_bytes(), service.default_chunk_bytes));
    // A client's own tiny chunk size would make the server handle a message
    // per few bytes; the server's default is the operator's choice.
    if (proto.chunk_bytes() != 0)
      chunk_bytes = std::max(chunk_bytes, service.min_chunk_bytes);
    ASSIGN_OR_RETURN(const FetchPlan plan, store->Fetch(request));
    sender_ = std::make_unique<ChunkSender>(plan.state->Tensors(), chunk_bytes,
                                            plan.offset);
    v1::StateDictResponse manifest;
    *manifest.mutable_manifest() = ToManifest(plan, sender_->total_bytes());
    buffer_ = SerializeToByteBuffer(manifest);
    return absl::OkStatus();
  }

  void FinishWith(const grpc::Status& status) {
    status_ = status;
    Finish(status);
  }

  ModelStateService::ActiveCall active_;
  ModelStateService* service_;
  grpc::CallbackServerContext* context_;
  ModelStore* store_;
  std::atomic<int64_t> last_progress_{absl::GetCurrentTimeNanos()};
  RpcRecord record_;
  v1::StateDictRequest request_;
  int64_t wait_id_ = 0;   // A pending min_version wait, or 0.
  absl::Status reached_;  // How it ended.
  grpc::Alarm handoff_;
  grpc::ByteBuffer buffer_;
  std::unique_ptr<ChunkSender> sender_;
  ChunkSender::Chunk chunk_;
  bool end_sent_ = false;
  grpc::Status status_;
};

// Receives a load: header (validated before any data), chunks into preallocated
// tensors, end marker (with the checksums the client computed while sending,
// if it sent them there), then one atomic commit. Anything else leaves the
// model untouched. It is a raw handler so that chunk bytes are copied once,
// from the received slices into the staged tensors (ReadLoadFrame).
class LoadReactor : public grpc::ServerReadReactor<grpc::ByteBuffer>,
                    public IdleStream {
 public:
  LoadReactor(ModelStateService* service, grpc::CallbackServerContext* context,
              ModelStore* store, grpc::ByteBuffer* response)
      : active_(service),
        service_(service),
        store_(store),
        response_(response),
        record_("LoadStateDict", service->options().log_rpcs,
                service->options().metrics),
        peer_(context->peer()) {
    service_->Track(this);
    // Who it is is known now; what it may write once the header names the
    // model. An unknown caller is refused before anything is read.
    absl::StatusOr<Caller> caller = service_->Authenticate(*context);
    if (!caller.ok()) {
      absl::MutexLock lock(&mu_);
      FinishLocked(caller.status());
      return;
    }
    caller_ = *std::move(caller);
    StartRead(&buffer_);
  }

  // A client that stops sending holds its reservation and blocks other loads
  // under the memory limit; end its load.
  void ExpireIfIdleSince(absl::Time cutoff) override {
    // A busy reactor is making progress (or committing): skip it.
    if (!mu_.TryLock()) return;
    if (!finished_ && last_progress_ < cutoff) {
      FinishLocked(absl::DeadlineExceededError(absl::StrCat(
          "load stream sent nothing for ",
          absl::FormatDuration(service_->options().stream_idle_timeout),
          "; nothing was changed")));
    }
    mu_.Unlock();
  }

  void OnReadDone(bool ok) override {
    absl::MutexLock lock(&mu_);
    if (finished_) return;  // Expired while this read was pending.
    last_progress_ = absl::Now();
    if (!ok) {
      FinishLocked(absl::InvalidArgumentError(
          "load stream ended before its end marker; nothing was changed"));
      return;
    }
    absl::Status handled = Handle();
    if (!handled.ok()) {
      FinishLocked(handled);
      return;
    }
    if (committed_) {
      FinishLocked(absl::OkStatus());
      return;
    }
    StartRead(&buffer_);
  }

  void OnDone() override {
    service_->Untrack(this);
    record_.Log(status_);
    delete this;  // Drops any pending load: its staging memory and reservation
                  // go with it.
  }

 private:
  absl::Status Handle() {
    // A chunk is bounded as a whole, then copied piece by piece from where
    // its bytes lie in the received slices.
    ASSIGN_OR_RETURN(const bool chunk,
                     ReadLoadFrame(
                         &buffer_, &request_,
                         [this](uint64_t offset, uint64_t size) {
                           if (receiver_ == nullptr) {
                             return absl::InvalidArgumentError(
                                 "a load must start with its header");
                           }
                           record_.add_bytes(size);
                           bytes_received_ += size;
                           return receiver_->BeginChunk(offset, size);
                         },
                         [this](uint64_t offset, absl::string_view piece) {
                           return receiver_->Accept(offset, piece);
                         }));
    if (chunk) return absl::OkStatus();
    switch (request_.kind_case()) {
      case v1::LoadStateDictRequest::kHeader:
        return HandleHeader(request_.header());
      case v1::LoadStateDictRequest::kEnd:
        return HandleEnd(request_.end());
      default:
        return absl::InvalidArgumentError("empty load message");
    }
  }

  absl::Status HandleHeader(const v1::LoadHeader& header) {
    if (receiver_ != nullptr)
      return absl::InvalidArgumentError("a load has only one header");
    record_.set_model(header.model());
    RETURN_IF_ERROR(CheckRequestNames(header));
    RETURN_IF_ERROR(
        service_->Authorize(*caller_, Action::kLoadStateDict, header.model()));
    // Before the manifest is copied into entries and specs (a 60 MB header
    // of a million tensors would cost hundreds of MB to convert).
    RETURN_IF_ERROR(store_->CheckLoadSize(header.tensors_size()));
    ASSIGN_OR_RETURN(LoadRequest request, FromProto(header));
    ASSIGN_OR_RETURN(std::vector<TransferEntry> entries,
                     ToTransferEntries(header.tensors()));
    ASSIGN_OR_RETURN(pending_,
                     BeginLoad(std::move(request), ToTensorSpecs(entries)));
    ASSIGN_OR_RETURN(receiver_, ChunkReceiver::CreateVerifyingAtEnd(
                                    std::move(entries),
                                    service_->options().min_chunk_bytes));
    if (receiver_->total_bytes() != header.total_bytes()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "header says ", header.total_bytes(),
          " bytes but its tensors add up to ", receiver_->total_bytes()));
    }
    return absl::OkStatus();
  }

  // A load that creates its model is a create, which needs the admin role.
  // Whoever lacks it loads with creation off, so that neither a missing model
  // nor one deleted after this check is ever created by the load; the store's
  // NotFound for the missing model becomes the PermissionDenied of the create.
  absl::StatusOr<std::unique_ptr<PendingLoad>> BeginLoad(
      LoadRequest request, std::vector<TensorSpec> specs) {
    absl::Status may_create = absl::OkStatus();
    if (request.create_if_missing) {
      may_create =
          caller_->Authorize(Action::kLoadStateDictCreate, request.model);
      request.create_if_missing = may_create.ok();
    }
    absl::StatusOr<std::unique_ptr<PendingLoad>> pending =
        store_->BeginLoad(request, std::move(specs));
    if (pending.ok() && (*pending)->creates_model())
      audit_action_ = Action::kLoadStateDictCreate;
    if (may_create.ok() || !absl::IsNotFound(pending.status()) ||
        store_->GetSnapshot(request.model).ok()) {
      return pending;
    }
    audit_action_ = Action::kLoadStateDictCreate;
    RETURN_IF_ERROR(
        service_->Authorize(*caller_, audit_action_, request.model));
    return pending;
  }

  absl::Status HandleEnd(const v1::End& end) {
    if (receiver_ == nullptr)
      return absl::InvalidArgumentError("a load must start with its header");
    absl::StatusOr<std::vector<Tensor>> tensors = receiver_->Finish(
        end.total_bytes(),
        absl::MakeConstSpan(end.xxh3_64().data(), end.xxh3_64().size()));
    receiver_.reset();
    if (!tensors.ok()) return tensors.status();
    ASSIGN_OR_RETURN(
        const LoadOutcome outcome,
        store_->CommitLoad(std::move(pending_), *std::move(tensors)));
    *response_ = SerializeToByteBuffer(ToProto(outcome));
    version_ = outcome.version;
    committed_ = true;
    return absl::OkStatus();
  }

  void FinishLocked(const absl::Status& status)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    finished_ = true;
    pending_.reset();
    receiver_.reset();
    status_ = ToGrpcStatus(status);
    // Before Finish, so that the line is written by the time the client
    // learns the outcome.
    service_->Audit(caller_ ? &*caller_ : nullptr, audit_action_,
                    record_.model(), version_, bytes_received_,
                    status_.error_code(), peer_);
    Finish(status_);
  }

  ModelStateService::ActiveCall active_;
  ModelStateService* service_;
  absl::Mutex mu_;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  absl::Time last_progress_ ABSL_GUARDED_BY(mu_) = absl::Now();
  ModelStore* store_;
  grpc::ByteBuffer* response_;
  RpcRecord record_;
  grpc::ByteBuffer buffer_;
  v1::LoadStateDictRequest request_;  // A message other than a chunk.
  std::unique_ptr<PendingLoad> pending_;
  std::unique_ptr<ChunkReceiver> receiver_;
  bool committed_ = false;
  grpc::Status status_;
  // For the audit line.
  const std::string peer_;
  std::optional<Caller> caller_;
  // LoadStateDict+create once the load turns out to create its model.
  Action audit_action_ = Action::kLoadStateDict;
  int64_t version_ = 0;
  uint64_t bytes_received_ = 0;
};

}  // namespace

// Streams one model's events, or every model's (a follower's watch); one write
// in flight, later events queue behind it. With min_version, a one-model watch
// starts once the model has reached it, so its first event is CURRENT at that
// version or later. A watch over every model shows only the models its caller
// may read.
class WatchReactor : public grpc::ServerWriteReactor<v1::WatchModelResponse> {
 public:
  WatchReactor(ModelStateService* service, grpc::CallbackServerContext* context,
               ModelStore* store, const v1::WatchModelRequest& request,
               absl::Time wait_deadline)
      : active_(service),
        service_(service),
        store_(store),
        model_(request.model()),
        all_models_(request.all_models()),
        record_("WatchModel", service->options().log_rpcs,
                service->options().metrics) {
    record_.set_model(model_);
    {
      absl::MutexLock lock(&mu_);
      if (all_models_) {
        queue_ = std::make_unique<LatestEventQueue>();
      } else {
        queue_ = std::make_unique<WatchQueue>(kMaxQueuedWatchEvents);
      }
    }
    absl::Status admitted = Admit(context, request);
    if (!admitted.ok()) {
      absl::MutexLock lock(&mu_);
      FinishLocked(ToGrpcStatus(admitted));
      return;
    }
    if (request.min_version() > 0) {
      wait_id_ = service_->version_waiter().Wait(
          model_, request.min_version(), wait_deadline,
          [this](absl::Status reached) { StartWatching(reached); });
      return;
    }
    StartWatching(absl::OkStatus());
  }

  void Enqueue(const ModelEvent& event) {
    if (all_models_ && event.type != ModelEvent::Type::kListed &&
        !caller_->CanRead(event.model)) {
      return;
    }
    absl::MutexLock lock(&mu_);
    if (finished_) return;
    queue_->Push(event);
    if (!writing_ && started_) WriteNextLocked();
  }

  void Stop() {
    absl::MutexLock lock(&mu_);
    FinishLocked(
        grpc::Status(grpc::StatusCode::UNAVAILABLE, "server shutting down"));
  }

  void OnWriteDone(bool ok) override {
    absl::MutexLock lock(&mu_);
    writing_ = false;
    if (!ok) {
      FinishLocked(
          grpc::Status(grpc::StatusCode::CANCELLED, "client went away"));
      return;
    }
    WriteNextLocked();
  }

  void OnCancel() override {
    absl::MutexLock lock(&mu_);
    FinishLocked(
        grpc::Status(grpc::StatusCode::CANCELLED, "cancelled by the client"));
  }

  void OnDone() override {
    // Once Cancel returns, StartWatching is not running (listener_id_ is set
    // for good).
    if (wait_id_ != 0) service_->version_waiter().Cancel(wait_id_);
    store_->RemoveListener(listener_id_);
    service_->Forget(this);
    record_.Log(status_);
    delete this;
  }

 private:
  // A one-model watch needs the read role on it; a watch over every model
  // only an authenticated caller, whose unreadable models Enqueue drops.
  absl::Status Admit(grpc::CallbackServerContext* context,
                     const v1::WatchModelRequest& request) {
    if (all_models_ && request.min_version() > 0) {
      return absl::InvalidArgumentError(
          "min_version applies to the watch of one model, not all_models");
    }
    RETURN_IF_ERROR(CheckRequestNames(model_));
    absl::StatusOr<Caller> caller =
        all_models_ ? service_->Authenticate(*context)
                    : service_->Admit(*context, Action::kWatchModel, model_);
    if (!caller.ok()) return caller.status();
    caller_ = *std::move(caller);
    return absl::OkStatus();
  }

  // Registers with the store, which delivers CURRENT or ABSENT first (or
  // CURRENT for every model then LISTED), then every later event; or ends the
  // stream when min_version was not reached.
  void StartWatching(const absl::Status& reached) {
    absl::Status watching = reached;
    auto enqueue = [this](const ModelEvent& event) { Enqueue(event); };
    if (watching.ok() && all_models_) {
      absl::StatusOr<int64_t> id = store_->WatchAll(enqueue);
      if (id.ok()) listener_id_ = *id;
      watching = id.status();
    } else if (watching.ok()) {
      listener_id_ = store_->Watch(model_, enqueue);
    }
    absl::MutexLock lock(&mu_);
    if (!watching.ok()) {
      FinishLocked(ToGrpcStatus(watching));
      return;
    }
    WriteNextLocked();
  }

  void WriteNextLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    started_ = true;
    if (finished_ || writing_ || queue_->empty()) return;
    current_ = ToProto(queue_->Pop());
    writing_ = true;
    StartWrite(&current_);
  }

  void FinishLocked(const grpc::Status& status)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (finished_) return;
    finished_ = true;
    status_ = status;
    Finish(status);
  }

  ModelStateService::ActiveCall active_;
  ModelStateService* service_;
  ModelStore* store_;
  const std::string model_;
  const bool all_models_;
  // Set before the listener is registered, never replaced.
  std::optional<Caller> caller_;
  RpcRecord record_;
  int64_t wait_id_ = 0;  // A pending min_version wait, or 0.
  int64_t listener_id_ = 0;
  absl::Mutex mu_;
  // Set before the listener is registered, never replaced.
  std::unique_ptr<EventQueue> queue_ ABSL_GUARDED_BY(mu_);
  v1::WatchModelResponse current_ ABSL_GUARDED_BY(mu_);
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool started_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  grpc::Status status_;
};

ModelStateService::ModelStateService(ModelStore* store, ServiceOptions options)
    : store_(store), options_(options), version_waiter_(store) {
  if (options_.stream_idle_timeout != absl::InfiniteDuration())
    watchdog_ = std::thread([this] { RunIdleWatchdog(); });
}

ModelStateService::~ModelStateService() {
  {
    absl::MutexLock lock(&idle_mu_);
    stop_watchdog_ = true;
  }
  if (watchdog_.joinable()) watchdog_.join();
}

void ModelStateService::Track(IdleStream* stream) {
  absl::MutexLock lock(&idle_mu_);
  idle_streams_.insert(stream);
}

void ModelStateService::Untrack(IdleStream* stream) {
  absl::MutexLock lock(&idle_mu_);
  idle_streams_.erase(stream);
}

void ModelStateService::RunIdleWatchdog() {
  const absl::Duration timeout = options_.stream_idle_timeout;
  const absl::Duration period =
      std::clamp(timeout / 4, absl::Milliseconds(10), absl::Seconds(1));
  absl::MutexLock lock(&idle_mu_);
  while (!idle_mu_.AwaitWithTimeout(absl::Condition(&stop_watchdog_), period)) {
    const absl::Time cutoff = absl::Now() - timeout;
    for (IdleStream* stream : idle_streams_) stream->ExpireIfIdleSince(cutoff);
  }
}

namespace {

// What a unary call may do, who it acts for once admitted, and for writes
// what it wrote (for the audit line).
struct UnaryAccess {
  explicit UnaryAccess(Action action, absl::string_view module = {})
      : action(action), module(module) {}
  const Action action;
  const absl::string_view module;  // The request's submodule path, if any.
  Caller caller = Caller::Anonymous();
  int64_t version = 0;
  uint64_t bytes = 0;
};

// Sets `access.caller` to who calls and returns OK when the request's names
// are within bounds and that caller may do `access.action` on `model`.
// `*authenticated` tells whether the caller is known.
absl::Status AdmitUnary(ModelStateService* service,
                        const grpc::ServerContextBase& context,
                        absl::string_view model, UnaryAccess& access,
                        bool* authenticated) {
  *authenticated = false;
  RETURN_IF_ERROR(CheckRequestNames(model, access.module));
  ASSIGN_OR_RETURN(access.caller, service->Authenticate(context));
  *authenticated = true;
  return service->Authorize(access.caller, access.action, model);
}

// Runs a unary call's `body` (decode, one core call, encode) unless the server
// drains, a name of the request is too long, or the caller may not do
// `access.action` on the record's model, and finishes the call with its
// status.
grpc::ServerUnaryReactor* Unary(ModelStateService* service,
                                grpc::CallbackServerContext* context,
                                RpcRecord& record, UnaryAccess& access,
                                const std::function<absl::Status()>& body) {
  ModelStateService::ActiveCall active(service);
  if (service->draining()) {
    return FinishUnary(context, record,
                       absl::UnavailableError("server shutting down"));
  }
  bool authenticated = false;
  absl::Status status =
      AdmitUnary(service, *context, record.model(), access, &authenticated);
  if (status.ok()) status = body();
  if (IsWrite(access.action)) {
    service->Audit(authenticated ? &access.caller : nullptr, access.action,
                   record.model(), access.version, access.bytes,
                   ToGrpcStatus(status).error_code(), context->peer());
  }
  return FinishUnary(context, record, status);
}

}  // namespace

grpc::ServerUnaryReactor* ModelStateService::ListModels(
    grpc::CallbackServerContext* context, const v1::ListModelsRequest* request,
    v1::ListModelsResponse* response) {
  RpcRecord record("ListModels", options_.log_rpcs, options_.metrics);
  UnaryAccess access(Action::kListModels);
  return Unary(this, context, record, access, [&] {
    for (const ModelSummary& summary : store_->Summaries()) {
      if (access.caller.CanRead(summary.name))
        *response->add_models() = ToProto(summary);
    }
    return absl::OkStatus();
  });
}

namespace {

// GetModel's decode, core call, encode.
absl::Status DescribeModel(ModelStore* store,
                           const v1::GetModelRequest& request,
                           v1::GetModelResponse* response) {
  ASSIGN_OR_RETURN(const ModelManifest manifest,
                   store->Describe(FromProto(request)));
  *response = ToProto(manifest);
  return absl::OkStatus();
}

// A GetModel with min_version: answers once the model has reached it, from the
// waiter's thread, without holding an RPC thread meanwhile.
class DescribeAfterVersion : public grpc::ServerUnaryReactor {
 public:
  DescribeAfterVersion(ModelStateService* service,
                       grpc::CallbackServerContext* context, ModelStore* store,
                       const v1::GetModelRequest* request,
                       v1::GetModelResponse* response)
      : active_(service),
        service_(service),
        record_("GetModel", service->options().log_rpcs,
                service->options().metrics) {
    record_.set_model(request->model());
    absl::Status admitted =
        CheckRequestNames(request->model(), request->module());
    if (admitted.ok()) {
      admitted = service->Admit(*context, Action::kGetModel, request->model())
                     .status();
    }
    if (!admitted.ok()) {
      FinishWith(ToGrpcStatus(admitted));
      return;
    }
    wait_id_ = service_->version_waiter().Wait(
        request->model(), request->min_version(),
        service_->MinVersionDeadline(*context),
        [this, store, request, response](absl::Status reached) {
          if (reached.ok()) reached = DescribeModel(store, *request, response);
          FinishWith(ToGrpcStatus(reached));
        });
  }

  void OnCancel() override {
    if (wait_id_ != 0 && service_->version_waiter().Cancel(wait_id_))
      FinishWith(grpc::Status(grpc::StatusCode::CANCELLED,
                              "cancelled while waiting for min_version"));
  }

  void OnDone() override {
    if (wait_id_ != 0) service_->version_waiter().Cancel(wait_id_);
    delete this;
  }

 private:
  void FinishWith(const grpc::Status& status) {
    record_.Log(status);
    Finish(status);
  }

  ModelStateService::ActiveCall active_;
  ModelStateService* service_;
  RpcRecord record_;
  int64_t wait_id_ = 0;
};

}  // namespace

grpc::ServerUnaryReactor* ModelStateService::GetModel(
    grpc::CallbackServerContext* context, const v1::GetModelRequest* request,
    v1::GetModelResponse* response) {
  if (request->min_version() > 0 && !draining()) {
    return new DescribeAfterVersion(this, context, store_, request, response);
  }
  RpcRecord record("GetModel", options_.log_rpcs, options_.metrics);
  record.set_model(request->model());
  UnaryAccess access(Action::kGetModel, request->module());
  return Unary(this, context, record, access, [&]() -> absl::Status {
    return DescribeModel(store_, *request, response);
  });
}

grpc::ServerUnaryReactor* ModelStateService::CreateModel(
    grpc::CallbackServerContext* context, const v1::CreateModelRequest* request,
    v1::CreateModelResponse* response) {
  RpcRecord record("CreateModel", options_.log_rpcs, options_.metrics);
  record.set_model(request->model());
  UnaryAccess access(Action::kCreateModel);
  return Unary(this, context, record, access, [&]() -> absl::Status {
    ASSIGN_OR_RETURN(
        const Snapshot created,
        store_->CreateFromSpec(request->model(), request->architecture_json(),
                               request->seed()));
    const ModelSummary summary = Summarize(created);
    access.version = summary.version;
    access.bytes = summary.num_bytes;
    *response->mutable_summary() = ToProto(summary);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* ModelStateService::DeleteModel(
    grpc::CallbackServerContext* context, const v1::DeleteModelRequest* request,
    v1::DeleteModelResponse* response) {
  RpcRecord record("DeleteModel", options_.log_rpcs, options_.metrics);
  record.set_model(request->model());
  UnaryAccess access(Action::kDeleteModel);
  return Unary(this, context, record, access, [&] {
    // The audit line names the version deleted.
    Snapshot deleted;
    absl::Status status = store_->Delete(request->model(), &deleted);
    if (deleted.root != nullptr) {
      const ModelSummary summary = Summarize(deleted);
      access.version = summary.version;
      access.bytes = summary.num_bytes;
    }
    return status;
  });
}

grpc::ServerUnaryReactor* ModelStateService::RollbackModel(
    grpc::CallbackServerContext* context,
    const v1::RollbackModelRequest* request,
    v1::RollbackModelResponse* response) {
  RpcRecord record("RollbackModel", options_.log_rpcs, options_.metrics);
  record.set_model(request->model());
  UnaryAccess access(Action::kRollbackModel);
  return Unary(this, context, record, access, [&]() -> absl::Status {
    ASSIGN_OR_RETURN(const Snapshot current,
                     store_->Rollback(request->model(), request->version()));
    const ModelSummary summary = Summarize(current);
    access.version = summary.version;
    access.bytes = summary.num_bytes;
    *response->mutable_summary() = ToProto(summary);
    return absl::OkStatus();
  });
}

grpc::ServerWriteReactor<grpc::ByteBuffer>* ModelStateService::StateDict(
    grpc::CallbackServerContext* context, const grpc::ByteBuffer* request) {
  if (draining())
    return new Refused<grpc::ServerWriteReactor<grpc::ByteBuffer>>();
  return new StateDictReactor(this, context, store_, *request);
}

grpc::ServerReadReactor<grpc::ByteBuffer>* ModelStateService::LoadStateDict(
    grpc::CallbackServerContext* context, grpc::ByteBuffer* response) {
  if (draining())
    return new Refused<grpc::ServerReadReactor<grpc::ByteBuffer>>();
  return new LoadReactor(this, context, store_, response);
}

grpc::ServerWriteReactor<v1::WatchModelResponse>* ModelStateService::WatchModel(
    grpc::CallbackServerContext* context,
    const v1::WatchModelRequest* request) {
  absl::MutexLock lock(&watches_mu_);
  if (stopping_)
    return new Refused<grpc::ServerWriteReactor<v1::WatchModelResponse>>();
  auto* reactor = new WatchReactor(this, context, store_, *request,
                                   MinVersionDeadline(*context));
  watches_.insert(reactor);
  return reactor;
}

void ModelStateService::BeginDrain() {
  {
    absl::MutexLock lock(&calls_mu_);
    draining_ = true;
  }
  // Calls waiting for min_version end with UNAVAILABLE: the drain waits only
  // for real transfers.
  version_waiter_.Shutdown();
  absl::MutexLock lock(&watches_mu_);
  stopping_ = true;
  for (WatchReactor* reactor : watches_) reactor->Stop();
}

bool ModelStateService::draining() const {
  absl::MutexLock lock(&calls_mu_);
  return draining_;
}

int64_t ModelStateService::active_calls() const {
  absl::MutexLock lock(&calls_mu_);
  return active_calls_;
}

bool ModelStateService::WaitForIdle(absl::Time deadline) {
  absl::MutexLock lock(&calls_mu_);
  auto idle = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(calls_mu_) {
    return active_calls_ == 0;
  };
  return calls_mu_.AwaitWithDeadline(absl::Condition(&idle), deadline);
}

ModelStateService::ActiveCall::ActiveCall(ModelStateService* service)
    : service_(service) {
  absl::MutexLock lock(&service_->calls_mu_);
  ++service_->active_calls_;
}

ModelStateService::ActiveCall::~ActiveCall() {
  absl::MutexLock lock(&service_->calls_mu_);
  --service_->active_calls_;
}

absl::Time ModelStateService::MinVersionDeadline(
    const grpc::ServerContextBase& context) const {
  // A tenth of the time the client gave, at most this, is left for the
  // answer's trip back.
  constexpr absl::Duration kMaxAnswerMargin = absl::Milliseconds(200);
  const absl::Time now = absl::Now();
  absl::Time end = now + options_.max_version_wait;
  const std::chrono::system_clock::time_point deadline = context.deadline();
  if (deadline != std::chrono::system_clock::time_point::max()) {
    const absl::Time client = absl::FromChrono(deadline);
    end =
        std::min(end, client - std::min((client - now) / 10, kMaxAnswerMargin));
  }
  return end;
}

absl::StatusOr<Caller> ModelStateService::Authenticate(
    const grpc::ServerContextBase& context) {
  absl::StatusOr<Caller> caller = options_.access == nullptr
                                      ? Caller::Anonymous()
                                      : Authenticate(CredentialsOf(context));
  if (caller.ok() && options_.on_admitted) options_.on_admitted(context.peer());
  return caller;
}

absl::StatusOr<Caller> ModelStateService::Authenticate(
    const CallerCredentials& credentials) {
  if (options_.access == nullptr) return Caller::Anonymous();
  AuthFailure failure = AuthFailure::kNone;
  absl::StatusOr<Principal> principal =
      options_.access->Authenticate(credentials, &failure);
  if (!principal.ok()) {
    if (options_.metrics != nullptr)
      options_.metrics->RecordAuthFailure(AuthFailureName(failure));
    return principal.status();
  }
  return Caller::Of(*std::move(principal));
}

absl::Status ModelStateService::Authorize(const Caller& caller, Action action,
                                          absl::string_view model) {
  absl::Status allowed = caller.Authorize(action, model);
  if (!allowed.ok() && options_.metrics != nullptr) {
    options_.metrics->RecordAuthFailure(
        AuthFailureName(AuthFailure::kPermissionDenied));
  }
  return allowed;
}

absl::StatusOr<Caller> ModelStateService::Admit(
    const grpc::ServerContextBase& context, Action action,
    absl::string_view model) {
  ASSIGN_OR_RETURN(Caller caller, Authenticate(context));
  RETURN_IF_ERROR(Authorize(caller, action, model));
  return caller;
}

void ModelStateService::Audit(const Caller* caller, Action action,
                              const std::string& model, int64_t version,
                              uint64_t bytes, grpc::StatusCode code,
                              const std::string& peer) {
  if (options_.audit == nullptr) return;
  AuditLog::Entry entry;
  entry.principal = caller != nullptr ? caller->name() : "-";
  entry.action = action;
  entry.model = model;
  entry.version = code == grpc::StatusCode::OK ? version : 0;
  entry.bytes = bytes;
  entry.code = code;
  entry.peer = peer;
  options_.audit->Record(entry);
}

void ModelStateService::Forget(WatchReactor* reactor) {
  absl::MutexLock lock(&watches_mu_);
  watches_.erase(reactor);
}

}  // namespace modelstate

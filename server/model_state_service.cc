#include "server/model_state_service.h"

#include <algorithm>
#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "core/status_macros.h"
#include "core/transfer.h"
#include "core/watch_queue.h"
#include "grpcpp/support/proto_buffer_reader.h"
#include "proto/chunk_frame.h"
#include "proto/convert.h"
#include "proto/grpc_status.h"
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
        record_("StateDict", service->options().log_rpcs,
                service->options().metrics) {
    service_->Track(this);
    const ServiceOptions& options = service->options();
    v1::StateDictRequest request;
    grpc::ByteBuffer copy(raw_request);
    if (!grpc::SerializationTraits<v1::StateDictRequest>::Deserialize(&copy,
                                                                      &request)
             .ok()) {
      FinishWith(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                              "malformed StateDictRequest"));
      return;
    }
    record_.set_model(request.model());
    absl::Status prepared = Prepare(store, options, request);
    if (!prepared.ok()) {
      FinishWith(ToGrpcStatus(prepared));
      return;
    }
    StartWrite(&buffer_);
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
    service_->Untrack(this);
    record_.Log(status_);
    delete this;
  }

 private:
  // Decode, one core call, encode: the manifest goes into buffer_ and the
  // tensors into the sender.
  absl::Status Prepare(ModelStore* store, const ServiceOptions& service,
                       const v1::StateDictRequest& proto) {
    ASSIGN_OR_RETURN(const FetchRequest request, FromProto(proto));
    ASSIGN_OR_RETURN(
        const uint32_t chunk_bytes,
        ResolveChunkBytes(proto.chunk_bytes(), service.default_chunk_bytes));
    ASSIGN_OR_RETURN(const FetchPlan plan, store->Fetch(request));
    sender_ = std::make_unique<ChunkSender>(plan.state.Tensors(), chunk_bytes);
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
  std::atomic<int64_t> last_progress_{absl::GetCurrentTimeNanos()};
  RpcRecord record_;
  grpc::ByteBuffer buffer_;
  std::unique_ptr<ChunkSender> sender_;
  ChunkSender::Chunk chunk_;
  bool end_sent_ = false;
  grpc::Status status_;
};

// Receives a load: header (validated before any data), chunks into preallocated
// tensors, end marker, then one atomic commit. Anything else leaves the model
// untouched.
class LoadReactor : public grpc::ServerReadReactor<v1::LoadStateDictRequest>,
                    public IdleStream {
 public:
  LoadReactor(ModelStateService* service, ModelStore* store,
              v1::LoadStateDictResponse* response)
      : active_(service),
        service_(service),
        store_(store),
        response_(response),
        record_("LoadStateDict", service->options().log_rpcs,
                service->options().metrics) {
    service_->Track(this);
    StartRead(&request_);
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
    StartRead(&request_);
  }

  void OnDone() override {
    service_->Untrack(this);
    record_.Log(status_);
    delete this;  // Drops any pending load: its staging memory and reservation
                  // go with it.
  }

 private:
  absl::Status Handle() {
    switch (request_.kind_case()) {
      case v1::LoadStateDictRequest::kHeader:
        return HandleHeader(request_.header());
      case v1::LoadStateDictRequest::kChunk: {
        if (receiver_ == nullptr) {
          return absl::InvalidArgumentError(
              "a load must start with its header");
        }
        record_.add_bytes(request_.chunk().data().size());
        return receiver_->Accept(request_.chunk().offset(),
                                 request_.chunk().data());
      }
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
    ASSIGN_OR_RETURN(const LoadRequest request, FromProto(header));
    ASSIGN_OR_RETURN(std::vector<TransferEntry> entries,
                     ToTransferEntries(header.tensors()));
    ASSIGN_OR_RETURN(pending_,
                     store_->BeginLoad(request, ToTensorSpecs(entries)));
    ASSIGN_OR_RETURN(receiver_, ChunkReceiver::Create(std::move(entries)));
    if (receiver_->total_bytes() != header.total_bytes()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "header says ", header.total_bytes(),
          " bytes but its tensors add up to ", receiver_->total_bytes()));
    }
    return absl::OkStatus();
  }

  absl::Status HandleEnd(const v1::End& end) {
    if (receiver_ == nullptr)
      return absl::InvalidArgumentError("a load must start with its header");
    absl::StatusOr<std::vector<Tensor>> tensors =
        receiver_->Finish(end.total_bytes());
    receiver_.reset();
    if (!tensors.ok()) return tensors.status();
    ASSIGN_OR_RETURN(
        const LoadOutcome outcome,
        store_->CommitLoad(std::move(pending_), *std::move(tensors)));
    *response_ = ToProto(outcome);
    committed_ = true;
    return absl::OkStatus();
  }

  void FinishLocked(const absl::Status& status)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    finished_ = true;
    pending_.reset();
    receiver_.reset();
    status_ = ToGrpcStatus(status);
    Finish(status_);
  }

  ModelStateService::ActiveCall active_;
  ModelStateService* service_;
  absl::Mutex mu_;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  absl::Time last_progress_ ABSL_GUARDED_BY(mu_) = absl::Now();
  ModelStore* store_;
  v1::LoadStateDictResponse* response_;
  RpcRecord record_;
  v1::LoadStateDictRequest request_;
  std::unique_ptr<PendingLoad> pending_;
  std::unique_ptr<ChunkReceiver> receiver_;
  bool committed_ = false;
  grpc::Status status_;
};

}  // namespace

// Streams one model's events, or every model's (a follower's watch); one write
// in flight, later events queue behind it.
class WatchReactor : public grpc::ServerWriteReactor<v1::WatchModelResponse> {
 public:
  WatchReactor(ModelStateService* service, ModelStore* store,
               const v1::WatchModelRequest& request)
      : active_(service),
        service_(service),
        store_(store),
        model_(request.model()),
        record_("WatchModel", service->options().log_rpcs,
                service->options().metrics) {
    record_.set_model(model_);
    auto enqueue = [this](const ModelEvent& event) { Enqueue(event); };
    // The store delivers CURRENT or ABSENT first (or CURRENT for every model
    // then LISTED), then every later event.
    {
      absl::MutexLock lock(&mu_);
      if (request.all_models()) {
        queue_ = std::make_unique<LatestEventQueue>();
      } else {
        queue_ = std::make_unique<WatchQueue>(kMaxQueuedWatchEvents);
      }
    }
    if (request.all_models()) {
      absl::StatusOr<int64_t> id = store_->WatchAll(enqueue);
      if (!id.ok()) {
        absl::MutexLock lock(&mu_);
        FinishLocked(ToGrpcStatus(id.status()));
        return;
      }
      listener_id_ = *id;
    } else {
      listener_id_ = store_->Watch(model_, enqueue);
    }
    absl::MutexLock lock(&mu_);
    WriteNextLocked();
  }

  void Enqueue(const ModelEvent& event) {
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
    store_->RemoveListener(listener_id_);
    service_->Forget(this);
    record_.Log(status_);
    delete this;
  }

 private:
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
  RpcRecord record_;
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
    : store_(store), options_(options) {
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

// Runs a unary call's `body` (decode, one core call, encode) unless the server
// drains, and finishes the call with its status.
grpc::ServerUnaryReactor* Unary(ModelStateService* service,
                                grpc::CallbackServerContext* context,
                                RpcRecord& record,
                                const std::function<absl::Status()>& body) {
  ModelStateService::ActiveCall active(service);
  if (service->draining()) {
    return FinishUnary(context, record,
                       absl::UnavailableError("server shutting down"));
  }
  return FinishUnary(context, record, body());
}

}  // namespace

grpc::ServerUnaryReactor* ModelStateService::ListModels(
    grpc::CallbackServerContext* context, const v1::ListModelsRequest* request,
    v1::ListModelsResponse* response) {
  RpcRecord record("ListModels", options_.log_rpcs, options_.metrics);
  return Unary(this, context, record, [&] {
    for (const ModelSummary& summary : store_->Summaries())
      *response->add_models() = ToProto(summary);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* ModelStateService::GetModel(
    grpc::CallbackServerContext* context, const v1::GetModelRequest* request,
    v1::GetModelResponse* response) {
  RpcRecord record("GetModel", options_.log_rpcs, options_.metrics);
  record.set_model(request->model());
  return Unary(this, context, record, [&]() -> absl::Status {
    ASSIGN_OR_RETURN(const ModelManifest manifest,
                     store_->Describe(FromProto(*request)));
    *response = ToProto(manifest);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* ModelStateService::CreateModel(
    grpc::CallbackServerContext* context, const v1::CreateModelRequest* request,
    v1::CreateModelResponse* response) {
  RpcRecord record("CreateModel", options_.log_rpcs, options_.metrics);
  record.set_model(request->model());
  return Unary(this, context, record, [&]() -> absl::Status {
    ASSIGN_OR_RETURN(
        const Snapshot created,
        store_->CreateFromSpec(request->model(), request->architecture_json(),
                               request->seed()));
    *response->mutable_summary() = ToProto(Summarize(created));
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* ModelStateService::DeleteModel(
    grpc::CallbackServerContext* context, const v1::DeleteModelRequest* request,
    v1::DeleteModelResponse* response) {
  RpcRecord record("DeleteModel", options_.log_rpcs, options_.metrics);
  record.set_model(request->model());
  return Unary(this, context, record,
               [&] { return store_->Delete(request->model()); });
}

grpc::ServerUnaryReactor* ModelStateService::RollbackModel(
    grpc::CallbackServerContext* context,
    const v1::RollbackModelRequest* request,
    v1::RollbackModelResponse* response) {
  RpcRecord record("RollbackModel", options_.log_rpcs, options_.metrics);
  record.set_model(request->model());
  return Unary(this, context, record, [&]() -> absl::Status {
    ASSIGN_OR_RETURN(const Snapshot current,
                     store_->Rollback(request->model(), request->version()));
    *response->mutable_summary() = ToProto(Summarize(current));
    return absl::OkStatus();
  });
}

grpc::ServerWriteReactor<grpc::ByteBuffer>* ModelStateService::StateDict(
    grpc::CallbackServerContext* context, const grpc::ByteBuffer* request) {
  if (draining())
    return new Refused<grpc::ServerWriteReactor<grpc::ByteBuffer>>();
  return new StateDictReactor(this, context, store_, *request);
}

grpc::ServerReadReactor<v1::LoadStateDictRequest>*
ModelStateService::LoadStateDict(grpc::CallbackServerContext* context,
                                 v1::LoadStateDictResponse* response) {
  if (draining())
    return new Refused<grpc::ServerReadReactor<v1::LoadStateDictRequest>>();
  return new LoadReactor(this, store_, response);
}

grpc::ServerWriteReactor<v1::WatchModelResponse>* ModelStateService::WatchModel(
    grpc::CallbackServerContext* context,
    const v1::WatchModelRequest* request) {
  absl::MutexLock lock(&watches_mu_);
  if (stopping_)
    return new Refused<grpc::ServerWriteReactor<v1::WatchModelResponse>>();
  auto* reactor = new WatchReactor(this, store_, *request);
  watches_.insert(reactor);
  return reactor;
}

void ModelStateService::BeginDrain() {
  {
    absl::MutexLock lock(&calls_mu_);
    draining_ = true;
  }
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

void ModelStateService::Forget(WatchReactor* reactor) {
  absl::MutexLock lock(&watches_mu_);
  watches_.erase(reactor);
}

}  // namespace modelstate

#include "server/fetch_call.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <memory>
#include <utility>

#include "absl/time/clock.h"
#include "common/status_macros.h"
#include "grpcpp/alarm.h"
#include "proto/chunk_frame.h"
#include "proto/convert.h"
#include "proto/grpc_status.h"
#include "server/call_support.h"
#include "server/rpc_log.h"
#include "transfer/transfer.h"

namespace modelstate {
namespace {

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
    sender_ = std::make_unique<ChunkSender>(plan.SentTensors(), chunk_bytes,
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

}  // namespace

grpc::ServerWriteReactor<grpc::ByteBuffer>* NewStateDictReactor(
    ModelStateService* service, grpc::CallbackServerContext* context,
    ModelStore* store, const grpc::ByteBuffer& raw_request) {
  return new StateDictReactor(service, context, store, raw_request);
}

}  // namespace modelstate

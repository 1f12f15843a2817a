#include "server/load_call.h"

#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "common/status_macros.h"
#include "proto/chunk_frame.h"
#include "proto/convert.h"
#include "proto/grpc_status.h"
#include "server/call_support.h"
#include "server/rpc_log.h"
#include "transfer/transfer.h"

namespace modelstate {
namespace {

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
    RETURN_IF_ERROR(service_->gate().Authorize(*caller_, Action::kLoadStateDict,
                                               header.model()));
    // Before the manifest is copied into entries and specs (a 60 MB header
    // of a million tensors would cost hundreds of MB to convert).
    RETURN_IF_ERROR(store_->CheckLoadSize(header.tensors_size()));
    ASSIGN_OR_RETURN(LoadRequest request, FromProto(header));
    ASSIGN_OR_RETURN(std::vector<TransferEntry> entries,
                     ToTransferEntries(header.tensors()));
    ASSIGN_OR_RETURN(pending_,
                     BeginLoad(std::move(request), ToTensorSpecs(entries)));
    ASSIGN_OR_RETURN(receiver_, ChunkReceiver::CreateVerifyingAtEnd(
                                    SentEntries(entries),
                                    service_->options().min_chunk_bytes));
    entries_ = std::move(entries);
    if (receiver_->total_bytes() != header.total_bytes()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "header says ", header.total_bytes(),
          " bytes but its tensors add up to ", receiver_->total_bytes()));
    }
    return absl::OkStatus();
  }

  // A load that creates its model is a create, which the gate allows only
  // some callers (AccessGate::MayCreateOnLoad). The others load with creation
  // off, so that neither a missing model nor one deleted after this check is
  // ever created by the load; the store's NotFound for the missing model
  // becomes the gate's refusal of the create.
  absl::StatusOr<std::unique_ptr<PendingLoad>> BeginLoad(
      LoadRequest request, std::vector<TensorSpec> specs) {
    const AccessGate& gate = service_->gate();
    const bool may_create = !request.create_if_missing ||
                            gate.MayCreateOnLoad(*caller_, request.model);
    if (request.create_if_missing) request.create_if_missing = may_create;
    absl::StatusOr<std::unique_ptr<PendingLoad>> pending =
        store_->BeginLoad(request, std::move(specs));
    if (pending.ok() && (*pending)->creates_model())
      audit_action_ = Action::kLoadStateDictCreate;
    if (may_create || !absl::IsNotFound(pending.status()) ||
        store_->GetSnapshot(request.model).ok()) {
      return pending;
    }
    audit_action_ = Action::kLoadStateDictCreate;
    RETURN_IF_ERROR(gate.RefuseCreateOnLoad(*caller_, request.model));
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
    ASSIGN_OR_RETURN(std::vector<Tensor> all,
                     WithSharedTensors(entries_, *std::move(tensors)));
    ASSIGN_OR_RETURN(const LoadOutcome outcome,
                     store_->CommitLoad(std::move(pending_), std::move(all)));
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
    service_->gate().Audit(caller_ ? &*caller_ : nullptr, audit_action_,
                           record_.model(), version_, bytes_received_,
                           status.code(), peer_);
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
  // The header's tensors; those shared with another get no bytes.
  std::vector<TransferEntry> entries_;
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

grpc::ServerReadReactor<grpc::ByteBuffer>* NewLoadReactor(
    ModelStateService* service, grpc::CallbackServerContext* context,
    ModelStore* store, grpc::ByteBuffer* response) {
  return new LoadReactor(service, context, store, response);
}

}  // namespace modelstate

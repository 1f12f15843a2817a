#include "server/watch_call.h"

#include <utility>

#include "common/limits.h"
#include "common/status_macros.h"
#include "proto/convert.h"
#include "proto/grpc_status.h"
#include "server/call_support.h"

namespace modelstate {

WatchReactor::WatchReactor(ModelStateService* service,
                           grpc::CallbackServerContext* context,
                           ModelStore* store,
                           const v1::WatchModelRequest& request,
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

void WatchReactor::Enqueue(const ModelEvent& event) {
  if (all_models_ && event.type != ModelEvent::Type::kListed &&
      !caller_->CanRead(event.model)) {
    return;
  }
  absl::MutexLock lock(&mu_);
  if (finished_) return;
  queue_->Push(event);
  if (!writing_ && started_) WriteNextLocked();
}

void WatchReactor::Stop() {
  absl::MutexLock lock(&mu_);
  FinishLocked(ShuttingDown());
}

void WatchReactor::OnWriteDone(bool ok) {
  absl::MutexLock lock(&mu_);
  writing_ = false;
  if (!ok) {
    FinishLocked(grpc::Status(grpc::StatusCode::CANCELLED, "client went away"));
    return;
  }
  WriteNextLocked();
}

void WatchReactor::OnCancel() {
  absl::MutexLock lock(&mu_);
  FinishLocked(
      grpc::Status(grpc::StatusCode::CANCELLED, "cancelled by the client"));
}

void WatchReactor::OnDone() {
  // Once Cancel returns, StartWatching is not running (listener_id_ is set
  // for good).
  if (wait_id_ != 0) service_->version_waiter().Cancel(wait_id_);
  store_->RemoveListener(listener_id_);
  service_->Forget(this);
  record_.Log(status_);
  delete this;
}

absl::Status WatchReactor::Admit(grpc::CallbackServerContext* context,
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

void WatchReactor::StartWatching(const absl::Status& reached) {
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

void WatchReactor::WriteNextLocked() {
  started_ = true;
  if (finished_ || writing_ || queue_->empty()) return;
  current_ = ToProto(queue_->Pop());
  writing_ = true;
  StartWrite(&current_);
}

void WatchReactor::FinishLocked(const grpc::Status& status) {
  if (finished_) return;
  finished_ = true;
  status_ = status;
  Finish(status);
}

}  // namespace modelstate

#include "server/model_state_service.h"

#include <algorithm>
#include <chrono>
#include <string>

#include "absl/time/clock.h"
#include "common/status_macros.h"
#include "server/call_support.h"
#include "server/fetch_call.h"
#include "server/grpc_credentials.h"
#include "server/load_call.h"
#include "server/watch_call.h"

namespace modelstate {

ModelStateService::ModelStateService(ModelStore* store, ServiceOptions options)
    : store_(store), options_(options), version_waiter_(store) {
  if (options_.gate == nullptr) options_.gate = &open_gate_;
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

grpc::ServerWriteReactor<grpc::ByteBuffer>* ModelStateService::StateDict(
    grpc::CallbackServerContext* context, const grpc::ByteBuffer* request) {
  if (draining())
    return new Refused<grpc::ServerWriteReactor<grpc::ByteBuffer>>();
  return NewStateDictReactor(this, context, store_, *request);
}

grpc::ServerReadReactor<grpc::ByteBuffer>* ModelStateService::LoadStateDict(
    grpc::CallbackServerContext* context, grpc::ByteBuffer* response) {
  if (draining())
    return new Refused<grpc::ServerReadReactor<grpc::ByteBuffer>>();
  return NewLoadReactor(this, context, store_, response);
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
  // Without a policy nobody's credentials are read.
  absl::StatusOr<Caller> caller =
      gate().enforcing() ? gate().Authenticate(CredentialsOf(context))
                         : Caller::Anonymous();
  if (caller.ok() && options_.on_admitted) options_.on_admitted(context.peer());
  return caller;
}

absl::StatusOr<Caller> ModelStateService::Admit(
    const grpc::ServerContextBase& context, Action action,
    absl::string_view model) {
  ASSIGN_OR_RETURN(Caller caller, Authenticate(context));
  RETURN_IF_ERROR(gate().Authorize(caller, action, model));
  return caller;
}

void ModelStateService::Forget(WatchReactor* reactor) {
  absl::MutexLock lock(&watches_mu_);
  watches_.erase(reactor);
}

}  // namespace modelstate

// WatchModel: streams one model's events, or every model's (a follower's
// watch), with one write in flight.
#ifndef MODELSTATE_SERVER_WATCH_CALL_H_
#define MODELSTATE_SERVER_WATCH_CALL_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "access/access_gate.h"
#include "grpcpp/server_context.h"
#include "grpcpp/support/server_callback.h"
#include "modelstate/v1/model_state.pb.h"
#include "server/model_state_service.h"
#include "server/rpc_log.h"
#include "store/model_store.h"
#include "store/watch_queue.h"

namespace modelstate {

// One write in flight, later events queue behind it. With min_version, a
// one-model watch starts once the model has reached it, so its first event is
// CURRENT at that version or later. A watch over every model shows only the
// models its caller may read. Deletes itself when the call is done.
class WatchReactor : public grpc::ServerWriteReactor<v1::WatchModelResponse> {
 public:
  // `service` and `store` must outlive the reactor; the min_version wait
  // gives up at `wait_deadline`.
  WatchReactor(ModelStateService* service, grpc::CallbackServerContext* context,
               ModelStore* store, const v1::WatchModelRequest& request,
               absl::Time wait_deadline);

  // Queues `event` for the client (unless its caller may not read its model).
  void Enqueue(const ModelEvent& event);
  // Ends the stream with UNAVAILABLE (the server drains).
  void Stop();

  void OnWriteDone(bool ok) override;
  void OnCancel() override;
  void OnDone() override;

 private:
  // A one-model watch needs the read role on it; a watch over every model
  // only an authenticated caller, whose unreadable models Enqueue drops.
  absl::Status Admit(grpc::CallbackServerContext* context,
                     const v1::WatchModelRequest& request);
  // Registers with the store, which delivers CURRENT or ABSENT first (or
  // CURRENT for every model then LISTED), then every later event; or ends the
  // stream when min_version was not reached.
  void StartWatching(const absl::Status& reached);
  void WriteNextLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void FinishLocked(const grpc::Status& status)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

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

}  // namespace modelstate

#endif  // MODELSTATE_SERVER_WATCH_CALL_H_

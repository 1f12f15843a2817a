// The modelstate.v1.ModelState service over the gRPC callback API. Each handler
// passes the access gate, delegates to the ModelStore, converts statuses and
// records one log line; streaming handlers are reactors with one write in
// flight. The handlers live by family: fetch_call (StateDict), load_call
// (LoadStateDict), watch_call (WatchModel) and unary_calls (the rest).
#ifndef MODELSTATE_SERVER_MODEL_STATE_SERVICE_H_
#define MODELSTATE_SERVER_MODEL_STATE_SERVICE_H_

#include <cstdint>
#include <functional>
#include <set>
#include <string>
#include <thread>

#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "access/access_gate.h"
#include "common/limits.h"
#include "modelstate/v1/model_state.grpc.pb.h"
#include "store/model_store.h"
#include "store/version_wait.h"

namespace modelstate {

class Metrics;
class WatchReactor;

struct ServiceOptions {
  uint32_t default_chunk_bytes = kDefaultChunkBytes;
  bool log_rpcs = true;
  // A load stream that sends nothing, or a fetch whose client reads nothing,
  // for this long is ended (DEADLINE_EXCEEDED, or cancelled), releasing its
  // memory reservation or pinned version. Infinite disables it.
  absl::Duration stream_idle_timeout = absl::Seconds(60);
  // Where finished RPCs are counted; null for none. Must outlive the service.
  Metrics* metrics = nullptr;
  // Consistent reads: the longest a call with min_version waits for the model
  // to reach it, whatever the client's deadline (see MinVersionDeadline).
  absl::Duration max_version_wait = absl::Seconds(60);
  // Who may do what, and the audit line of every write; null lets every
  // caller do everything and audits nothing. Must outlive the service.
  const AccessGate* gate = nullptr;
  // Told the peer (grpc::ServerContext::peer()) of every call whose caller
  // was authenticated (every call without a policy); may be empty.
  std::function<void(const std::string& peer)> on_admitted;
  // Minimum chunk: load chunks below it that do not end their
  // stream are INVALID_ARGUMENT, and a fetch's chunk_bytes below it is raised
  // to it. 0 disables it.
  uint32_t min_chunk_bytes = kDefaultMinChunkBytes;
};

// A stream the service ends when it makes no progress for the idle timeout.
class IdleStream {
 public:
  virtual ~IdleStream() = default;
  // Ends the stream if its last progress was before `cutoff`. Called from the
  // service's watchdog thread while the stream is tracked.
  virtual void ExpireIfIdleSince(absl::Time cutoff) = 0;
};

// StateDict is a raw (ByteBuffer) method so that chunks are sent without
// copying tensor bytes; LoadStateDict is one so that chunk bytes go from the
// received slices straight into the staged tensors. Their messages are exactly
// the proto's.
class ModelStateService final
    : public v1::ModelState::WithRawCallbackMethod_StateDict<
          v1::ModelState::WithRawCallbackMethod_LoadStateDict<
              v1::ModelState::CallbackService>> {
 public:
  // `store` must outlive the service.
  ModelStateService(ModelStore* store, ServiceOptions options);
  ~ModelStateService() override;

  grpc::ServerUnaryReactor* ListModels(
      grpc::CallbackServerContext* context,
      const v1::ListModelsRequest* request,
      v1::ListModelsResponse* response) override;
  grpc::ServerUnaryReactor* GetModel(grpc::CallbackServerContext* context,
                                     const v1::GetModelRequest* request,
                                     v1::GetModelResponse* response) override;
  grpc::ServerUnaryReactor* CreateModel(
      grpc::CallbackServerContext* context,
      const v1::CreateModelRequest* request,
      v1::CreateModelResponse* response) override;
  grpc::ServerUnaryReactor* DeleteModel(
      grpc::CallbackServerContext* context,
      const v1::DeleteModelRequest* request,
      v1::DeleteModelResponse* response) override;
  grpc::ServerUnaryReactor* RollbackModel(
      grpc::CallbackServerContext* context,
      const v1::RollbackModelRequest* request,
      v1::RollbackModelResponse* response) override;
  grpc::ServerWriteReactor<grpc::ByteBuffer>* StateDict(
      grpc::CallbackServerContext* context,
      const grpc::ByteBuffer* request) override;
  grpc::ServerReadReactor<grpc::ByteBuffer>* LoadStateDict(
      grpc::CallbackServerContext* context,
      grpc::ByteBuffer* response) override;
  grpc::ServerWriteReactor<v1::WatchModelResponse>* WatchModel(
      grpc::CallbackServerContext* context,
      const v1::WatchModelRequest* request) override;

  // Starts a graceful stop: every new call is refused with UNAVAILABLE, and
  // open watch streams (which never end on their own) end with UNAVAILABLE,
  // so the drain only waits for real transfers.
  void BeginDrain();

  // Waits until no call is in flight or `deadline` passes; returns whether
  // the service went idle.
  bool WaitForIdle(absl::Time deadline);

  // True once BeginDrain was called.
  bool draining() const;

  // Calls in flight, streams included.
  int64_t active_calls() const;

  // Watches `stream` for idleness until Untrack; Untrack returns once no
  // expiry check of it runs.
  void Track(IdleStream* stream);
  void Untrack(IdleStream* stream);

  // Counts one call in flight for as long as it lives.
  class ActiveCall {
   public:
    explicit ActiveCall(ModelStateService* service);
    ~ActiveCall();
    ActiveCall(const ActiveCall&) = delete;
    ActiveCall& operator=(const ActiveCall&) = delete;

   private:
    ModelStateService* service_;
  };

  const ServiceOptions& options() const { return options_; }

  // Consistent reads: holds calls with min_version until the model reaches it.
  VersionWaiter& version_waiter() { return version_waiter_; }
  // When a min_version wait of the call on `context` gives up: at most
  // max_version_wait from now, and early enough before the client's deadline
  // for the UNAVAILABLE answer to reach it (rather than the client's own
  // DEADLINE_EXCEEDED).
  absl::Time MinVersionDeadline(const grpc::ServerContextBase& context) const;
  // The access gate every call passes.
  const AccessGate& gate() const { return *options_.gate; }
  // Who calls through `context` (AccessGate::Authenticate of its
  // credentials); the peer is told to options().on_admitted on success.
  absl::StatusOr<Caller> Authenticate(const grpc::ServerContextBase& context);
  // Authenticate, then AccessGate::Authorize, for a call whose model is known
  // at its start; the caller on success.
  absl::StatusOr<Caller> Admit(const grpc::ServerContextBase& context,
                               Action action, absl::string_view model);

 private:
  friend class WatchReactor;
  void Forget(WatchReactor* reactor);

  ModelStore* store_;
  // What options_.gate points to when none was given: no policy, no audit.
  const AccessGate open_gate_{nullptr, nullptr};
  ServiceOptions options_;
  absl::Mutex watches_mu_;
  std::set<WatchReactor*> watches_ ABSL_GUARDED_BY(watches_mu_);
  bool stopping_ ABSL_GUARDED_BY(watches_mu_) = false;

  // Ends idle tracked streams until the service goes away.
  void RunIdleWatchdog();

  absl::Mutex idle_mu_;
  std::set<IdleStream*> idle_streams_ ABSL_GUARDED_BY(idle_mu_);
  bool stop_watchdog_ ABSL_GUARDED_BY(idle_mu_) = false;
  std::thread watchdog_;

  mutable absl::Mutex calls_mu_;
  int64_t active_calls_ ABSL_GUARDED_BY(calls_mu_) = 0;
  bool draining_ ABSL_GUARDED_BY(calls_mu_) = false;

  VersionWaiter version_waiter_;
};

}  // namespace modelstate

#endif  // MODELSTATE_SERVER_MODEL_STATE_SERVICE_H_

// Prometheus metrics of one daemon: RPCs by method and status code, bytes
// moved, transfer durations, and at every scrape the store's state (models,
// versions, bytes held, memory reserved against the limit, loads and calls in
// flight). The per-model series name every model, also those an auth policy
// hides from a caller's ListModels; SetModelLabels(false) leaves them out.
//
// Thread-safety: every method may be called from any thread.
#ifndef MODELSTATE_SERVER_METRICS_H_
#define MODELSTATE_SERVER_METRICS_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "grpcpp/support/status.h"
#include "prometheus/collectable.h"
#include "prometheus/counter.h"
#include "prometheus/family.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"
#include "server/connection_gate.h"
#include "store/follower.h"
#include "store/model_store.h"

namespace modelstate {

class StateCollector;

class Metrics {
 public:
  // `store` must outlive the metrics; `active_calls` reports the calls in
  // flight at scrape time.
  Metrics(const ModelStore* store, int64_t memory_limit_bytes,
          std::function<int64_t()> active_calls);

  // Counts one finished RPC. `bytes` are tensor bytes: received for
  // LoadStateDict, sent for every other method.
  void RecordRpc(absl::string_view method, grpc::StatusCode code,
                 uint64_t bytes, absl::Duration duration);

  // Counts one call refused by the auth policy; `reason` is an
  // AuthFailureName ("unknown_token", "permission_denied", ...).
  void RecordAuthFailure(absl::string_view reason);

  // With false, no scrape carries a model name from the next one on: the
  // per-model series (modelstate_model_version, modelstate_model_bytes) are
  // left out, while modelstate_models and the memory gauges still count every
  // model. True by default.
  void SetModelLabels(bool enabled);

  // What an exposer serves: the RPC metrics and the store's state.
  std::shared_ptr<prometheus::Collectable> rpc_metrics() const {
    return registry_;
  }
  std::shared_ptr<prometheus::Collectable> state_metrics() const;

 private:
  std::shared_ptr<prometheus::Registry> registry_;
  prometheus::Family<prometheus::Counter>& rpcs_;
  prometheus::Family<prometheus::Counter>& bytes_;
  prometheus::Family<prometheus::Histogram>& durations_;
  prometheus::Family<prometheus::Counter>& auth_failures_;
  std::shared_ptr<StateCollector> state_;
};

// A follower's state, read at every scrape (modelstated --follow):
// modelstate_follower_{connected,synced,lag_versions,last_heard_seconds,
// behind_seconds,sync_bytes_in_flight,epoch_refused} and
// modelstate_follower_upstream_epoch_info gauges,
// modelstate_follower_{syncs,deletes,upstream_failures,sync_failures,
// stale_answers,fetched_tensors,fetched_bytes,reused_tensors,reused_bytes}_total
// counters and, with `model_labels`, per model
// modelstate_follower_{upstream_version,model_behind_seconds}. `follower`
// must outlive the collectable's use.
std::shared_ptr<prometheus::Collectable> FollowerMetrics(
    const Follower* follower, bool model_labels);

// The main port's connections, read at every scrape:
// modelstate_connections_open and modelstate_accepting gauges and
// modelstate_connections_{accepted,refused,evicted,expired}_total counters.
// `gate` must outlive the collectable's use.
std::shared_ptr<prometheus::Collectable> ConnectionMetrics(
    const ConnectionGate* gate);

}  // namespace modelstate

#endif  // MODELSTATE_SERVER_METRICS_H_

#include "server/metrics.h"

#include <malloc.h>

#include <atomic>
#include <utility>
#include <vector>

#include "prometheus/client_metric.h"
#include "prometheus/metric_family.h"
#include "server/rpc_log.h"
#include "store/lineage.h"

namespace modelstate {
namespace {

prometheus::MetricFamily Gauge(std::string name, std::string help) {
  prometheus::MetricFamily family;
  family.name = std::move(name);
  family.help = std::move(help);
  family.type = prometheus::MetricType::Gauge;
  return family;
}

void AddSample(prometheus::MetricFamily& family, double value,
               std::vector<prometheus::ClientMetric::Label> labels = {}) {
  prometheus::ClientMetric metric;
  metric.label = std::move(labels);
  metric.gauge.value = value;
  family.metric.push_back(std::move(metric));
}

// The allocator's view of the heap, summed over every arena: what is in use
// tells growth apart from fragmentation, which RSS alone cannot.
void AddHeapGauges(std::vector<prometheus::MetricFamily>& families) {
  const struct mallinfo2 info = mallinfo2();
  auto in_use = Gauge("modelstate_heap_in_use_bytes",
                      "Bytes allocated by malloc and not yet freed "
                      "(arenas and mmapped blocks).");
  AddSample(in_use, static_cast<double>(info.uordblks + info.hblkhd));
  auto free_bytes = Gauge("modelstate_heap_free_bytes",
                          "Freed bytes malloc still holds in its arenas.");
  AddSample(free_bytes, static_cast<double>(info.fordblks));
  families.push_back(std::move(in_use));
  families.push_back(std::move(free_bytes));
}

// Each model's version and bytes, labelled with its name.
void AddPerModelGauges(const std::vector<ModelSummary>& models,
                       std::vector<prometheus::MetricFamily>& families) {
  auto versions =
      Gauge("modelstate_model_version", "Current version of each model.");
  auto bytes = Gauge("modelstate_model_bytes",
                     "Tensor bytes of each model's state dict.");
  for (const ModelSummary& model : models) {
    AddSample(versions, static_cast<double>(model.version),
              {{"model", model.name}});
    AddSample(bytes, static_cast<double>(model.num_bytes),
              {{"model", model.name}});
  }
  families.push_back(std::move(versions));
  families.push_back(std::move(bytes));
}

prometheus::MetricFamily Counter(std::string name, std::string help,
                                 double value) {
  prometheus::MetricFamily family;
  family.name = std::move(name);
  family.help = std::move(help);
  family.type = prometheus::MetricType::Counter;
  prometheus::ClientMetric metric;
  metric.counter.value = value;
  family.metric.push_back(std::move(metric));
  return family;
}

// The follower's gauges of its state now.
void AddFollowerGauges(const FollowerStats& stats,
                       std::vector<prometheus::MetricFamily>& families) {
  auto gauge = [&families](const char* name, const char* help, double value) {
    auto family = Gauge(name, help);
    AddSample(family, value);
    families.push_back(std::move(family));
  };
  gauge("modelstate_follower_connected",
        "1 while the upstream's watch is up and listed.", stats.connected);
  gauge("modelstate_follower_synced",
        "1 once the first full listing was mirrored.", stats.synced);
  gauge("modelstate_follower_lag_versions",
        "Versions the upstream showed (as last seen, also while "
        "disconnected) that are not here yet, summed over models.",
        static_cast<double>(stats.lag_versions));
  gauge("modelstate_follower_last_heard_seconds",
        "Seconds since the upstream was last heard from: 0 while its watch "
        "is up.",
        absl::ToDoubleSeconds(stats.since_heard));
  gauge("modelstate_follower_behind_seconds",
        "Seconds since the upstream first showed a version not here yet, for "
        "the model longest behind; 0 when caught up.",
        absl::ToDoubleSeconds(stats.behind));
  gauge("modelstate_follower_sync_bytes_in_flight",
        "Bytes the sync in progress still has to fetch.",
        static_cast<double>(stats.sync_bytes_in_flight));
  gauge("modelstate_follower_epoch_refused",
        "1 while the upstream is of another epoch (another history of its "
        "primary) that this follower was not told to adopt.",
        stats.epoch_refused);
  if (stats.upstream_epoch == 0) return;
  auto epoch = Gauge("modelstate_follower_upstream_epoch_info",
                     "The upstream's epoch, as its last listing showed it.");
  AddSample(epoch, 1, {{"epoch", EpochName(stats.upstream_epoch)}});
  families.push_back(std::move(epoch));
}

// Each model's version on the upstream as last seen, and how long it has
// been behind, labelled with its name.
void AddFollowerModelGauges(const std::vector<ModelLag>& lags,
                            std::vector<prometheus::MetricFamily>& families) {
  auto upstream = Gauge("modelstate_follower_upstream_version",
                        "Each model's version on the upstream, as last seen "
                        "by the watch (0: the upstream lacks it).");
  auto behind = Gauge("modelstate_follower_model_behind_seconds",
                      "Seconds since the upstream first showed a version of "
                      "the model not here yet; 0 when caught up.");
  for (const ModelLag& lag : lags) {
    AddSample(upstream, static_cast<double>(lag.upstream_version),
              {{"model", lag.model}});
    AddSample(behind, absl::ToDoubleSeconds(lag.behind),
              {{"model", lag.model}});
  }
  families.push_back(std::move(upstream));
  families.push_back(std::move(behind));
}

std::vector<prometheus::MetricFamily> FollowerCounters(
    const FollowerStats& stats) {
  return {
      Counter("modelstate_follower_syncs_total",
              "Upstream versions committed here.", stats.syncs),
      Counter("modelstate_follower_deletes_total",
              "Models removed because the upstream removed them.",
              stats.deletes),
      Counter("modelstate_follower_upstream_failures_total",
              "Watches of the upstream that ended in an error.",
              stats.upstream_failures),
      Counter("modelstate_follower_sync_failures_total",
              "Syncs of one model that failed (memory limit, refused "
              "tree) while the others went on.",
              stats.sync_failures),
      Counter("modelstate_follower_stale_answers_total",
              "Answers of the upstream older than what is held here (it "
              "lags): kept, not applied.",
              stats.stale_answers),
      Counter("modelstate_follower_fetched_tensors_total",
              "Tensors fetched from the upstream.", stats.tensors_fetched),
      Counter("modelstate_follower_fetched_bytes_total",
              "Tensor bytes fetched from the upstream.",
              static_cast<double>(stats.bytes_fetched)),
      Counter("modelstate_follower_reused_tensors_total",
              "Tensors of synced versions shared with ones already held.",
              stats.tensors_reused),
      Counter("modelstate_follower_reused_bytes_total",
              "Bytes of those tensors (not fetched).",
              static_cast<double>(stats.bytes_reused)),
  };
}

class FollowerCollector : public prometheus::Collectable {
 public:
  FollowerCollector(const Follower* follower, bool model_labels)
      : follower_(follower), model_labels_(model_labels) {}

  std::vector<prometheus::MetricFamily> Collect() const override {
    const FollowerStats stats = follower_->stats();
    std::vector<prometheus::MetricFamily> families = FollowerCounters(stats);
    AddFollowerGauges(stats, families);
    if (model_labels_)
      AddFollowerModelGauges(follower_->model_lags(), families);
    return families;
  }

 private:
  const Follower* follower_;
  const bool model_labels_;
};

}  // namespace

// The store's state, read at every scrape rather than kept up to date.
class StateCollector : public prometheus::Collectable {
 public:
  StateCollector(const ModelStore* store, int64_t memory_limit_bytes,
                 std::function<int64_t()> active_calls)
      : store_(store),
        memory_limit_bytes_(memory_limit_bytes),
        active_calls_(std::move(active_calls)) {}

  void SetModelLabels(bool enabled) { model_labels_ = enabled; }

  std::vector<prometheus::MetricFamily> Collect() const override {
    const std::vector<ModelSummary> models = store_->Summaries();
    auto count = Gauge("modelstate_models", "Models held.");
    AddSample(count, static_cast<double>(models.size()));
    auto epoch = Gauge("modelstate_epoch_info",
                       "The epoch of the history this daemon's versions "
                       "belong to (0000000000000000: not known yet).");
    AddSample(epoch, 1, {{"epoch", EpochName(store_->epoch())}});
    std::vector<prometheus::MetricFamily> families = {count, epoch};
    if (model_labels_) AddPerModelGauges(models, families);
    auto live = Gauge("modelstate_memory_live_bytes",
                      "Tensor bytes alive: models, retained versions, "
                      "snapshots held by streams, kept casts.");
    AddSample(live, static_cast<double>(store_->live_bytes()));
    auto reserved = Gauge("modelstate_memory_reserved_bytes",
                          "Bytes reserved by loads in flight.");
    AddSample(reserved, static_cast<double>(store_->reserved_bytes()));
    auto limit = Gauge("modelstate_memory_limit_bytes",
                       "--memory_limit_bytes; 0 means none.");
    AddSample(limit, static_cast<double>(memory_limit_bytes_));
    auto metadata = Gauge("modelstate_memory_metadata_bytes",
                          "Estimated bytes of modules, slots, names and "
                          "shapes around the tensors; counted by the limit.");
    AddSample(metadata, static_cast<double>(store_->metadata_bytes()));
    auto pooled = Gauge("modelstate_memory_pooled_bytes",
                        "Freed tensor memory held for reuse "
                        "(--storage_pool_bytes); counted against the memory "
                        "limit as spare room.");
    AddSample(pooled, static_cast<double>(store_->pooled_bytes()));
    auto loads = Gauge("modelstate_pending_loads", "Loads in flight.");
    AddSample(loads, store_->pending_loads());
    auto calls =
        Gauge("modelstate_active_calls", "Calls in flight, streams included.");
    AddSample(calls, static_cast<double>(active_calls_()));
    families.insert(families.end(),
                    {live, reserved, pooled, metadata, limit, loads, calls});
    AddHeapGauges(families);
    return families;
  }

 private:
  const ModelStore* store_;
  const int64_t memory_limit_bytes_;
  const std::function<int64_t()> active_calls_;
  std::atomic<bool> model_labels_{true};
};

std::shared_ptr<prometheus::Collectable> FollowerMetrics(
    const Follower* follower, bool model_labels) {
  return std::make_shared<FollowerCollector>(follower, model_labels);
}

namespace {

class ConnectionCollector : public prometheus::Collectable {
 public:
  explicit ConnectionCollector(const ConnectionGate* gate) : gate_(gate) {}

  std::vector<prometheus::MetricFamily> Collect() const override {
    const ConnectionGate::Counts counts = gate_->counts();
    auto open = Gauge("modelstate_connections_open",
                      "Connections open on the main port.");
    AddSample(open, static_cast<double>(counts.open));
    auto accepting = Gauge("modelstate_accepting",
                           "0 while the main port cannot accept connections "
                           "(out of file descriptors).");
    AddSample(accepting, gate_->accepting() ? 1 : 0);
    return {
        open,
        accepting,
        Counter("modelstate_connections_accepted_total",
                "Connections accepted on the main port.",
                static_cast<double>(counts.accepted)),
        Counter("modelstate_connections_refused_total",
                "Connections closed at once: at --max_connections with every "
                "connection authenticated, or out of file descriptors.",
                static_cast<double>(counts.refused)),
        Counter("modelstate_connections_evicted_total",
                "Connections without an authenticated call closed to make "
                "room for a new one at --max_connections.",
                static_cast<double>(counts.evicted)),
        Counter("modelstate_connections_expired_total",
                "Connections closed for making no authenticated call within "
                "--unauthenticated_connection_timeout.",
                static_cast<double>(counts.expired)),
    };
  }

 private:
  const ConnectionGate* gate_;
};

}  // namespace

std::shared_ptr<prometheus::Collectable> ConnectionMetrics(
    const ConnectionGate* gate) {
  return std::make_shared<ConnectionCollector>(gate);
}

Metrics::Metrics(const ModelStore* store, int64_t memory_limit_bytes,
                 std::function<int64_t()> active_calls)
    : registry_(std::make_shared<prometheus::Registry>()),
      rpcs_(prometheus::BuildCounter()
                .Name("modelstate_rpcs_total")
                .Help("Finished RPCs by method and status code.")
                .Register(*registry_)),
      bytes_(prometheus::BuildCounter()
                 .Name("modelstate_tensor_bytes_total")
                 .Help("Tensor bytes sent (fetches) and received (loads).")
                 .Register(*registry_)),
      durations_(prometheus::BuildHistogram()
                     .Name("modelstate_rpc_duration_seconds")
                     .Help("RPC durations, transfers included, by method.")
                     .Register(*registry_)),
      auth_failures_(prometheus::BuildCounter()
                         .Name("modelstate_auth_failures_total")
                         .Help("Calls refused by the auth policy, by reason.")
                         .Register(*registry_)),
      state_(std::make_shared<StateCollector>(store, memory_limit_bytes,
                                              std::move(active_calls))) {}

void Metrics::SetModelLabels(bool enabled) { state_->SetModelLabels(enabled); }

std::shared_ptr<prometheus::Collectable> Metrics::state_metrics() const {
  return state_;
}

void Metrics::RecordRpc(absl::string_view method, grpc::StatusCode code,
                        uint64_t bytes, absl::Duration duration) {
  const std::string name(method);
  rpcs_.Add({{"method", name}, {"code", StatusCodeName(code)}}).Increment();
  if (bytes > 0) {
    const char* direction = name == "LoadStateDict" ? "received" : "sent";
    bytes_.Add({{"direction", direction}})
        .Increment(static_cast<double>(bytes));
  }
  static const prometheus::Histogram::BucketBoundaries kBuckets = {
      0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30, 100, 300};
  durations_.Add({{"method", name}}, kBuckets)
      .Observe(absl::ToDoubleSeconds(duration));
}

void Metrics::RecordAuthFailure(absl::string_view reason) {
  auth_failures_.Add({{"reason", std::string(reason)}}).Increment();
}

}  // namespace modelstate

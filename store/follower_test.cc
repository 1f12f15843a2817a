// Follower sync logic against a fake upstream that is another store in the
// same process: delta plans, trees rebuilt with the upstream's classes and
// kinds, events mirrored in commit order, writes refused, upstream outages.
#include "store/follower.h"

#include <atomic>
#include <deque>
#include <map>
#include <set>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/status_macros.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "model/test_util.h"
#include "store/watch_queue.h"

namespace modelstate {
namespace {

using ::testing::HasSubstr;

constexpr char kNet[] = R"({"type": "Sequential", "modules": [
    {"type": "Linear", "args": [64, 64]}, {"type": "BatchNorm1d", "args": [64]},
    {"type": "ReLU"}, {"type": "Linear", "args": [64, 8]}]})";

// Serves a store as an upstream. Disconnect() makes every call, and the watch
// in flight, fail with Unavailable until Reconnect().
class FakeUpstream : public Upstream {
 public:
  explicit FakeUpstream(ModelStore* store) : store_(store) {}

  std::string name() const override { return "fake-primary:1"; }

  absl::Status WatchAll(
      const std::function<bool(const ModelEvent&)>& on_event) override {
    RETURN_IF_ERROR(Reachable());
    auto queue = std::make_shared<Queue>();
    auto push = [queue](const ModelEvent& event) {
      absl::MutexLock lock(&queue->mu);
      queue->events.Push(event);
    };
    // A server from before followers ignores all_models and watches the
    // model named "".
    int64_t id;
    if (legacy_) {
      id = store_->Watch("", push);
    } else {
      ASSIGN_OR_RETURN(id, store_->WatchAll(push));
    }
    absl::Status status;
    while ((status = Reachable()).ok()) {
      ModelEvent event{};
      {
        absl::MutexLock lock(&queue->mu);
        auto ready = [&queue]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(queue->mu) {
          return !queue->events.empty();
        };
        if (!queue->mu.AwaitWithTimeout(absl::Condition(&ready),
                                        absl::Milliseconds(10))) {
          continue;
        }
        event = queue->events.Pop();
      }
      if (!on_event(event)) break;
    }
    store_->RemoveListener(id);
    return status;
  }

  absl::StatusOr<ModelManifest> Describe(const std::string& model,
                                         int64_t version) override {
    RETURN_IF_ERROR(Reachable());
    FetchRequest request(model);
    request.version = version;
    return store_->Describe(request);
  }

  absl::StatusOr<StateDict> Fetch(
      const std::string& model, int64_t version,
      const std::vector<std::string>& keys) override {
    RETURN_IF_ERROR(Reachable());
    FetchRequest request(model);
    request.version = version;
    request.keys = keys;
    ASSIGN_OR_RETURN(FetchPlan plan, store_->Fetch(request));
    fetched_bytes_ += plan.state->TotalBytes();
    return *plan.state;
  }

  void Cancel() override {
    absl::MutexLock lock(&mu_);
    cancelled_ = true;
  }

  void Disconnect() {
    absl::MutexLock lock(&mu_);
    down_ = true;
  }
  void Reconnect() {
    absl::MutexLock lock(&mu_);
    down_ = false;
  }
  uint64_t fetched_bytes() const { return fetched_bytes_; }
  void set_legacy(bool legacy) { legacy_ = legacy; }

 private:
  struct Queue {
    absl::Mutex mu;
    LatestEventQueue events ABSL_GUARDED_BY(mu);
  };

  absl::Status Reachable() const {
    absl::MutexLock lock(&mu_);
    if (cancelled_) return absl::CancelledError("cancelled");
    if (down_) return absl::UnavailableError("fake upstream is down");
    return absl::OkStatus();
  }
  ModelStore* store_;
  mutable absl::Mutex mu_;
  bool down_ ABSL_GUARDED_BY(mu_) = false;
  bool cancelled_ ABSL_GUARDED_BY(mu_) = false;
  std::atomic<uint64_t> fetched_bytes_{0};
  std::atomic<bool> legacy_{false};
};

ModelStore::Options ReplicaOptions(int retain_versions = 1) {
  ModelStore::Options options;
  options.retain_versions = retain_versions;
  options.replica_of = "fake-primary:1";
  return options;
}

ModelStore::Options PrimaryOptions(int retain_versions = 1) {
  ModelStore::Options options;
  options.retain_versions = retain_versions;
  return options;
}

// `model`'s state dict with every tensor filled with `value`, except that
// with `only` set, just that key changes.
StateDict Filled(ModelStore& store, const std::string& model, float value,
                 const std::string& only = "") {
  StateDict state;
  const StateDict current =
      GetStateDict(store.GetSnapshot(model).value().root).value();
  for (const auto& entry : current.entries()) {
    if (!only.empty() && entry.key != only) continue;
    state.Set(entry.key,
              FullTensor(entry.tensor.dtype(), entry.tensor.shape(), value));
  }
  return state;
}

// Same version, keys, kinds, bytes, root class and module classes.
void ExpectMirrored(ModelStore& primary, ModelStore& replica,
                    const std::string& model) {
  const ModelManifest want = primary.Describe(FetchRequest(model)).value();
  absl::StatusOr<ModelManifest> got = replica.Describe(FetchRequest(model));
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->version, want.version);
  EXPECT_EQ(got->summary.root_class, want.summary.root_class);
  EXPECT_EQ(got->class_names, want.class_names);
  EXPECT_EQ(got->architecture_json, want.architecture_json);
  ASSERT_EQ(got->tensors.size(), want.tensors.size());
  for (size_t i = 0; i < want.tensors.size(); ++i) {
    EXPECT_EQ(got->tensors[i].name, want.tensors[i].name);
    EXPECT_EQ(got->tensors[i].kind, want.tensors[i].kind);
    EXPECT_EQ(got->tensors[i].checksum, want.tensors[i].checksum);
  }
}

// Waits up to 30 s for `done`.
bool WaitFor(const std::function<bool()>& done) {
  const absl::Time deadline = absl::Now() + absl::Seconds(30);
  while (!done()) {
    if (absl::Now() > deadline) return false;
    absl::SleepFor(absl::Milliseconds(5));
  }
  return true;
}

int64_t VersionOf(ModelStore& store, const std::string& model) {
  absl::StatusOr<Snapshot> snapshot = store.GetSnapshot(model);
  return snapshot.ok() ? snapshot->version : 0;
}

TEST(WatchAllTest, ListsEveryModelThenListedThenEveryCommit) {
  ModelStore store;
  ASSERT_TRUE(store.CreateFromSpec("b", kNet, 1).ok());
  ASSERT_TRUE(store.CreateFromSpec("a", kNet, 1).ok());
  ASSERT_TRUE(store.Load(LoadRequest("a"), Filled(store, "a", 1)).ok());
  std::vector<std::string> events;
  const int64_t id =
      store
          .WatchAll([&events](const ModelEvent& event) {
            events.push_back(absl::StrCat(static_cast<int>(event.type), "@",
                                          event.model, "@", event.version));
          })
          .value();
  ASSERT_TRUE(store.CreateFromSpec("c", kNet, 1).ok());
  ASSERT_TRUE(store.Delete("b").ok());
  store.RemoveListener(id);
  ASSERT_TRUE(store.Delete("c").ok());
  EXPECT_THAT(events, ::testing::ElementsAre("3@a@2", "3@b@1", "5@@0", "0@c@1",
                                             "2@b@1"));
}

TEST(SyncModelTest, FirstSyncFetchesAllThenOnlyChangedTensors) {
  ModelStore primary(PrimaryOptions());
  ModelStore replica(ReplicaOptions());
  FakeUpstream upstream(&primary);
  ASSERT_TRUE(primary.CreateFromSpec("net", kNet, 1).ok());
  // Equal contents travel once (BatchNorm's zero bias and running mean).
  uint64_t total = 0;
  std::set<uint64_t> contents;
  const StateDict state =
      GetStateDict(primary.GetSnapshot("net")->root).value();
  for (const auto& entry : state.entries()) {
    if (contents.insert(entry.tensor.Checksum()).second)
      total += entry.tensor.num_bytes();
  }

  SyncOutcome first = SyncModel(replica, upstream, "net").value();
  EXPECT_TRUE(first.committed);
  EXPECT_EQ(first.version, 1);
  EXPECT_EQ(first.bytes_fetched, total);
  EXPECT_EQ(upstream.fetched_bytes(), total);
  ExpectMirrored(primary, replica, "net");

  // Nothing changed: no fetch, no commit.
  SyncOutcome again = SyncModel(replica, upstream, "net").value();
  EXPECT_FALSE(again.committed);
  EXPECT_EQ(upstream.fetched_bytes(), total);

  // One tensor changes: only it travels; the rest share storage.
  const Snapshot before = replica.GetSnapshot("net").value();
  LoadRequest partial("net");
  partial.strict = false;
  ASSERT_TRUE(primary.Load(partial, Filled(primary, "net", 7, "3.bias")).ok());
  SyncOutcome delta = SyncModel(replica, upstream, "net").value();
  EXPECT_TRUE(delta.committed);
  EXPECT_EQ(delta.version, 2);
  EXPECT_EQ(delta.tensors_fetched, 1);
  EXPECT_EQ(delta.bytes_fetched, 8 * sizeof(float));
  EXPECT_EQ(upstream.fetched_bytes(), total + 8 * sizeof(float));
  ExpectMirrored(primary, replica, "net");
  const StateDict old_state = GetStateDict(before.root).value();
  const StateDict new_state =
      GetStateDict(replica.GetSnapshot("net")->root).value();
  EXPECT_TRUE(
      new_state.Find("0.weight")->SharesBytesWith(*old_state.Find("0.weight")));
  EXPECT_FALSE(
      new_state.Find("3.bias")->SharesBytesWith(*old_state.Find("3.bias")));
}

TEST(SyncModelTest, RollbackReusesRetainedTensorsAndFetchesNothing) {
  ModelStore primary(PrimaryOptions(3));
  ModelStore replica(ReplicaOptions(3));
  FakeUpstream upstream(&primary);
  ASSERT_TRUE(primary.CreateFromSpec("net", kNet, 1).ok());
  ASSERT_TRUE(SyncModel(replica, upstream, "net").ok());
  ASSERT_TRUE(primary.Load(LoadRequest("net"), Filled(primary, "net", 2)).ok());
  ASSERT_TRUE(SyncModel(replica, upstream, "net").ok());
  const uint64_t before = upstream.fetched_bytes();
  ASSERT_TRUE(primary.Rollback("net", 1).ok());
  SyncOutcome rolled = SyncModel(replica, upstream, "net").value();
  EXPECT_EQ(rolled.version, 3);
  EXPECT_EQ(rolled.tensors_fetched, 0);
  EXPECT_EQ(upstream.fetched_bytes(), before);
  ExpectMirrored(primary, replica, "net");
  EXPECT_EQ(replica.RetainedVersions("net").value(),
            (std::vector<int64_t>{3, 2, 1}));
}

TEST(SyncModelTest, TiedTensorsTravelOnceAndStayShared) {
  ModelStore primary(PrimaryOptions());
  ModelStore replica(ReplicaOptions());
  FakeUpstream upstream(&primary);
  StateDict state;
  const Tensor shared = FullTensor(DType::kFloat32, {16, 16}, 3);
  state.Set("embed.weight", shared);
  state.Set("head.weight", shared);
  state.Set("head.bias", FullTensor(DType::kFloat32, {16}, 1));
  LoadRequest create("tied");
  create.create_if_missing = true;
  create.class_names = {{"", "LM"}, {"head", "Linear"}};
  ASSERT_TRUE(primary.Load(create, state).ok());
  SyncOutcome outcome = SyncModel(replica, upstream, "tied").value();
  EXPECT_EQ(outcome.tensors_fetched, 2);
  EXPECT_EQ(upstream.fetched_bytes(), (16 * 16 + 16) * sizeof(float));
  ExpectMirrored(primary, replica, "tied");
  const StateDict mirrored =
      GetStateDict(replica.GetSnapshot("tied")->root).value();
  EXPECT_TRUE(mirrored.Find("embed.weight")
                  ->SharesBytesWith(*mirrored.Find("head.weight")));
}

TEST(SyncModelTest, UpstreamThatRestartedWithOtherStateIsMirrored) {
  ModelStore primary(PrimaryOptions());
  ModelStore replica(ReplicaOptions());
  FakeUpstream upstream(&primary);
  ASSERT_TRUE(primary.CreateFromSpec("net", kNet, 1).ok());
  ASSERT_TRUE(primary.Load(LoadRequest("net"), Filled(primary, "net", 2)).ok());
  ASSERT_TRUE(SyncModel(replica, upstream, "net").ok());
  // A new upstream process without the old state: version 1 again, other
  // bytes. The follower mirrors it rather than keeping a version 2 that no
  // longer exists anywhere.
  ModelStore restarted(PrimaryOptions());
  FakeUpstream new_upstream(&restarted);
  ASSERT_TRUE(restarted.CreateFromSpec("net", kNet, 9).ok());
  SyncOutcome outcome = SyncModel(replica, new_upstream, "net").value();
  EXPECT_TRUE(outcome.committed);
  EXPECT_EQ(outcome.version, 1);
  ExpectMirrored(restarted, replica, "net");
}

TEST(SyncModelTest, FetchedTensorThatDiffersFromTheManifestIsRefused) {
  ModelStore primary(PrimaryOptions());
  ASSERT_TRUE(primary.CreateFromSpec("net", kNet, 1).ok());
  const ModelManifest manifest = primary.Describe(FetchRequest("net")).value();
  const SyncPlan plan = PlanSync(manifest, {});
  FetchRequest request("net");
  request.keys = plan.fetch_keys;
  StateDict fetched = *primary.Fetch(request).value().state;
  ASSERT_TRUE(BuildReplica(manifest, plan, fetched).ok());
  fetched.Set("0.bias", FullTensor(DType::kFloat32, {64}, 5));
  absl::StatusOr<Snapshot> built = BuildReplica(manifest, plan, fetched);
  EXPECT_EQ(built.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(built.status().message(), HasSubstr("0.bias"));
}

TEST(SyncModelTest, RespectsTheFollowersMemoryLimitBeforeFetching) {
  ModelStore primary(PrimaryOptions());
  ASSERT_TRUE(primary.CreateFromSpec("net", kNet, 1).ok());
  ModelStore::Options small = ReplicaOptions();
  small.memory_limit_bytes = 1024;
  ModelStore replica(small);
  FakeUpstream upstream(&primary);
  EXPECT_EQ(SyncModel(replica, upstream, "net").status().code(),
            absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(upstream.fetched_bytes(), 0u);
  EXPECT_EQ(replica.List().size(), 0u);
}

TEST(ReplicaStoreTest, RefusesEveryWriteNamingTheUpstreamAndChangesNothing) {
  ModelStore primary(PrimaryOptions(2));
  ModelStore replica(ReplicaOptions(2));
  FakeUpstream upstream(&primary);
  ASSERT_TRUE(primary.CreateFromSpec("net", kNet, 1).ok());
  ASSERT_TRUE(SyncModel(replica, upstream, "net").ok());
  const ModelManifest before = replica.Describe(FetchRequest("net")).value();
  LoadRequest create("other");
  create.create_if_missing = true;
  const std::vector<absl::Status> refused = {
      replica.Create("x", MustBuild(kNet)),
      replica.CreateFromSpec("x", kNet, 0).status(),
      replica.Delete("net"),
      replica.Load(LoadRequest("net"), Filled(replica, "net", 3)).status(),
      replica.Load(create, Filled(replica, "net", 3)).status(),
      replica.Rollback("net", 1).status(),
  };
  for (const absl::Status& status : refused) {
    EXPECT_EQ(status.code(), absl::StatusCode::kFailedPrecondition) << status;
    EXPECT_THAT(status.message(), HasSubstr("follows fake-primary:1"));
  }
  EXPECT_EQ(replica.List().size(), 1u);
  const ModelManifest after = replica.Describe(FetchRequest("net")).value();
  EXPECT_EQ(after.version, before.version);
  EXPECT_EQ(after.tensors.size(), before.tensors.size());
  for (size_t i = 0; i < after.tensors.size(); ++i)
    EXPECT_EQ(after.tensors[i].checksum, before.tensors[i].checksum);
  // And a primary's store refuses the replica-only API.
  EXPECT_EQ(primary.RemoveReplicated("net").code(),
            absl::StatusCode::kFailedPrecondition);
}

// Runs a follower on a thread of its own until destroyed.
class RunningFollower {
 public:
  RunningFollower(ModelStore* store, Upstream* upstream)
      : follower_(store, upstream, Options()),
        thread_([this] { follower_.Run(); }) {}
  ~RunningFollower() {
    follower_.Stop();
    thread_.join();
  }
  Follower& operator*() { return follower_; }
  Follower* operator->() { return &follower_; }
  std::vector<std::string> log() {
    absl::MutexLock lock(&mu_);
    return log_;
  }

 private:
  FollowerOptions Options() {
    FollowerOptions options;
    options.min_backoff = absl::Milliseconds(5);
    options.max_backoff = absl::Milliseconds(50);
    options.log = [this](const std::string& line) {
      absl::MutexLock lock(&mu_);
      log_.push_back(line);
    };
    return options;
  }

  absl::Mutex mu_;
  std::vector<std::string> log_ ABSL_GUARDED_BY(mu_);
  Follower follower_;
  std::thread thread_;
};

TEST(FollowerTest, MirrorsCreatesLoadsRollbacksAndDeletesInCommitOrder) {
  ModelStore primary(PrimaryOptions(3));
  ModelStore replica(ReplicaOptions(3));
  FakeUpstream upstream(&primary);
  ASSERT_TRUE(primary.CreateFromSpec("stale", kNet, 1).ok());
  // A model the follower holds but the upstream does not (any more) goes at
  // the first listing.
  ASSERT_TRUE(SyncModel(replica, upstream, "stale").ok());
  ASSERT_TRUE(primary.Delete("stale").ok());

  absl::Mutex mu;
  std::vector<ModelEvent> seen;
  // Until its first full sync a follower lists nothing to followers of its
  // own.
  EXPECT_EQ(replica.WatchAll([](const ModelEvent&) {}).status().code(),
            absl::StatusCode::kUnavailable);
  const int64_t watch = replica.AddListener([&](const ModelEvent& event) {
    absl::MutexLock lock(&mu);
    seen.push_back(event);
  });
  RunningFollower follower(&replica, &upstream);
  ASSERT_TRUE(WaitFor([&] { return follower->synced(); }));
  EXPECT_EQ(replica.List().size(), 0u);
  const int64_t listed = replica.WatchAll([](const ModelEvent&) {}).value();
  replica.RemoveListener(listed);

  ASSERT_TRUE(primary.CreateFromSpec("net", kNet, 1).ok());
  for (int i = 0; i < 10; ++i) {
    ASSERT_TRUE(
        primary.Load(LoadRequest("net"), Filled(primary, "net", i)).ok());
  }
  ASSERT_TRUE(primary.Rollback("net", 10).ok());
  ASSERT_TRUE(primary.CreateFromSpec("gone", kNet, 2).ok());
  ASSERT_TRUE(primary.Delete("gone").ok());
  ASSERT_TRUE(WaitFor([&] {
    return VersionOf(replica, "net") == 12 && VersionOf(replica, "gone") == 0;
  }));
  ExpectMirrored(primary, replica, "net");
  replica.RemoveListener(watch);

  // Per model, versions only grow, and the follower's versions are the
  // primary's.
  absl::MutexLock lock(&mu);
  std::map<std::string, int64_t> last;
  for (const ModelEvent& event : seen) {
    if (event.type == ModelEvent::Type::kListed ||
        event.type == ModelEvent::Type::kDeleted) {
      continue;
    }
    EXPECT_GT(event.version, last[event.model]) << event.model;
    last[event.model] = event.version;
  }
  EXPECT_EQ(last["net"], 12);
  const FollowerStats stats = follower->stats();
  EXPECT_GE(stats.syncs, 1);  // Coalesced: a slow follower may jump.
  // The follower may see "gone" created before its deletion arrives.
  EXPECT_TRUE(WaitFor([&] { return follower->stats().lag_versions == 0; }));
  EXPECT_GE(stats.deletes, 1);
}

TEST(FollowerTest, KeepsServingWhileTheUpstreamIsDownAndCatchesUp) {
  ModelStore primary(PrimaryOptions());
  ModelStore replica(ReplicaOptions());
  FakeUpstream upstream(&primary);
  ASSERT_TRUE(primary.CreateFromSpec("net", kNet, 1).ok());
  RunningFollower follower(&replica, &upstream);
  ASSERT_TRUE(WaitFor([&] { return VersionOf(replica, "net") == 1; }));

  upstream.Disconnect();
  ASSERT_TRUE(primary.Load(LoadRequest("net"), Filled(primary, "net", 4)).ok());
  ASSERT_TRUE(
      WaitFor([&] { return follower->stats().upstream_failures >= 3; }));
  // Still serving the last version, still synced (health stays SERVING).
  EXPECT_EQ(VersionOf(replica, "net"), 1);
  EXPECT_TRUE(follower->synced());
  EXPECT_FALSE(follower->stats().connected);

  upstream.Reconnect();
  ASSERT_TRUE(WaitFor([&] { return VersionOf(replica, "net") == 2; }));
  ExpectMirrored(primary, replica, "net");
  EXPECT_TRUE(WaitFor([&] { return follower->stats().connected; }));
  bool logged_outage = false;
  for (const std::string& line : follower.log())
    logged_outage |= line.find("unavailable") != std::string::npos;
  EXPECT_TRUE(logged_outage);
}

TEST(FollowerTest, AModelThatDoesNotFitDoesNotHoldUpTheOthers) {
  ModelStore primary(PrimaryOptions());
  ASSERT_TRUE(
      primary
          .CreateFromSpec("small", R"({"type": "Linear", "args": [4, 4]})", 1)
          .ok());
  ASSERT_TRUE(primary.CreateFromSpec("big", kNet, 1).ok());
  ModelStore::Options options = ReplicaOptions();
  options.memory_limit_bytes = 4096;
  ModelStore replica(options);
  FakeUpstream upstream(&primary);
  RunningFollower follower(&replica, &upstream);
  ASSERT_TRUE(WaitFor([&] { return follower->synced(); }));
  EXPECT_EQ(VersionOf(replica, "small"), 1);
  EXPECT_EQ(VersionOf(replica, "big"), 0);
  const FollowerStats stats = follower->stats();
  EXPECT_EQ(stats.sync_failures, 1);
  EXPECT_EQ(stats.upstream_failures, 0);
  EXPECT_EQ(stats.lag_versions, 1);
  ASSERT_TRUE(
      primary.Load(LoadRequest("small"), Filled(primary, "small", 2)).ok());
  EXPECT_TRUE(WaitFor([&] { return VersionOf(replica, "small") == 2; }));
}

TEST(FollowerTest, SaysSoWhenTheUpstreamCannotWatchAllModels) {
  ModelStore primary(PrimaryOptions());
  ModelStore replica(ReplicaOptions());
  FakeUpstream upstream(&primary);
  upstream.set_legacy(true);
  ASSERT_TRUE(primary.CreateFromSpec("net", kNet, 1).ok());
  RunningFollower follower(&replica, &upstream);
  ASSERT_TRUE(
      WaitFor([&] { return follower->stats().upstream_failures >= 2; }));
  EXPECT_FALSE(follower->synced());
  EXPECT_EQ(replica.List().size(), 0u);
  bool explained = false;
  for (const std::string& line : follower.log()) {
    explained |= line.find("does not serve watches over all models") !=
                 std::string::npos;
  }
  EXPECT_TRUE(explained);
}

}  // namespace
}  // namespace modelstate

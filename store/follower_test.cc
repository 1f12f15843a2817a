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
// in flight, fail with Unavailable until Reconnect(). Like a load-balanced
// address, it can be made to answer from another store: Serve() moves every
// call there (ending the watch in flight), AnswerFrom() only Describe and
// Fetch.
class FakeUpstream : public Upstream {
 public:
  explicit FakeUpstream(ModelStore* store) : watched_(store), answers_(store) {}

  std::string name() const override { return "fake-primary:1"; }

  absl::Status WatchAll(
      const std::function<bool(const ModelEvent&)>& on_event) override {
    RETURN_IF_ERROR(Reachable());
    ModelStore* store;
    int64_t serving;
    {
      absl::MutexLock lock(&mu_);
      store = watched_;
      serving = serving_;
    }
    auto queue = std::make_shared<Queue>();
    auto push = [queue](const ModelEvent& event) {
      absl::MutexLock lock(&queue->mu);
      queue->events.Push(event);
    };
    // A server from before followers ignores all_models and watches the
    // model named "".
    int64_t id;
    if (legacy_) {
      id = store->Watch("", push);
    } else {
      ASSIGN_OR_RETURN(id, store->WatchAll(push));
    }
    absl::Status status;
    while ((status = Reachable(serving)).ok()) {
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
    store->RemoveListener(id);
    return status;
  }

  absl::StatusOr<ModelManifest> Describe(const std::string& model,
                                         int64_t version) override {
    RETURN_IF_ERROR(Reachable());
    FetchRequest request(model);
    request.version = version;
    return answers()->Describe(request);
  }

  absl::StatusOr<StateDict> Fetch(
      const std::string& model, int64_t version,
      const std::vector<std::string>& keys,
      const std::function<void(uint64_t)>& progress) override {
    RETURN_IF_ERROR(Reachable());
    FetchRequest request(model);
    request.version = version;
    request.keys = keys;
    ASSIGN_OR_RETURN(FetchPlan plan, answers()->Fetch(request));
    if (progress) progress(plan.state->TotalBytes() / 2);
    RETURN_IF_ERROR(PassFetchGate());
    fetched_bytes_ += plan.state->TotalBytes();
    if (progress) progress(plan.state->TotalBytes());
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
  // Every call goes to `store` from now on; the watch in flight ends.
  void Serve(ModelStore* store) {
    absl::MutexLock lock(&mu_);
    watched_ = store;
    answers_ = store;
    ++serving_;
  }
  // Describe and Fetch go to `store`; the watch stays where it is.
  void AnswerFrom(ModelStore* store) {
    absl::MutexLock lock(&mu_);
    answers_ = store;
  }
  // Fetches wait, half done, until ReleaseFetches (or fail with Unavailable,
  // with `fail`).
  void HoldFetches(bool fail = false) {
    absl::MutexLock lock(&mu_);
    fetch_gate_ = fail ? Gate::kFail : Gate::kHold;
  }
  void ReleaseFetches() {
    absl::MutexLock lock(&mu_);
    fetch_gate_ = Gate::kOpen;
  }
  int fetches_held() const {
    absl::MutexLock lock(&mu_);
    return fetches_held_;
  }
  uint64_t fetched_bytes() const { return fetched_bytes_; }
  void set_legacy(bool legacy) { legacy_ = legacy; }

 private:
  struct Queue {
    absl::Mutex mu;
    LatestEventQueue events ABSL_GUARDED_BY(mu);
  };
  enum class Gate { kOpen, kHold, kFail };

  ModelStore* answers() const {
    absl::MutexLock lock(&mu_);
    return answers_;
  }
  absl::Status PassFetchGate() {
    absl::MutexLock lock(&mu_);
    if (fetch_gate_ == Gate::kFail)
      return absl::UnavailableError("fake upstream drops fetches");
    ++fetches_held_;
    auto passable = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      return fetch_gate_ != Gate::kHold || cancelled_;
    };
    mu_.Await(absl::Condition(&passable));
    --fetches_held_;
    return cancelled_ ? absl::CancelledError("cancelled") : absl::OkStatus();
  }
  // OK while reachable (and, given `serving`, still serving the same store).
  absl::Status Reachable(int64_t serving = -1) const {
    absl::MutexLock lock(&mu_);
    if (cancelled_) return absl::CancelledError("cancelled");
    if (down_) return absl::UnavailableError("fake upstream is down");
    if (serving >= 0 && serving != serving_)
      return absl::UnavailableError("fake upstream moved to another server");
    return absl::OkStatus();
  }
  mutable absl::Mutex mu_;
  ModelStore* watched_ ABSL_GUARDED_BY(mu_);
  ModelStore* answers_ ABSL_GUARDED_BY(mu_);
  int64_t serving_ ABSL_GUARDED_BY(mu_) = 0;
  bool down_ ABSL_GUARDED_BY(mu_) = false;
  bool cancelled_ ABSL_GUARDED_BY(mu_) = false;
  Gate fetch_gate_ ABSL_GUARDED_BY(mu_) = Gate::kOpen;
  int fetches_held_ ABSL_GUARDED_BY(mu_) = 0;
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

constexpr uint64_t kEpochA = 0xa1a1a1a1a1a1a1a1;
constexpr uint64_t kEpochB = 0xb2b2b2b2b2b2b2b2;

void SetEpoch(ModelStore& store, uint64_t epoch) {
  ASSERT_TRUE(store.RecordEpoch(epoch).ok());
}

// A replica behind a load balancer that has not caught up yet answers with
// an older version of the same history: the follower keeps what it holds.
TEST(SyncModelTest, ALaggingUpstreamNeverTakesTheFollowerBackwards) {
  ModelStore primary(PrimaryOptions());
  ModelStore lagging(ReplicaOptions());
  ModelStore replica(ReplicaOptions());
  for (ModelStore* store : {&primary, &lagging, &replica})
    SetEpoch(*store, kEpochA);
  FakeUpstream to_primary(&primary);
  FakeUpstream to_lagging(&lagging);
  ASSERT_TRUE(primary.CreateFromSpec("net", kNet, 1).ok());
  ASSERT_TRUE(SyncModel(lagging, to_primary, "net").ok());
  ASSERT_TRUE(primary.Load(LoadRequest("net"), Filled(primary, "net", 2)).ok());
  ASSERT_TRUE(SyncModel(replica, to_primary, "net").value().committed);

  const SyncOutcome outcome = SyncModel(replica, to_lagging, "net").value();
  EXPECT_TRUE(outcome.stale);
  EXPECT_FALSE(outcome.committed);
  EXPECT_EQ(outcome.version, 1);
  EXPECT_EQ(to_lagging.fetched_bytes(), 0u);
  ExpectMirrored(primary, replica, "net");
  // The store itself refuses to go back, or to delete what is newer.
  const Snapshot old = lagging.GetSnapshot("net").value();
  EXPECT_EQ(replica.ApplyReplicated(old).code(), absl::StatusCode::kAborted);
  EXPECT_EQ(replica.RemoveReplicated("net", 1).code(),
            absl::StatusCode::kAborted);
  ExpectMirrored(primary, replica, "net");
}

// Another history (a primary that restarted without its data) is taken on
// only when asked: kReplace mirrors it whatever the versions, retained ones
// included; a forward sync refuses a manifest of another epoch.
TEST(SyncModelTest, AnotherEpochIsRefusedForwardAndReplacesWhenAdopted) {
  ModelStore primary(PrimaryOptions());
  ModelStore replica(ReplicaOptions(3));
  SetEpoch(primary, kEpochA);
  SetEpoch(replica, kEpochA);
  FakeUpstream upstream(&primary);
  ASSERT_TRUE(primary.CreateFromSpec("net", kNet, 1).ok());
  ASSERT_TRUE(primary.Load(LoadRequest("net"), Filled(primary, "net", 2)).ok());
  ASSERT_TRUE(SyncModel(replica, upstream, "net").ok());
  ModelStore restarted(PrimaryOptions());
  SetEpoch(restarted, kEpochB);
  FakeUpstream new_upstream(&restarted);
  ASSERT_TRUE(restarted.CreateFromSpec("net", kNet, 9).ok());

  absl::StatusOr<SyncOutcome> refused = SyncModel(replica, new_upstream, "net");
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kAborted);
  EXPECT_THAT(refused.status().message(),
              HasSubstr("of epoch b2b2b2b2b2b2b2b2"));
  ExpectMirrored(primary, replica, "net");

  ASSERT_TRUE(replica.BeginAdoption(kEpochB).ok());
  SyncOptions replace;
  replace.how = ReplicaWrite::kReplace;
  SyncOutcome outcome =
      SyncModel(replica, new_upstream, "net", replace).value();
  EXPECT_TRUE(outcome.committed);
  EXPECT_EQ(outcome.version, 1);
  ExpectMirrored(restarted, replica, "net");
  EXPECT_EQ(replica.RetainedVersions("net").value(), (std::vector<int64_t>{1}));
}

TEST(ReplicaStoreTest, RemembersDeletionsSoALaggingUpstreamCannotBringOneBack) {
  ModelStore primary(PrimaryOptions());
  ModelStore replica(ReplicaOptions());
  ASSERT_TRUE(primary.CreateFromSpec("net", kNet, 1).ok());
  Snapshot net = primary.GetSnapshot("net").value();
  net.version = 3;
  ASSERT_TRUE(replica.ApplyReplicated(net).ok());
  std::vector<std::string> events;
  const int64_t id = replica.AddListener([&events](const ModelEvent& event) {
    events.push_back(absl::StrCat(static_cast<int>(event.type), "@",
                                  event.model, "@", event.version));
  });
  ASSERT_TRUE(replica.RemoveReplicated("net", 3).ok());
  EXPECT_EQ(replica.DeletedVersion("net"), 3);
  for (int64_t version : {2, 3}) {
    net.version = version;
    EXPECT_EQ(replica.ApplyReplicated(net).code(), absl::StatusCode::kAborted);
  }
  // Created again after its deletion: versions continue past it.
  net.version = 4;
  ASSERT_TRUE(replica.ApplyReplicated(net).ok());
  EXPECT_EQ(replica.DeletedVersion("net"), 0);
  // A deletion of a model not held is remembered and passed on, once.
  ASSERT_TRUE(replica.RemoveReplicated("other", 5).ok());
  ASSERT_TRUE(replica.RemoveReplicated("other", 5).ok());
  EXPECT_EQ(replica.DeletedVersion("other"), 5);
  replica.RemoveListener(id);
  EXPECT_THAT(events,
              ::testing::ElementsAre("2@net@3", "0@net@4", "2@other@5"));
  // Listings carry what is deleted, after what is held.
  replica.MarkReplicaSynced();
  std::vector<std::string> listed;
  replica.RemoveListener(
      replica
          .WatchAll([&listed](const ModelEvent& event) {
            listed.push_back(absl::StrCat(static_cast<int>(event.type), "@",
                                          event.model, "@", event.version));
          })
          .value());
  EXPECT_THAT(listed, ::testing::ElementsAre("3@net@4", "2@other@5", "5@@0"));
  // An adoption forgets them, and lists nothing to followers until done.
  ASSERT_TRUE(replica.BeginAdoption(kEpochB).ok());
  EXPECT_EQ(replica.DeletedVersion("other"), 0);
  EXPECT_EQ(replica.WatchAll([](const ModelEvent&) {}).status().code(),
            absl::StatusCode::kUnavailable);
  EXPECT_TRUE(replica.lineage().adopting);
  ASSERT_TRUE(replica.EndAdoption().ok());
  EXPECT_EQ(replica.lineage().epoch, kEpochB);
  EXPECT_FALSE(replica.lineage().adopting);
}

TEST(DecideModelTest, EveryCase) {
  using M = ModelAction;
  struct Case {
    ModelPosition held, upstream;
    bool adopting;
    ModelAction action;
  };
  const Case cases[] = {
      // Within one epoch.
      {{4, 0}, {4, 0}, false, M::kNothing},
      {{4, 0}, {5, 0}, false, M::kSync},
      {{4, 0}, {1, 0}, false, M::kKeepUpstreamBehind},
      {{0, 0}, {1, 0}, false, M::kSync},
      {{0, 3}, {3, 0}, false, M::kKeepUpstreamBehind},
      {{0, 3}, {4, 0}, false, M::kSync},
      {{4, 0}, {0, 4}, false, M::kRemove},
      {{4, 0}, {0, 6}, false, M::kRemove},
      {{4, 0}, {0, 3}, false, M::kKeepUpstreamBehind},
      {{0, 0}, {0, 3}, false, M::kRememberDeletion},
      {{0, 2}, {0, 3}, false, M::kRememberDeletion},
      {{0, 3}, {0, 3}, false, M::kNothing},
      {{4, 0}, {0, 0}, false, M::kKeepUnconfirmed},
      {{0, 3}, {0, 0}, false, M::kNothing},
      // Adopting another epoch: the upstream's state, whatever it is.
      {{4, 0}, {1, 0}, true, M::kReplace},
      {{4, 0}, {9, 0}, true, M::kReplace},
      {{4, 0}, {0, 0}, true, M::kDrop},
      {{4, 0}, {0, 2}, true, M::kDrop},
      {{0, 0}, {0, 2}, true, M::kRememberDeletion},
      {{0, 0}, {0, 0}, true, M::kNothing},
  };
  for (const Case& c : cases) {
    EXPECT_EQ(DecideModel(c.held, c.upstream, c.adopting), c.action)
        << "held " << c.held.version << "/" << c.held.deleted_at
        << ", upstream " << c.upstream.version << "/" << c.upstream.deleted_at
        << (c.adopting ? ", adopting" : "");
  }
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
  EXPECT_EQ(primary.RemoveReplicated("net", 1).code(),
            absl::StatusCode::kFailedPrecondition);
}

// Runs a follower on a thread of its own until destroyed.
class RunningFollower {
 public:
  RunningFollower(ModelStore* store, Upstream* upstream,
                  EpochAdoption adoption = {})
      : follower_(store, upstream, Options(adoption)),
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
  // How many lines of the log hold `needle`.
  int Logged(const std::string& needle) {
    int count = 0;
    for (const std::string& line : log())
      count += line.find(needle) != std::string::npos;
    return count;
  }

 private:
  FollowerOptions Options(EpochAdoption adoption) {
    FollowerOptions options;
    options.adoption = adoption;
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

// Records a store's events from some point on.
class EventRecorder {
 public:
  explicit EventRecorder(ModelStore* store) : store_(store) {
    id_ = store_->AddListener([this](const ModelEvent& event) {
      absl::MutexLock lock(&mu_);
      events_.push_back(absl::StrCat(static_cast<int>(event.type), "@",
                                     event.model, "@", event.version));
    });
  }
  ~EventRecorder() { store_->RemoveListener(id_); }
  std::vector<std::string> events() {
    absl::MutexLock lock(&mu_);
    return events_;
  }

 private:
  ModelStore* store_;
  int64_t id_;
  absl::Mutex mu_;
  std::vector<std::string> events_ ABSL_GUARDED_BY(mu_);
};

// The follower's address leads to a replica that lags (a Service in front of
// the primary and its replicas): it keeps its newer versions and the models
// the replica does not have yet, and moves on only with the replica.
TEST(FollowerTest, ALaggingUpstreamNeverMakesItGoBackwardsOrDelete) {
  ModelStore primary(PrimaryOptions());
  ModelStore lagging(ReplicaOptions());
  ModelStore replica(ReplicaOptions());
  SetEpoch(primary, kEpochA);
  SetEpoch(lagging, kEpochA);
  FakeUpstream to_primary(&primary);
  ASSERT_TRUE(primary.CreateFromSpec("net", kNet, 1).ok());
  ASSERT_TRUE(SyncModel(lagging, to_primary, "net").ok());
  lagging.MarkReplicaSynced();
  for (int i = 2; i <= 4; ++i) {
    ASSERT_TRUE(
        primary.Load(LoadRequest("net"), Filled(primary, "net", i)).ok());
  }
  ASSERT_TRUE(primary.CreateFromSpec("fresh", kNet, 2).ok());
  FakeUpstream upstream(&primary);
  RunningFollower follower(&replica, &upstream);
  ASSERT_TRUE(WaitFor([&] {
    return follower->synced() && VersionOf(replica, "net") == 4 &&
           VersionOf(replica, "fresh") == 1;
  }));
  EXPECT_EQ(replica.epoch(), kEpochA);

  EventRecorder events(&replica);
  upstream.Serve(&lagging);
  ASSERT_TRUE(WaitFor([&] {
    return follower->stats().connected &&
           follower->stats().upstream_failures >= 1 &&
           follower->stats().stale_answers >= 2;
  }));
  ExpectMirrored(primary, replica, "net");
  ExpectMirrored(primary, replica, "fresh");
  EXPECT_THAT(events.events(), ::testing::IsEmpty());
  EXPECT_EQ(follower->stats().deletes, 0);
  EXPECT_EQ(follower.Logged("follow: keeping net version 4: fake-primary:1 "
                            "shows it version 1 (it lags)"),
            1);
  EXPECT_EQ(follower.Logged("follow: keeping fresh version 1: it is not on "
                            "fake-primary:1, which remembers no deletion"),
            1);

  // The replica catches up and goes past: so does the follower, from it.
  ASSERT_TRUE(primary.Load(LoadRequest("net"), Filled(primary, "net", 5)).ok());
  ASSERT_TRUE(SyncModel(lagging, to_primary, "net").ok());
  ASSERT_TRUE(WaitFor([&] { return VersionOf(replica, "net") == 5; }));
  ExpectMirrored(primary, replica, "net");
  // A deletion the replica mirrors, of the version held, is one.
  ASSERT_TRUE(primary.Delete("net").ok());
  ASSERT_TRUE(lagging.RemoveReplicated("net", 5).ok());
  ASSERT_TRUE(WaitFor([&] { return VersionOf(replica, "net") == 0; }));
  EXPECT_THAT(events.events(), ::testing::ElementsAre("1@net@5", "2@net@5"));
  EXPECT_EQ(follower->stats().deletes, 1);
}

// Round robin over the primary and a lagging replica: the watch is the
// primary's, a describe the replica's. The follower does not take the older
// answer, and retries until an answer has what the watch showed.
TEST(FollowerTest, AnAnswerOlderThanTheWatchIsRetriedNotApplied) {
  ModelStore primary(PrimaryOptions());
  ModelStore lagging(ReplicaOptions());
  ModelStore replica(ReplicaOptions());
  SetEpoch(primary, kEpochA);
  SetEpoch(lagging, kEpochA);
  FakeUpstream to_primary(&primary);
  ASSERT_TRUE(primary.CreateFromSpec("net", kNet, 1).ok());
  ASSERT_TRUE(SyncModel(lagging, to_primary, "net").ok());
  FakeUpstream upstream(&primary);
  RunningFollower follower(&replica, &upstream);
  ASSERT_TRUE(WaitFor([&] { return follower->synced(); }));
  upstream.AnswerFrom(&lagging);
  ASSERT_TRUE(primary.Load(LoadRequest("net"), Filled(primary, "net", 2)).ok());
  ASSERT_TRUE(WaitFor([&] {
    return follower.Logged("after its watch showed version 2") >= 2;
  }));
  EXPECT_EQ(VersionOf(replica, "net"), 1);
  EXPECT_EQ(follower->stats().lag_versions, 1);
  upstream.AnswerFrom(&primary);
  ASSERT_TRUE(WaitFor([&] { return VersionOf(replica, "net") == 2; }));
  ExpectMirrored(primary, replica, "net");
}

// The primary lost its data and started another history: the follower keeps
// serving what it holds and says so, at most once a minute, until told to
// adopt the new epoch; then it mirrors it whatever the versions.
TEST(FollowerTest, AnotherEpochChangesNothingUntilAdopted) {
  ModelStore primary(PrimaryOptions());
  ModelStore replica(ReplicaOptions(2));
  SetEpoch(primary, kEpochA);
  ASSERT_TRUE(primary.CreateFromSpec("net", kNet, 1).ok());
  ASSERT_TRUE(primary.Load(LoadRequest("net"), Filled(primary, "net", 2)).ok());
  ASSERT_TRUE(primary.CreateFromSpec("extra", kNet, 1).ok());
  ModelStore restarted(PrimaryOptions());
  SetEpoch(restarted, kEpochB);
  ASSERT_TRUE(restarted.CreateFromSpec("net", kNet, 7).ok());
  ASSERT_TRUE(restarted.CreateFromSpec("other", kNet, 7).ok());
  FakeUpstream upstream(&primary);
  {
    RunningFollower follower(&replica, &upstream);
    ASSERT_TRUE(WaitFor([&] {
      return follower->synced() && VersionOf(replica, "extra") == 1;
    }));
    EventRecorder events(&replica);
    upstream.Serve(&restarted);
    ASSERT_TRUE(WaitFor([&] {
      return follower->stats().epoch_refused &&
             follower->stats().upstream_failures >= 4;
    }));
    ExpectMirrored(primary, replica, "net");
    ExpectMirrored(primary, replica, "extra");
    EXPECT_EQ(VersionOf(replica, "other"), 0);
    EXPECT_THAT(events.events(), ::testing::IsEmpty());
    EXPECT_EQ(replica.epoch(), kEpochA);
    EXPECT_EQ(follower->stats().upstream_epoch, kEpochB);
    EXPECT_EQ(follower.Logged("follow: WARNING: upstream fake-primary:1 is of "
                              "epoch b2b2b2b2b2b2b2b2, another history than "
                              "this follower's a1a1a1a1a1a1a1a1"),
              1);
    EXPECT_EQ(follower.Logged("restart with --adopt_epoch=b2b2b2b2b2b2b2b2"),
              1);
    // Only the loud line, not one per retry.
    EXPECT_EQ(follower.Logged("FAILED_PRECONDITION"), 0);
  }
  // Another epoch than the one allowed changes nothing either.
  {
    FakeUpstream again(&restarted);
    RunningFollower follower(&replica, &again,
                             ParseEpochAdoption("c3").value());
    ASSERT_TRUE(WaitFor([&] { return follower->stats().epoch_refused; }));
    EXPECT_EQ(replica.epoch(), kEpochA);
  }
  FakeUpstream again(&restarted);
  RunningFollower follower(&replica, &again,
                           ParseEpochAdoption(EpochName(kEpochB)).value());
  ASSERT_TRUE(WaitFor([&] {
    return follower->stats().connected && !replica.lineage().adopting &&
           follower.Logged("follow: mirrored all") >= 1;
  }));
  EXPECT_EQ(replica.epoch(), kEpochB);
  ExpectMirrored(restarted, replica, "net");
  ExpectMirrored(restarted, replica, "other");
  EXPECT_EQ(VersionOf(replica, "extra"), 0);
  EXPECT_EQ(replica.RetainedVersions("net").value(), (std::vector<int64_t>{1}));
  EXPECT_EQ(follower.Logged("follow: adopted epoch b2b2b2b2b2b2b2b2"), 1);
  EXPECT_FALSE(follower->stats().epoch_refused);
  // From here on, its ordinary history.
  ASSERT_TRUE(
      restarted.Load(LoadRequest("net"), Filled(restarted, "net", 3)).ok());
  ASSERT_TRUE(WaitFor([&] { return VersionOf(replica, "net") == 2; }));
  ExpectMirrored(restarted, replica, "net");
}

// An upstream whose epoch changes during a watch (a follower upstream that
// adopted another history): the follower applies nothing of the new epoch's
// events, lists again and decides on the whole listing.
TEST(FollowerTest, AnEpochChangeDuringTheWatchIsListedAgainNotApplied) {
  ModelStore primary(PrimaryOptions());
  ModelStore replica(ReplicaOptions());
  SetEpoch(primary, kEpochA);
  ASSERT_TRUE(primary.CreateFromSpec("net", kNet, 1).ok());
  FakeUpstream upstream(&primary);
  RunningFollower follower(&replica, &upstream);
  ASSERT_TRUE(WaitFor([&] { return follower->stats().connected; }));
  SetEpoch(primary, kEpochB);
  ASSERT_TRUE(primary.Load(LoadRequest("net"), Filled(primary, "net", 2)).ok());
  ASSERT_TRUE(WaitFor([&] { return follower->stats().epoch_refused; }));
  EXPECT_EQ(VersionOf(replica, "net"), 1);
  EXPECT_EQ(replica.epoch(), kEpochA);
  EXPECT_EQ(follower.Logged("changed its epoch from a1a1a1a1a1a1a1a1 to "
                            "b2b2b2b2b2b2b2b2 during the watch"),
            1);
}

// Syncs run on a thread of their own: while one is held, the watch still
// reads every commit, so the lag counts what the upstream has, and the bytes
// the sync still has to fetch show.
TEST(FollowerTest, TheWatchIsReadWhileASyncRuns) {
  ModelStore primary(PrimaryOptions());
  ModelStore replica(ReplicaOptions());
  ASSERT_TRUE(primary.CreateFromSpec("net", kNet, 1).ok());
  FakeUpstream upstream(&primary);
  RunningFollower follower(&replica, &upstream);
  ASSERT_TRUE(WaitFor([&] { return VersionOf(replica, "net") == 1; }));
  upstream.HoldFetches();
  ASSERT_TRUE(primary.Load(LoadRequest("net"), Filled(primary, "net", 2)).ok());
  ASSERT_TRUE(WaitFor([&] { return upstream.fetches_held() == 1; }));
  for (int i = 3; i <= 6; ++i) {
    ASSERT_TRUE(
        primary.Load(LoadRequest("net"), Filled(primary, "net", i)).ok());
  }
  ASSERT_TRUE(WaitFor([&] { return follower->stats().lag_versions == 5; }));
  const uint64_t all =
      primary.Describe(FetchRequest("net")).value().summary.num_bytes;
  FollowerStats stats = follower->stats();
  EXPECT_GT(stats.sync_bytes_in_flight, 0u);
  EXPECT_LT(stats.sync_bytes_in_flight, all);
  absl::SleepFor(absl::Milliseconds(50));
  EXPECT_GE(follower->stats().behind, absl::Milliseconds(50));
  const std::vector<ModelLag> lags = follower->model_lags();
  ASSERT_EQ(lags.size(), 1u);
  EXPECT_EQ(lags[0].model, "net");
  EXPECT_EQ(lags[0].upstream_version, 6);
  EXPECT_EQ(lags[0].held_version, 1);
  EXPECT_GE(lags[0].behind, absl::Milliseconds(50));
  EXPECT_TRUE(stats.connected);
  EXPECT_EQ(stats.since_heard, absl::ZeroDuration());

  upstream.ReleaseFetches();
  ASSERT_TRUE(WaitFor([&] { return VersionOf(replica, "net") == 6; }));
  ASSERT_TRUE(WaitFor([&] { return follower->stats().lag_versions == 0; }));
  stats = follower->stats();
  EXPECT_EQ(stats.sync_bytes_in_flight, 0u);
  EXPECT_EQ(stats.behind, absl::ZeroDuration());
  EXPECT_EQ(follower->model_lags()[0].behind, absl::ZeroDuration());
}

// Versions the follower heard of but could not fetch before the upstream
// went away still count as lag; how long ago it heard from it shows.
TEST(FollowerTest, LagStaysMeaningfulWhileTheUpstreamIsAway) {
  ModelStore primary(PrimaryOptions());
  ModelStore replica(ReplicaOptions());
  ASSERT_TRUE(primary.CreateFromSpec("net", kNet, 1).ok());
  FakeUpstream upstream(&primary);
  RunningFollower follower(&replica, &upstream);
  ASSERT_TRUE(WaitFor([&] { return follower->stats().connected; }));
  upstream.HoldFetches(/*fail=*/true);
  ASSERT_TRUE(primary.Load(LoadRequest("net"), Filled(primary, "net", 2)).ok());
  ASSERT_TRUE(primary.Load(LoadRequest("net"), Filled(primary, "net", 3)).ok());
  ASSERT_TRUE(WaitFor([&] { return follower->stats().lag_versions == 2; }));
  upstream.Disconnect();
  ASSERT_TRUE(WaitFor([&] { return !follower->stats().connected; }));
  absl::SleepFor(absl::Milliseconds(100));
  const FollowerStats away = follower->stats();
  EXPECT_EQ(away.lag_versions, 2);
  EXPECT_GE(away.since_heard, absl::Milliseconds(100));
  EXPECT_GE(away.behind, absl::Milliseconds(100));
  EXPECT_EQ(VersionOf(replica, "net"), 1);

  upstream.ReleaseFetches();
  upstream.Reconnect();
  ASSERT_TRUE(WaitFor([&] { return VersionOf(replica, "net") == 3; }));
  ASSERT_TRUE(WaitFor([&] { return follower->stats().connected; }));
  EXPECT_EQ(follower->stats().lag_versions, 0);
  EXPECT_EQ(follower->stats().since_heard, absl::ZeroDuration());
}

}  // namespace
}  // namespace modelstate

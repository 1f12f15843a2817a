#include "store/model_store.h"

#include <malloc.h>

#include <atomic>
#include <cmath>
#include <cstdio>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "common/limits.h"
#include "common/sanitizers.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "model/test_util.h"

namespace modelstate {
namespace {

using ::testing::ElementsAre;

constexpr char kTwoLayers[] = R"({"type": "Sequential", "modules": [
    {"type": "Linear", "args": [64, 64]}, {"type": "Linear", "args": [64, 64]}]})";

// A store whose memory limit is `bytes`.
ModelStore::Options LimitedTo(int64_t bytes) {
  ModelStore::Options options;
  options.memory_limit_bytes = bytes;
  return options;
}

StateDict Filled(const ModulePtr& model, float value) {
  StateDict state;
  const StateDict current = GetStateDict(model).value();
  for (const auto& entry : current.entries()) {
    state.Set(entry.key,
              FullTensor(entry.tensor.dtype(), entry.tensor.shape(), value));
  }
  return state;
}

// Returns the one value every element of every tensor holds, or NaN if they
// differ (torn).
float UniformValue(const ModulePtr& model) {
  float seen = 0;
  bool first = true;
  const StateDict state = GetStateDict(model).value();
  for (const auto& entry : state.entries()) {
    const float* data = entry.tensor.data_as<float>();
    for (int64_t i = 0; i < entry.tensor.num_elements(); ++i) {
      if (first) seen = data[i], first = false;
      if (data[i] != seen) return std::nanf("");
    }
  }
  return seen;
}

TEST(ModelStoreTest, CreateListDeleteAndVersions) {
  ModelStore store;
  ASSERT_TRUE(store.Create("m", MustBuild(kTwoLayers), kTwoLayers).ok());
  EXPECT_EQ(store.Create("m", MustBuild(kTwoLayers)).code(),
            absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(store.Create("bad/name", MustBuild(kTwoLayers)).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(store.GetSnapshot("m").value().version, 1);
  EXPECT_EQ(store.GetSnapshot("m").value().architecture, kTwoLayers);
  ModulePtr model = store.GetSnapshot("m").value().root;
  ASSERT_TRUE(store.Load("m", Filled(model, 2)).ok());
  EXPECT_EQ(store.GetSnapshot("m").value().version, 2);
  ASSERT_EQ(store.List().size(), 1u);
  Snapshot deleted;
  ASSERT_TRUE(store.Delete("m", &deleted).ok());
  EXPECT_EQ(deleted.version, 2);
  EXPECT_EQ(UniformValue(deleted.root), 2.0f);
  EXPECT_EQ(store.Delete("m").code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(store.GetSnapshot("m").status().code(),
            absl::StatusCode::kNotFound);
  // Versions of a name never go backwards, even across delete and create.
  ASSERT_TRUE(store.Create("m", MustBuild(kTwoLayers)).ok());
  EXPECT_EQ(store.GetSnapshot("m").value().version, 3);
}

TEST(ModelStoreTest, SnapshotsArePointInTimeAndShareStorage) {
  ModelStore store;
  ASSERT_TRUE(store.Create("m", MustBuild(kTwoLayers)).ok());
  Snapshot before = store.GetSnapshot("m").value();
  const Tensor weight = *GetStateDict(before.root).value().Find("0.weight");
  ASSERT_TRUE(store.Load("m", Filled(before.root, 5)).ok());
  // The old snapshot still sees the old bytes, at the same address (no copy was
  // made).
  const Tensor still = *GetStateDict(before.root).value().Find("0.weight");
  EXPECT_EQ(still.data(), weight.data());
  EXPECT_EQ(UniformValue(store.GetSnapshot("m").value().root), 5.0f);
}

TEST(ModelStoreTest, CompareAndSetAndBadLoadsLeaveTheModelUnchanged) {
  ModelStore store;
  ASSERT_TRUE(store.Create("m", MustBuild(kTwoLayers)).ok());
  Snapshot base = store.GetSnapshot("m").value();
  LoadRequest cas("m");
  cas.expected_version = 7;
  EXPECT_EQ(store.Load(cas, Filled(base.root, 1)).status().code(),
            absl::StatusCode::kAborted);
  StateDict broken = Filled(base.root, 1);
  broken.Set("0.weight", FullTensor(DType::kFloat32, {3}, 1));
  EXPECT_EQ(store.Load("m", broken).status().code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(store.Load("nope", broken).status().code(),
            absl::StatusCode::kNotFound);
  LoadRequest sub("m");
  sub.module = "7";
  EXPECT_EQ(store.Load(sub, broken).status().code(),
            absl::StatusCode::kNotFound);
  Snapshot after = store.GetSnapshot("m").value();
  EXPECT_EQ(after.version, 1);
  EXPECT_EQ(after.root, base.root);
  cas.expected_version = 1;
  EXPECT_EQ(store.Load(cas, Filled(base.root, 1)).value().version, 2);
  EXPECT_EQ(store.reserved_bytes(), 0);
}

TEST(ModelStoreTest, MemoryLimitCountsSnapshotsAndPendingLoads) {
  ModulePtr model = MustBuild(kTwoLayers);
  const int64_t model_bytes = static_cast<int64_t>(model->TotalTensorBytes());
  // The limit counts metadata too: a full load copies every module.
  const int64_t model_cost = model->Cost().total_bytes();
  ModelStore store(LimitedTo(model_cost * 2 + model_cost / 2));
  ASSERT_TRUE(store.Create("m", model).ok());
  EXPECT_EQ(store.live_bytes(), model_bytes);
  EXPECT_EQ(store.metadata_bytes(), model_cost - model_bytes);
  // One full load fits (old + new), and the old tensors die with the last
  // reference.
  Snapshot held = store.GetSnapshot("m").value();
  model = nullptr;
  ASSERT_TRUE(store.Load("m", Filled(held.root, 1)).ok());
  EXPECT_EQ(store.live_bytes(),
            2 * model_bytes);  // the held snapshot keeps v1 alive
  // A second load would need a third copy while the snapshot is held: refused
  // up front.
  absl::Status refused = store.Load("m", Filled(held.root, 2)).status();
  EXPECT_EQ(refused.code(), absl::StatusCode::kResourceExhausted) << refused;
  EXPECT_EQ(store.GetSnapshot("m").value().version, 2);
  held = Snapshot();
  EXPECT_EQ(store.live_bytes(), model_bytes);
  ASSERT_TRUE(
      store.Load("m", Filled(store.GetSnapshot("m").value().root, 2)).ok());

  // A pending load holds its reservation until it commits or is dropped.
  std::vector<TensorSpec> specs;
  const StateDict current =
      GetStateDict(store.GetSnapshot("m").value().root).value();
  for (const auto& entry : current.entries()) {
    specs.push_back({entry.key, entry.tensor.dtype(), entry.tensor.shape()});
  }
  auto pending = store.BeginLoad("m", specs).value();
  EXPECT_EQ(store.reserved_bytes(), model_cost);
  EXPECT_EQ(store.BeginLoad("m", specs).status().code(),
            absl::StatusCode::kResourceExhausted);
  pending.reset();
  EXPECT_EQ(store.reserved_bytes(), 0);
}

TEST(ModelStoreTest, CreateIfMissingBuildsTheModelFromTheLoad) {
  ModelStore store;
  LoadRequest options("fresh");
  options.create_if_missing = true;
  options.buffer_keys = {"bn.running_mean"};
  StateDict state;
  state.Set("fc.weight", FullTensor(DType::kFloat32, {2, 2}, 1));
  state.Set("bn.running_mean", FullTensor(DType::kFloat32, {2}, 0));
  LoadOutcome result = store.Load(options, state).value();
  EXPECT_TRUE(result.created);
  EXPECT_EQ(result.version, 1);
  Snapshot snapshot = store.GetSnapshot("fresh").value();
  EXPECT_THAT(KeysOf(snapshot.root),
              ElementsAre("fc.weight", "bn.running_mean"));
  EXPECT_EQ(snapshot.root->GetSubmodule(snapshot.root, "bn")
                .value()
                ->buffers()
                .size(),
            1u);
  // The next such load is an ordinary strict load.
  EXPECT_EQ(store.Load(options, state).value().version, 2);
}

TEST(ModelStoreTest, ListenersSeeEventsInCommitOrder) {
  ModelStore store;
  std::vector<std::string> events;
  const int64_t id = store.AddListener([&](const ModelEvent& event) {
    events.push_back(std::to_string(static_cast<int>(event.type)) + ":" +
                     event.model + "@" + std::to_string(event.version));
  });
  ASSERT_TRUE(store.Create("m", MustBuild(kTwoLayers)).ok());
  ASSERT_TRUE(
      store.Load("m", Filled(store.GetSnapshot("m").value().root, 1)).ok());
  ASSERT_TRUE(store.Delete("m").ok());
  store.RemoveListener(id);
  ASSERT_TRUE(store.Create("n", MustBuild(kTwoLayers)).ok());
  EXPECT_THAT(events, ElementsAre("0:m@1", "1:m@2", "2:m@2"));
}

TEST(ModelStoreTest, ConcurrentLoadsAndSnapshotsNeverTear) {
  constexpr int kWriters = 3;
  constexpr int kReaders = 3;
  constexpr int kLoadsPerWriter = 40;
  constexpr int64_t kFirstVersion = 2;  // after the create and a uniform load
  constexpr int64_t kLastVersion = kFirstVersion + kWriters * kLoadsPerWriter;
  const absl::Duration kBound = absl::Seconds(60);
  ModelStore store;
  ASSERT_TRUE(store.Create("m", MustBuild(kTwoLayers)).ok());
  ModulePtr shape = store.GetSnapshot("m").value().root;
  ASSERT_TRUE(store.Load("m", Filled(shape, 0)).ok());
  ASSERT_EQ(store.GetSnapshot("m").value().version, kFirstVersion);

  // The scheduler owes us no interleaving (on two busy cores a reader may not
  // run at all before the writers finish), so the overlap is arranged: every
  // reader has read before any writer starts, and each writer pauses halfway
  // until every reader has seen a version strictly between the first and the
  // last, i.e. read while loads were still being committed.
  std::vector<absl::Notification> has_read(kReaders);
  std::vector<absl::Notification> saw_midway(kReaders);
  std::atomic<bool> stop{false};
  std::atomic<int> torn{0};
  std::atomic<int> backwards{0};
  std::vector<std::thread> readers;
  for (int r = 0; r < kReaders; ++r) {
    readers.emplace_back([&, r] {
      int64_t last_seen = 0;
      while (!stop.load()) {
        Snapshot snapshot = store.GetSnapshot("m").value();
        if (std::isnan(UniformValue(snapshot.root))) ++torn;
        if (snapshot.version < last_seen) ++backwards;
        last_seen = snapshot.version;
        if (!has_read[r].HasBeenNotified()) has_read[r].Notify();
        if (snapshot.version > kFirstVersion &&
            snapshot.version < kLastVersion &&
            !saw_midway[r].HasBeenNotified()) {
          saw_midway[r].Notify();
        }
      }
    });
  }
  // Joins the readers however the test ends, so a failed wait cannot leave a
  // joinable thread behind.
  auto stop_readers = [&] {
    stop = true;
    for (std::thread& reader : readers) reader.join();
  };
  for (absl::Notification& read : has_read) {
    if (!read.WaitForNotificationWithTimeout(kBound)) {
      stop_readers();
      FAIL() << "a reader did not read within " << kBound;
    }
  }
  std::atomic<int> failed_loads{0};
  std::atomic<int> unseen_midway{0};
  std::vector<std::thread> writers;
  for (int w = 0; w < kWriters; ++w) {
    writers.emplace_back([&, w] {
      for (int i = 1; i <= kLoadsPerWriter; ++i) {
        if (!store.Load("m", Filled(shape, static_cast<float>(w * 1000 + i)))
                 .ok()) {
          ++failed_loads;
        }
        if (i != kLoadsPerWriter / 2) continue;
        // While this writer waits the version cannot reach the last one.
        for (absl::Notification& midway : saw_midway) {
          if (!midway.WaitForNotificationWithTimeout(kBound)) ++unseen_midway;
        }
      }
    });
  }
  for (std::thread& writer : writers) writer.join();
  stop_readers();
  EXPECT_EQ(failed_loads.load(), 0);
  EXPECT_EQ(unseen_midway.load(), 0) << "readers did not overlap the writers";
  EXPECT_EQ(torn.load(), 0);
  EXPECT_EQ(backwards.load(), 0);
  EXPECT_EQ(store.GetSnapshot("m").value().version, kLastVersion);
}

TEST(ModelStoreTest, ConcurrentPartialLoadsBothLand) {
  ModelStore store;
  ASSERT_TRUE(store.Create("m", MustBuild(kTwoLayers)).ok());
  ModulePtr base = store.GetSnapshot("m").value().root;
  LoadRequest first("m");
  first.module = "0";
  LoadRequest second("m");
  second.module = "1";
  auto specs_of = [](const StateDict& state) {
    std::vector<TensorSpec> specs;
    std::vector<Tensor> tensors;
    for (const auto& e : state.entries()) {
      specs.push_back({e.key, e.tensor.dtype(), e.tensor.shape()});
      tensors.push_back(e.tensor);
    }
    return std::make_pair(specs, tensors);
  };
  StateDict layer;
  layer.Set("weight", FullTensor(DType::kFloat32, {64, 64}, 1));
  layer.Set("bias", FullTensor(DType::kFloat32, {64}, 1));
  auto [specs, tensors] = specs_of(layer);
  // Both loads validate against version 1, then commit one after the other.
  auto a = store.BeginLoad(first, specs).value();
  auto b = store.BeginLoad(second, specs).value();
  ASSERT_TRUE(store.CommitLoad(std::move(a), tensors).ok());
  ASSERT_TRUE(store.CommitLoad(std::move(b), tensors).ok());
  EXPECT_EQ(UniformValue(store.GetSnapshot("m").value().root), 1.0f);
  EXPECT_EQ(store.GetSnapshot("m").value().version, 3);
  // With compare-and-set, the second of two racing loads is refused.
  LoadRequest cas = first;
  cas.expected_version = 3;
  auto c = store.BeginLoad(cas, specs).value();
  auto d = store.BeginLoad(cas, specs).value();
  ASSERT_TRUE(store.CommitLoad(std::move(c), tensors).ok());
  EXPECT_EQ(store.CommitLoad(std::move(d), tensors).status().code(),
            absl::StatusCode::kAborted);
  EXPECT_EQ(store.reserved_bytes(), 0);
}

TEST(ModelStoreTest, CastsForFetchAreMadeOnceAndDieWithTheirSource) {
  ModelStore store;
  ASSERT_TRUE(store.Create("m", MustBuild(kTwoLayers)).ok());
  const int64_t model_bytes = store.live_bytes();
  StateDict state = GetStateDict(store.GetSnapshot("m").value().root).value();
  StateDict first = store.CastFloatingForFetch(state, DType::kBFloat16).value();
  StateDict second =
      store.CastFloatingForFetch(state, DType::kBFloat16).value();
  for (size_t i = 0; i < first.size(); ++i) {
    EXPECT_EQ(first.entries()[i].tensor.dtype(), DType::kBFloat16);
    EXPECT_EQ(first.entries()[i].tensor.data(),
              second.entries()[i].tensor.data());
    EXPECT_TRUE(first.entries()[i].tensor.BitwiseEquals(
        state.entries()[i].tensor.CastTo(DType::kBFloat16).value()));
  }
  EXPECT_EQ(store.live_bytes(),
            model_bytes + model_bytes / 2);  // counted while kept
  EXPECT_EQ(store.CastFloatingForFetch(state, DType::kInt8).status().code(),
            absl::StatusCode::kInvalidArgument);
  // A load replaces the tensors; once nothing holds the old ones, their casts
  // go too.
  first = StateDict();
  second = StateDict();
  ASSERT_TRUE(
      store.Load("m", Filled(store.GetSnapshot("m").value().root, 2)).ok());
  state = StateDict();
  StateDict fresh = GetStateDict(store.GetSnapshot("m").value().root).value();
  ASSERT_TRUE(store.CastFloatingForFetch(fresh, DType::kBFloat16).ok());
  EXPECT_EQ(store.live_bytes(), model_bytes + model_bytes / 2);
}

// A request's tensors as a load describes them: zero-byte float32 tensors
// under `keys`.
std::vector<TensorSpec> EmptyTensors(const std::vector<std::string>& keys) {
  std::vector<TensorSpec> specs;
  specs.reserve(keys.size());
  for (const std::string& key : keys)
    specs.push_back(TensorSpec{key, DType::kFloat32, {0}});
  return specs;
}

LoadRequest Creating(const std::string& model) {
  LoadRequest request(model);
  request.create_if_missing = true;
  return request;
}

// `tensors` float32 tensors of 2 MiB (the pool's smallest block), each
// element `value`.
StateDict TwoMiBTensors(int tensors, float value) {
  StateDict state;
  for (int i = 0; i < tensors; ++i) {
    state.Set(absl::StrCat("w", i),
              FullTensor(DType::kFloat32, {512 << 10}, value));
  }
  return state;
}

TEST(ModelStoreTest, PooledMemoryStaysWithinTheLimitAndMakesRoom) {
  constexpr int64_t kMiB = 1 << 20;
  Storage::SetPoolLimit(0);  // empties what earlier tests left
  Storage::SetPoolLimit(size_t{1} << 30);
  // Room for two and a half 8 MiB versions, and their metadata.
  ModelStore::Options options;
  options.memory_limit_bytes = 20 * kMiB + 64 * 1024;
  ModelStore store(options);
  ASSERT_TRUE(store.Load(Creating("m"), TwoMiBTensors(4, 1)).ok());
  ASSERT_TRUE(store.Load("m", TwoMiBTensors(4, 2)).ok());
  // Version 1 was dropped into the pool: 8 MiB live, 8 MiB pooled.
  EXPECT_EQ(store.live_bytes(), 8 * kMiB);
  EXPECT_EQ(store.pooled_bytes(), 8 * kMiB);

  Snapshot held = store.GetSnapshot("m").value();
  // The next load's tensors come from the pool.
  ASSERT_TRUE(store.Load("m", TwoMiBTensors(4, 3)).ok());
  EXPECT_EQ(store.pooled_bytes(), 0);
  ASSERT_TRUE(store.Load(Creating("n"), TwoMiBTensors(2, 4)).ok());
  EXPECT_EQ(store.live_bytes(), 20 * kMiB);
  // With the store at its limit, memory it does not count (here a tensor of
  // the caller's) is not pooled when freed: the pool may not hold it beside
  // the 20 MiB the store counts.
  { const StateDict uncounted = TwoMiBTensors(1, 5); }
  EXPECT_EQ(store.pooled_bytes(), 0);
  // Memory the store counted moves to the pool: the sum stays the same.
  held = Snapshot();
  EXPECT_EQ(store.live_bytes(), 12 * kMiB);
  EXPECT_EQ(store.pooled_bytes(), 8 * kMiB);
  ASSERT_TRUE(store.Delete("n").ok());
  EXPECT_EQ(store.pooled_bytes(), 12 * kMiB);

  // Pooled memory never makes a request fail: it is given back for room.
  EXPECT_TRUE(store.CheckMemoryFor(12 * kMiB).ok());
  EXPECT_LE(store.live_bytes() + store.metadata_bytes() + 12 * kMiB +
                store.pooled_bytes(),
            options.memory_limit_bytes);
  EXPECT_LT(store.pooled_bytes(), 12 * kMiB);
  EXPECT_EQ(store.CheckMemoryFor(12 * kMiB + 64 * 1024).code(),
            absl::StatusCode::kResourceExhausted);
}

TEST(ModelStoreTest, MetadataIsChargedWhileTheModelLivesAndReturnedAfter) {
  ModelStore store;
  ModulePtr model = MustBuild(kTwoLayers);
  const TreeCost cost = model->Cost();
  EXPECT_EQ(cost.modules, 3);
  EXPECT_GT(cost.metadata_bytes, 3 * kModuleOverheadBytes +
                                     4 * kTensorSlotOverheadBytes +
                                     4 * kStorageOverheadBytes);
  ASSERT_TRUE(store.Create("m", model).ok());
  model = nullptr;
  EXPECT_EQ(store.metadata_bytes(), cost.metadata_bytes);
  // A load of one tensor copies the root and the module owning it, and adds
  // one storage; the other Linear is shared, not charged again. The load
  // reserves that much metadata up front.
  StateDict current = GetStateDict(store.GetSnapshot("m").value().root).value();
  StateDict one;
  one.Set("0.bias", FullTensor(DType::kFloat32, {64}, 1));
  LoadRequest partial("m");
  partial.strict = false;
  {
    const ModulePtr root = store.GetSnapshot("m").value().root;
    auto pending =
        store.BeginLoad(partial, {{"0.bias", DType::kFloat32, {64}}}).value();
    EXPECT_EQ(pending->reserved_bytes(),
              64 * 4 + root->OwnMetadataBytes() +
                  root->children()[0].module->OwnMetadataBytes() +
                  kStorageOverheadBytes);
  }
  ASSERT_TRUE(store.Load(partial, one).ok());
  // The root and the first Linear were replaced by copies of the same size;
  // the old bias storage lives on in `current`.
  EXPECT_EQ(store.metadata_bytes(),
            cost.metadata_bytes + kStorageOverheadBytes);
  // Once the model is gone only the storages the test still holds count: v1's
  // four (in `current`) and the loaded bias (in `one`).
  ASSERT_TRUE(store.Delete("m").ok());
  EXPECT_EQ(store.metadata_bytes(), 5 * kStorageOverheadBytes);
  one = StateDict();
  EXPECT_EQ(store.metadata_bytes(), 4 * kStorageOverheadBytes);
}

TEST(ModelStoreTest, ZeroByteTensorsAndTinyModulesCountAgainstTheLimit) {
  // 100,000 zero-byte tensors cost tens of MB of metadata: refused under
  // 8 MiB from the keys alone, whether they share one module or each has one.
  ModelStore store(LimitedTo(8 << 20));
  std::vector<std::string> flat, nested;
  for (int i = 0; i < 100000; ++i) {
    flat.push_back(absl::StrCat("t", i));
    nested.push_back(absl::StrCat("m", i, ".t"));
  }
  for (const auto* keys : {&flat, &nested}) {
    absl::Status refused =
        store.BeginLoad(Creating("many"), EmptyTensors(*keys)).status();
    EXPECT_EQ(refused.code(), absl::StatusCode::kResourceExhausted) << refused;
    EXPECT_THAT(std::string(refused.message()),
                ::testing::HasSubstr("memory limit"));
  }
  EXPECT_EQ(store.reserved_bytes(), 0);
  EXPECT_EQ(store.pending_loads(), 0);
  // A thousand fit, and what they are charged is what the estimate reserved,
  // give or take the names' rounding.
  flat.resize(1000);
  auto load = store.BeginLoad(Creating("some"), EmptyTensors(flat)).value();
  const int64_t reserved = load->reserved_bytes();
  std::vector<Tensor> tensors;
  for (int i = 0; i < 1000; ++i)
    tensors.push_back(Tensor::Zeros(DType::kFloat32, {0}).value());
  ASSERT_TRUE(store.CommitLoad(std::move(load), std::move(tensors)).ok());
  EXPECT_EQ(store.metadata_bytes(), reserved);
}

TEST(ModelStoreTest, ModuleCountIsBoundedBeforeAnyTreeIsBuilt) {
  ModelStore store;
  std::vector<std::string> keys;
  keys.reserve(kMaxModules);
  for (int64_t i = 0; i < kMaxModules; ++i)
    keys.push_back(absl::StrCat("m", i, ".w"));
  absl::Status refused =
      store.BeginLoad(Creating("wide"), EmptyTensors(keys)).status();
  EXPECT_EQ(refused.code(), absl::StatusCode::kInvalidArgument) << refused;
  EXPECT_THAT(std::string(refused.message()),
              ::testing::HasSubstr("kMaxModules"));
  EXPECT_EQ(store.pending_loads(), 0);
}

TEST(ModelStoreTest, CreateFromSpecIsRefusedBeforeAllocating) {
  ModelStore store(LimitedTo(64 << 20));
  // 40 GB of weights: allocating and initialising them would take minutes and
  // more memory than the machine has; the estimate refuses it at once.
  const absl::Time start = absl::Now();
  absl::Status refused =
      store
          .CreateFromSpec(
              "huge",
              R"({"type": "Linear", "in_features": 100000, "out_features": 100000})",
              0)
          .status();
  EXPECT_EQ(refused.code(), absl::StatusCode::kResourceExhausted) << refused;
  EXPECT_LT(absl::Now() - start, absl::Seconds(10));
  EXPECT_EQ(store.reserved_bytes(), 0);
  EXPECT_EQ(store.live_bytes(), 0);
  // What fits is created, and charged what the estimate said.
  const TreeCost estimate = EstimateSpecCost(kTwoLayers).value();
  ASSERT_TRUE(store.CreateFromSpec("m", kTwoLayers, 0).ok());
  EXPECT_EQ(store.live_bytes(), estimate.tensor_bytes);
  EXPECT_EQ(store.metadata_bytes(), estimate.metadata_bytes);
  EXPECT_EQ(store.reserved_bytes(), 0);
}

// Weights are drawn in float32 and cast, so building a bfloat16 model briefly
// holds one float32 copy of its largest tensor: the limit must fit that too.
TEST(ModelStoreTest, CreateFromSpecReservesTheBuildsScratch) {
  constexpr char kBf16[] =
      R"({"type": "Embedding", "args": [1024, 1024], "dtype": "bfloat16"})";
  const TreeCost cost = EstimateSpecCost(kBf16).value();
  ASSERT_EQ(cost.tensor_bytes, 2 << 20);
  ASSERT_EQ(cost.build_scratch_bytes, 4 << 20);
  // Room for the model, not for the model and its float32 draw.
  ModelStore tight(LimitedTo(cost.total_bytes() + (1 << 20)));
  absl::Status refused = tight.CreateFromSpec("e", kBf16, 0).status();
  EXPECT_EQ(refused.code(), absl::StatusCode::kResourceExhausted) << refused;
  EXPECT_EQ(tight.reserved_bytes(), 0);
  ModelStore roomy(LimitedTo(cost.total_bytes() + cost.build_scratch_bytes));
  ASSERT_TRUE(roomy.CreateFromSpec("e", kBf16, 0).ok());
  EXPECT_EQ(roomy.live_bytes(), cost.tensor_bytes);
  EXPECT_EQ(roomy.reserved_bytes(), 0);
}

// The per-object figures of model/module.h are estimates; they must not be
// below what the heap really gives a tree of many tiny objects, or a million
// of them would still slip past the limit.
TEST(ModelStoreTest, MetadataEstimateIsNotBelowTheHeapTheTreeTakes) {
#ifdef MODELSTATE_ASAN
  GTEST_SKIP() << "ASan's allocator does not report through mallinfo2";
#else
  for (const char* pattern : {"t%d", "m%d.t", "a.b%d.c.t"}) {
    SCOPED_TRACE(pattern);
    const size_t before = mallinfo2().uordblks;
    ModulePtr tree;
    {
      StateDict state;
      for (int i = 0; i < 20000; ++i) {
        char key[32];
        std::snprintf(key, sizeof(key), pattern, i);
        state.Set(key, Tensor::Zeros(DType::kFloat32, {0}).value());
      }
      tree = BuildModuleFromStateDict(state).value();
    }
    const int64_t heap = static_cast<int64_t>(mallinfo2().uordblks - before);
    const int64_t estimate = tree->Cost().metadata_bytes;
    EXPECT_GE(estimate, heap);
    // And not wildly above it either.
    EXPECT_LE(estimate, 3 * heap);
  }
#endif
}

}  // namespace
}  // namespace modelstate

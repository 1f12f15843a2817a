#include "store/state_dict_memo.h"

#include <malloc.h>

#include <cstdio>
#include <memory>
#include <thread>
#include <vector>

#include "common/sanitizers.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "model/module_tree.h"
#include "model/test_util.h"
#include "store/model_store.h"

namespace modelstate {
namespace {

using ::testing::ElementsAre;

constexpr char kTwoLayers[] = R"({"type": "Sequential", "modules": [
    {"type": "Linear", "args": [4, 4]}, {"type": "Linear", "args": [4, 4]}]})";

// The whole model's state dict as a fetch of `request` plans it.
std::shared_ptr<const StateDict> Fetched(ModelStore& store,
                                         const FetchRequest& request) {
  return store.Fetch(request).value().state;
}

// The same keys, in the same order, each naming the same bytes.
bool SameEntries(const StateDict& a, const StateDict& b) {
  if (a.Keys() != b.Keys()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    const Tensor& x = a.entries()[i].tensor;
    const Tensor& y = b.entries()[i].tensor;
    if (x.data() != y.data() || x.shape() != y.shape() ||
        x.dtype() != y.dtype() || a.entries()[i].kind != b.entries()[i].kind)
      return false;
  }
  return a.metadata() == b.metadata();
}

// A load of every tensor of "m" filled with `value`.
void LoadFilled(ModelStore& store, float value) {
  StateDict state;
  for (const auto& entry : Fetched(store, {"m"})->entries()) {
    state.Set(entry.key,
              FullTensor(entry.tensor.dtype(), entry.tensor.shape(), value));
  }
  ASSERT_TRUE(store.Load({"m"}, state).ok());
}

TEST(StateDictMemoTest, WholeModelFetchesOfAVersionShareOneStateDict) {
  ModelStore store;
  ASSERT_TRUE(store.Create("m", MustBuild(kTwoLayers)).ok());
  const std::shared_ptr<const StateDict> first = Fetched(store, {"m"});
  EXPECT_EQ(Fetched(store, {"m"}), first);
  EXPECT_TRUE(
      SameEntries(*first, GetStateDict(store.GetSnapshot("m")->root).value()));
  // A selection of keys, a submodule or parameters only is built for the
  // request, and is what it asked for.
  FetchRequest keys("m");
  keys.keys = {"1.bias"};
  EXPECT_THAT(Fetched(store, keys)->Keys(), ElementsAre("1.bias"));
  FetchRequest module("m");
  module.module = "0";
  EXPECT_THAT(Fetched(store, module)->Keys(),
              ElementsAre("0.weight", "0.bias"));
  FetchRequest cast("m");
  cast.dtype = DType::kBFloat16;
  const std::shared_ptr<const StateDict> bf16 = Fetched(store, cast);
  EXPECT_NE(bf16, first);
  EXPECT_EQ(bf16->Find("0.weight")->dtype(), DType::kBFloat16);
  EXPECT_EQ(first->Find("0.weight")->dtype(), DType::kFloat32);
}

TEST(StateDictMemoTest, DescribeBuildsItAndReplicatedVersionsGetTheirOwn) {
  ModelStore primary;
  ASSERT_TRUE(primary.Create("m", MustBuild(kTwoLayers)).ok());
  ASSERT_FALSE(primary.GetSnapshot("m")->memo->kept());
  ASSERT_TRUE(primary.Describe({"m"}).ok());
  EXPECT_TRUE(primary.GetSnapshot("m")->memo->kept());
  const std::shared_ptr<const StateDict> described = Fetched(primary, {"m"});
  EXPECT_EQ(Fetched(primary, {"m"}), described);
  // A follower's store is handed snapshots without a memo, or with the
  // upstream's: each version it applies gets one of its own.
  ModelStore::Options options;
  options.replica_of = "primary:1";
  ModelStore follower(options);
  Snapshot replicated = primary.GetSnapshot("m").value();
  ASSERT_TRUE(follower.ApplyReplicated(replicated).ok());
  const std::shared_ptr<StateDictMemo> first = follower.GetSnapshot("m")->memo;
  ASSERT_NE(first, nullptr);
  EXPECT_NE(first, replicated.memo);
  EXPECT_EQ(Fetched(follower, {"m"}), Fetched(follower, {"m"}));
  replicated.version = 2;
  ASSERT_TRUE(follower.ApplyReplicated(replicated).ok());
  EXPECT_NE(follower.GetSnapshot("m")->memo, first);
}

TEST(StateDictMemoTest, EachVersionHasItsOwnAndRetainedOnesKeepTheirs) {
  ModelStore::Options options;
  options.retain_versions = 2;
  ModelStore store(options);
  ASSERT_TRUE(store.Create("m", MustBuild(kTwoLayers)).ok());
  const std::shared_ptr<const StateDict> v1 = Fetched(store, {"m"});
  LoadFilled(store, 7);
  const std::shared_ptr<const StateDict> v2 = Fetched(store, {"m"});
  EXPECT_NE(v2, v1);
  EXPECT_EQ(v2->Find("1.bias")->data_as<float>()[0], 7);
  FetchRequest old("m");
  old.version = 1;
  EXPECT_EQ(Fetched(store, old), v1);
  // A rollback is a new version with v1's tree: its state dict has v1's
  // tensors, in a memo of its own.
  ASSERT_TRUE(store.Rollback("m", 1).ok());
  const std::shared_ptr<const StateDict> v3 = Fetched(store, {"m"});
  EXPECT_TRUE(SameEntries(*v3, *v1));
  EXPECT_EQ(Fetched(store, {"m"}), v3);
}

TEST(StateDictMemoTest, IsChargedAsMetadataWhileItsStateDictLives) {
  ModelStore store;
  ASSERT_TRUE(store.Create("m", MustBuild(kTwoLayers)).ok());
  const int64_t tree_only = store.metadata_bytes();
  std::shared_ptr<const StateDict> state = Fetched(store, {"m"});
  const int64_t heap_bytes = state->HeapBytes();
  EXPECT_GT(heap_bytes, 4 * static_cast<int64_t>(sizeof(StateDict::Entry)));
  // The state dict's heap and the object holding it with its charge.
  const int64_t charged = store.metadata_bytes() - tree_only;
  EXPECT_GT(charged, static_cast<int64_t>(sizeof(StateDict)) + heap_bytes);
  EXPECT_LT(charged, static_cast<int64_t>(sizeof(StateDict)) + heap_bytes +
                         static_cast<int64_t>(sizeof(MemoryCharge)) + 64);
  // v2 replaces v1 (one version retained); v1's state dict, held as a fetch
  // still sending it would, keeps its charge and v1's four storages.
  LoadFilled(store, 1);
  EXPECT_EQ(store.metadata_bytes(),
            tree_only + charged + 4 * kStorageOverheadBytes);
  state.reset();
  EXPECT_EQ(store.metadata_bytes(), tree_only);
  ASSERT_TRUE(store.Delete("m").ok());
  EXPECT_EQ(store.metadata_bytes(), 0);
}

TEST(StateDictMemoTest, OneThatDoesNotFitTheLimitIsServedButNotKept) {
  ModulePtr model = MustBuild(kTwoLayers);
  const TreeCost cost = model->Cost();
  ModelStore::Options options;
  // Room for the model and a few bytes, not for the memo.
  options.memory_limit_bytes = cost.total_bytes() + 64;
  ModelStore store(options);
  ASSERT_TRUE(store.Create("m", std::move(model)).ok());
  const int64_t before = store.metadata_bytes();
  const std::shared_ptr<const StateDict> first = Fetched(store, {"m"});
  const std::shared_ptr<const StateDict> second = Fetched(store, {"m"});
  EXPECT_NE(first, second);
  EXPECT_TRUE(SameEntries(*first, *second));
  EXPECT_EQ(store.metadata_bytes(), before);
  EXPECT_FALSE(store.GetSnapshot("m")->memo->kept());
  // Concurrent fetches of a state dict that does not fit each build their
  // own, without queueing behind one another's build.
  std::vector<std::shared_ptr<const StateDict>> seen(4);
  std::vector<std::thread> fetchers;
  for (auto& slot : seen)
    fetchers.emplace_back([&store, &slot] { slot = Fetched(store, {"m"}); });
  for (std::thread& fetcher : fetchers) fetcher.join();
  for (const auto& state : seen) EXPECT_TRUE(SameEntries(*state, *first));
}

TEST(StateDictMemoTest, ConcurrentFirstFetchesShareOneBuild) {
  ModelStore store;
  ASSERT_TRUE(store.Create("m", MustBuild(kTwoLayers)).ok());
  std::vector<std::shared_ptr<const StateDict>> seen(8);
  std::vector<std::thread> fetchers;
  for (auto& slot : seen)
    fetchers.emplace_back([&store, &slot] { slot = Fetched(store, {"m"}); });
  for (std::thread& fetcher : fetchers) fetcher.join();
  for (const auto& state : seen) EXPECT_EQ(state, seen[0]);
}

TEST(StateDictMemoTest, HeapBytesEstimateMatchesTheHeapItTakes) {
#ifdef MODELSTATE_ASAN
  GTEST_SKIP() << "ASan's allocator does not report through mallinfo2";
#else
  for (const char* pattern : {"t%d", "m%d.t", "encoder.layers.%d.fc.weight"}) {
    SCOPED_TRACE(pattern);
    ModulePtr tree;
    {
      StateDict state;
      for (int i = 0; i < 20000; ++i) {
        char key[48];
        std::snprintf(key, sizeof(key), pattern, i);
        state.Set(key, Tensor::Zeros(DType::kFloat32, {0}).value());
      }
      tree = BuildModuleFromStateDict(state).value();
    }
    const size_t before = mallinfo2().uordblks;
    auto state = std::make_unique<StateDict>(GetStateDict(tree).value());
    const int64_t heap = static_cast<int64_t>(mallinfo2().uordblks - before);
    const int64_t estimate =
        static_cast<int64_t>(sizeof(StateDict)) + state->HeapBytes();
    // Within 5%: mallinfo2 counts blocks freed into glibc's thread cache
    // during the build as in use.
    EXPECT_GE(estimate, heap - heap / 20);
    EXPECT_LE(estimate, heap + heap / 20);
  }
#endif
}

}  // namespace
}  // namespace modelstate

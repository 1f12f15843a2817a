// The store's use-case entry points (store/requests.h), as every transport
// calls them.
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "model/test_util.h"
#include "store/model_store.h"

namespace modelstate {
namespace {

using testing::ElementsAre;

constexpr char kNet[] = R"({"type": "Sequential", "modules": [
    {"type": "Linear", "args": [3, 4]},
    {"type": "BatchNorm1d", "args": [4]},
    {"type": "Linear", "args": [4, 2]}]})";

TEST(UseCasesTest, FetchSelectsLikeTorchAndCasts) {
  ModelStore store;
  ASSERT_TRUE(store.CreateFromSpec("net", kNet, 1).ok());
  FetchRequest request{"net"};
  request.module = "1";
  request.keep_module_prefix = false;
  request.include_buffers = false;
  request.dtype = DType::kFloat16;
  const FetchPlan plan = store.Fetch(request).value();
  EXPECT_EQ(plan.model, "net");
  EXPECT_EQ(plan.version, 1);
  EXPECT_THAT(plan.state->Keys(), ElementsAre("weight", "bias"));
  EXPECT_EQ(plan.state->Find("weight")->dtype(), DType::kFloat16);

  request = FetchRequest{"net"};
  request.recurse = false;
  EXPECT_TRUE(store.Fetch(request).value().state->empty());
  request = FetchRequest{"net"};
  request.keys = {"2.bias", "0.weight"};
  EXPECT_THAT(store.Fetch(request).value().state->Keys(),
              ElementsAre("2.bias", "0.weight"));
  request.version = 5;
  EXPECT_EQ(store.Fetch(request).status().code(), absl::StatusCode::kNotFound);
  request = FetchRequest{"net"};
  request.dtype = DType::kInt8;
  EXPECT_EQ(store.Fetch(request).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(UseCasesTest, FetchFromAnOffsetKeepsEveryTensorAndChecksTheEnd) {
  ModelStore store;
  ASSERT_TRUE(store.CreateFromSpec("net", kNet, 1).ok());
  FetchRequest request{"net"};
  const uint64_t total = store.Fetch(request).value().state->TotalBytes();
  request.version = 1;
  request.offset = total;
  const FetchPlan plan = store.Fetch(request).value();
  EXPECT_EQ(plan.offset, total);
  EXPECT_EQ(plan.state->TotalBytes(), total);
  request.offset = total + 1;
  const absl::Status past = store.Fetch(request).status();
  EXPECT_EQ(past.code(), absl::StatusCode::kOutOfRange);
  EXPECT_THAT(std::string(past.message()),
              testing::HasSubstr(absl::StrCat("(", total, " bytes)")));
}

TEST(UseCasesTest, DescribeCountsTheSubmoduleNotTheModel) {
  ModelStore::Options options;
  options.retain_versions = 2;
  ModelStore store(options);
  ASSERT_TRUE(store.CreateFromSpec("net", kNet, 1).ok());
  const StateDict state = *store.Fetch({"net"}).value().state;
  ASSERT_TRUE(store.Load({"net"}, state).ok());

  FetchRequest request{"net"};
  request.module = "1";
  const ModelManifest manifest = store.Describe(request).value();
  EXPECT_EQ(manifest.summary.name, "net");
  EXPECT_EQ(manifest.summary.version, 2);
  EXPECT_EQ(manifest.summary.root_class, "BatchNorm1d");
  EXPECT_EQ(manifest.summary.num_tensors, 5);
  EXPECT_EQ(manifest.summary.num_bytes, 4u * 4 * 4 + 8);
  EXPECT_EQ(manifest.version, 2);
  EXPECT_THAT(manifest.retained_versions, ElementsAre(2, 1));
  ASSERT_EQ(manifest.tensors.size(), 5u);
  EXPECT_EQ(manifest.tensors[0].name, "1.weight");
  EXPECT_EQ(manifest.tensors[2].kind, TensorKind::kBuffer);
  EXPECT_EQ(manifest.tensors[0].checksum, state.Find("1.weight")->Checksum());

  request.version = 1;
  EXPECT_EQ(store.Describe(request).value().version, 1);
  request.module = "7";
  EXPECT_EQ(store.Describe(request).status().code(),
            absl::StatusCode::kNotFound);
  const std::vector<ModelSummary> all = store.Summaries();
  ASSERT_EQ(all.size(), 1u);
  EXPECT_EQ(all[0].num_tensors, static_cast<int64_t>(state.size()));
  EXPECT_EQ(all[0].root_class, "Sequential");
}

TEST(UseCasesTest, WatchStartsWithTheStateAtRegistration) {
  ModelStore store;
  std::vector<std::string> events;
  auto record = [&events](const ModelEvent& event) {
    events.push_back(absl::StrCat(static_cast<int>(event.type), "@",
                                  event.model, "@", event.version));
  };
  const int64_t absent = store.Watch("net", record);
  ASSERT_TRUE(store.CreateFromSpec("other", kNet, 1).ok());  // Not watched.
  ASSERT_TRUE(store.CreateFromSpec("net", kNet, 1).ok());
  const int64_t current = store.Watch("net", record);
  store.RemoveListener(absent);
  ASSERT_TRUE(store.Delete("net").ok());
  store.RemoveListener(current);
  ASSERT_TRUE(store.CreateFromSpec("net", kNet, 1).ok());  // Nobody watches.
  const auto type = [](ModelEvent::Type t) { return static_cast<int>(t); };
  EXPECT_THAT(
      events,
      ElementsAre(absl::StrCat(type(ModelEvent::Type::kAbsent), "@net@0"),
                  absl::StrCat(type(ModelEvent::Type::kCreated), "@net@1"),
                  absl::StrCat(type(ModelEvent::Type::kCurrent), "@net@1"),
                  absl::StrCat(type(ModelEvent::Type::kDeleted), "@net@1")));
}

TEST(UseCasesTest, CreateFromSpecValidatesTheNameAndSpec) {
  ModelStore store;
  EXPECT_EQ(store.CreateFromSpec("bad/name", kNet, 0).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(store.CreateFromSpec("net", "{", 0).status().code(),
            absl::StatusCode::kInvalidArgument);
  const Snapshot created = store.CreateFromSpec("net", kNet, 3).value();
  EXPECT_EQ(created.version, 1);
  EXPECT_EQ(created.architecture, kNet);
  EXPECT_EQ(store.CreateFromSpec("net", kNet, 3).status().code(),
            absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(store.Rollback("net", 1).value().version, 2);
}

TEST(UseCasesTest, ALoadThatCreatesKeepsClassNames) {
  ModelStore store;
  StateDict state;
  state.Set("head.weight", FullTensor(DType::kFloat32, {2, 2}, 1));
  state.Set("bn.num_batches_tracked", FullTensor(DType::kInt64, {}, 0));
  LoadRequest create{"net"};
  create.create_if_missing = true;
  create.buffer_keys = {"bn.num_batches_tracked"};
  create.class_names = {{"", "Net"}, {"head", "Linear"}, {"bn", "BatchNorm1d"}};
  const LoadOutcome created = store.Load(create, state).value();
  EXPECT_TRUE(created.created);
  const Snapshot snapshot = store.GetSnapshot("net").value();
  EXPECT_EQ(snapshot.root->type_name(), "Net");

  StateDict wrong;
  wrong.Set("weight", FullTensor(DType::kFloat32, {3, 2}, 1));
  LoadRequest into_head{"net"};
  into_head.module = "head";
  EXPECT_THAT(
      std::string(store.Load(into_head, wrong).status().message()),
      testing::StartsWith("Error(s) in loading state_dict for Linear:"));
  // BatchNorm's rule applies because the class says BatchNorm1d: a state dict
  // without num_batches_tracked loads strictly.
  StateDict no_count;
  no_count.Set("head.weight", FullTensor(DType::kFloat32, {2, 2}, 2));
  EXPECT_TRUE(store.Load({"net"}, no_count).ok());
}

TEST(UseCasesTest, PendingLoadsAreCapped) {
  ModelStore::Options options;
  options.max_pending_loads = 2;
  ModelStore store(options);
  ASSERT_TRUE(store.CreateFromSpec("net", kNet, 1).ok());
  const StateDict state = *store.Fetch({"net"}).value().state;
  std::vector<TensorSpec> specs;
  for (const auto& entry : state.entries())
    specs.push_back({entry.key, entry.tensor.dtype(), entry.tensor.shape()});
  auto first = store.BeginLoad({"net"}, specs).value();
  auto second = store.BeginLoad({"net"}, specs).value();
  EXPECT_EQ(store.pending_loads(), 2);
  absl::Status third = store.BeginLoad({"net"}, specs).status();
  EXPECT_EQ(third.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(third.message()), testing::HasSubstr("2 loads"));
  ASSERT_TRUE(store.CommitLoad(std::move(first), state.Tensors()).ok());
  second.reset();  // Aborted.
  EXPECT_EQ(store.pending_loads(), 0);
  EXPECT_EQ(store.reserved_bytes(), 0);
  EXPECT_TRUE(store.Load({"net"}, state).ok());
}

TEST(UseCasesTest, FetchCastsEachNamedKeyToItsOwnDtype) {
  ModelStore store;
  ASSERT_TRUE(store.CreateFromSpec("net", kNet, 1).ok());
  FetchRequest request{"net"};
  request.key_dtypes = {{"0.weight", DType::kBFloat16},
                        {"2.bias", DType::kFloat16},
                        {"1.num_batches_tracked", DType::kInt64}};
  request.dtype = DType::kFloat64;
  const FetchPlan plan = store.Fetch(request).value();
  const StateDict& state = *plan.state;
  EXPECT_EQ(state.Find("0.weight")->dtype(), DType::kBFloat16);
  EXPECT_EQ(state.Find("2.bias")->dtype(), DType::kFloat16);
  // Keys not named take `dtype`; a same-dtype entry is sent as it is.
  EXPECT_EQ(state.Find("0.bias")->dtype(), DType::kFloat64);
  EXPECT_EQ(state.Find("1.num_batches_tracked")->dtype(), DType::kInt64);
  const Tensor stored = *store.Fetch({"net"}).value().state->Find("0.weight");
  EXPECT_TRUE(state.Find("0.weight")
                  ->BitwiseEquals(stored.CastTo(DType::kBFloat16).value()));

  FetchRequest unknown{"net"};
  unknown.key_dtypes = {{"0.nope", DType::kFloat16}};
  EXPECT_EQ(store.Fetch(unknown).status().code(),
            absl::StatusCode::kInvalidArgument);
  FetchRequest integer{"net"};
  integer.key_dtypes = {{"1.num_batches_tracked", DType::kFloat16}};
  EXPECT_EQ(store.Fetch(integer).status().code(),
            absl::StatusCode::kInvalidArgument);
  FetchRequest to_integer{"net"};
  to_integer.key_dtypes = {{"0.weight", DType::kInt8}};
  EXPECT_EQ(store.Fetch(to_integer).status().code(),
            absl::StatusCode::kInvalidArgument);
  // Only selected keys may be named.
  FetchRequest unselected{"net"};
  unselected.keys = {"0.bias"};
  unselected.key_dtypes = {{"0.weight", DType::kFloat16}};
  EXPECT_EQ(store.Fetch(unselected).status().code(),
            absl::StatusCode::kInvalidArgument);
}

// A model created from a state dict whose two keys hold one tensor (an
// embedding tied to the output layer).
StateDict TiedState() {
  StateDict state;
  const Tensor embedding = FullTensor(DType::kFloat32, {64, 16}, 1);
  state.Set("embed.weight", embedding);
  state.Set("body.weight", FullTensor(DType::kFloat32, {16, 16}, 2));
  state.Set("head.weight", embedding);
  return state;
}

TEST(UseCasesTest, TiedTensorsAreStoredOnceAndSentOnceWhenAccepted) {
  ModelStore store;
  LoadRequest create{"lm"};
  create.create_if_missing = true;
  ASSERT_TRUE(store.Load(create, TiedState()).ok());
  const int64_t tied_bytes = store.live_bytes();
  ModelStore untied_store;
  StateDict untied = TiedState();
  untied.Set("head.weight", FullTensor(DType::kFloat32, {64, 16}, 1));
  ASSERT_TRUE(untied_store.Load(create, untied).ok());
  EXPECT_EQ(untied_store.live_bytes() - tied_bytes, 64 * 16 * 4);

  FetchRequest request{"lm"};
  FetchPlan plan = store.Fetch(request).value();
  EXPECT_TRUE(plan.shared_with.empty());
  EXPECT_EQ(plan.SentBytes(), (2 * 64 * 16 + 16 * 16) * 4);
  request.accept_shared_tensors = true;
  plan = store.Fetch(request).value();
  EXPECT_THAT(plan.shared_with, ElementsAre(-1, -1, 0));
  EXPECT_EQ(plan.SentBytes(), (64 * 16 + 16 * 16) * 4);
  EXPECT_EQ(plan.SentTensors().size(), 2u);
  // A cast keeps them one tensor.
  request.dtype = DType::kBFloat16;
  EXPECT_THAT(store.Fetch(request).value().shared_with, ElementsAre(-1, -1, 0));

  // A load of one key reaches its tied twin, as torch's in-place copy does.
  StateDict one;
  one.Set("head.weight", FullTensor(DType::kFloat32, {64, 16}, 9));
  LoadRequest non_strict{"lm"};
  non_strict.strict = false;
  ASSERT_TRUE(store.Load(non_strict, one).ok());
  const StateDict after = *store.Fetch({"lm"}).value().state;
  EXPECT_TRUE(
      after.Find("embed.weight")->SharesBytesWith(*after.Find("head.weight")));
  EXPECT_TRUE(after.Find("embed.weight")
                  ->BitwiseEquals(FullTensor(DType::kFloat32, {64, 16}, 9)));
}

}  // namespace
}  // namespace modelstate

// The state_dict / load_state_dict edge cases of the reference spec (§7), with
// torch's exact text.
#include "model/state_dict.h"

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "model/test_util.h"

namespace modelstate {
namespace {

// load_state_dict(strict=False).
LoadOptions NonStrict() {
  LoadOptions options;
  options.strict = false;
  return options;
}

using ::testing::ElementsAre;
using ::testing::IsEmpty;

constexpr char kMlp[] = R"({"type": "Sequential", "modules": [
    {"type": "Linear", "in_features": 3, "out_features": 4},
    {"type": "ReLU"},
    {"type": "Linear", "in_features": 4, "out_features": 2}]})";

TEST(StateDictTest, SequentialSkipsParameterlessMembers) {
  EXPECT_THAT(KeysOf(MustBuild(kMlp)),
              ElementsAre("0.weight", "0.bias", "2.weight", "2.bias"));
}

TEST(StateDictTest, OrderIsParametersThenBuffersThenChildren) {
  ModulePtr model = MustBuild(R"({"type": "Module", "class_name": "Net",
      "children": {"bn": {"type": "BatchNorm1d", "num_features": 2}},
      "buffers": {"b": {"shape": [1]}},
      "parameters": {"p": {"shape": [2]}}})");
  // Spec field order does not matter: parameters, then buffers, then children,
  // like torch.
  EXPECT_THAT(KeysOf(model),
              ElementsAre("p", "b", "bn.weight", "bn.bias", "bn.running_mean",
                          "bn.running_var", "bn.num_batches_tracked"));
  StateDict state = GetStateDict(model).value();
  EXPECT_EQ(state.ModuleVersion(""), 1);
  EXPECT_EQ(state.ModuleVersion("bn"), 2);
}

TEST(StateDictTest, NonPersistentBufferIsAbsentAndUnexpectedOnLoad) {
  ModulePtr model = MustBuild(R"({"type": "Module", "buffers": {
      "kept": {"shape": [2]}, "scratch": {"shape": [2], "persistent": false}}})");
  EXPECT_THAT(KeysOf(model), ElementsAre("kept"));
  StateDict state;
  state.Set("kept", FullTensor(DType::kFloat32, {2}, 1));
  state.Set("scratch", FullTensor(DType::kFloat32, {2}, 1));
  absl::StatusOr<LoadResult> strict = LoadStateDict(model, state);
  EXPECT_EQ(strict.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(strict.status().message(),
            "Error(s) in loading state_dict for Module:\n\t"
            "Unexpected key(s) in state_dict: \"scratch\". ");
  absl::StatusOr<LoadResult> loose = LoadStateDict(model, state, NonStrict());
  ASSERT_TRUE(loose.ok()) << loose.status();
  EXPECT_THAT(loose->unexpected_keys, ElementsAre("scratch"));
  EXPECT_THAT(loose->missing_keys, IsEmpty());
}

TEST(StateDictTest, NoneBiasIsAbsentAndUnexpectedOnLoad) {
  ModulePtr model =
      MustBuild(R"({"type": "Linear", "in_features": 2, "out_features": 2,
                                  "bias": false})");
  EXPECT_THAT(KeysOf(model), ElementsAre("weight"));
  StateDict state = GetStateDict(model).value();
  state.Set("bias", FullTensor(DType::kFloat32, {2}, 0));
  EXPECT_EQ(LoadStateDict(model, state).status().message(),
            "Error(s) in loading state_dict for Linear:\n\t"
            "Unexpected key(s) in state_dict: \"bias\". ");
}

TEST(StateDictTest, TiedWeightsAreEmittedUnderBothKeysAndStayTiedAfterLoad) {
  auto shared = FullTensor(DType::kFloat32, {2, 2}, 1);
  auto encoder = std::make_shared<Module>("Linear");
  ASSERT_TRUE(encoder->AddParameter("weight", shared).ok());
  auto decoder = std::make_shared<Module>("Linear");
  ASSERT_TRUE(decoder->AddParameter("weight", shared).ok());
  auto root = std::make_shared<Module>("Tied");
  ASSERT_TRUE(root->AddChild("encoder", encoder).ok());
  ASSERT_TRUE(root->AddChild("decoder", decoder).ok());
  ModulePtr model = root;
  EXPECT_THAT(KeysOf(model), ElementsAre("encoder.weight", "decoder.weight"));

  // torch copies both keys into the one shared tensor; the value traversed last
  // wins.
  StateDict state;
  state.Set("decoder.weight", FullTensor(DType::kFloat32, {2, 2}, 7));
  state.Set("encoder.weight", FullTensor(DType::kFloat32, {2, 2}, 3));
  LoadResult result = LoadStateDict(model, state).value();
  StateDict after = GetStateDict(result.model).value();
  EXPECT_TRUE(after.Find("encoder.weight")
                  ->BitwiseEquals(FullTensor(DType::kFloat32, {2, 2}, 7)));
  EXPECT_TRUE(after.Find("encoder.weight")
                  ->SharesBytesWith(*after.Find("decoder.weight")));

  // A non-strict load of one key reaches its tied twin too.
  StateDict one;
  one.Set("encoder.weight", FullTensor(DType::kFloat32, {2, 2}, 5));
  LoadResult partial = LoadStateDict(model, one, NonStrict()).value();
  EXPECT_THAT(partial.missing_keys, ElementsAre("decoder.weight"));
  StateDict partial_state = GetStateDict(partial.model).value();
  EXPECT_TRUE(partial_state.Find("decoder.weight")
                  ->BitwiseEquals(FullTensor(DType::kFloat32, {2, 2}, 5)));

  // assign replaces each module's tensor on its own, as torch's assign=True
  // does.
  LoadOptions assign;
  assign.assign = true;
  LoadResult assigned = LoadStateDict(model, state, assign).value();
  StateDict assigned_state = GetStateDict(assigned.model).value();
  EXPECT_TRUE(assigned_state.Find("encoder.weight")
                  ->BitwiseEquals(FullTensor(DType::kFloat32, {2, 2}, 3)));
  EXPECT_TRUE(assigned_state.Find("decoder.weight")
                  ->BitwiseEquals(FullTensor(DType::kFloat32, {2, 2}, 7)));
}

TEST(StateDictTest, AliasedSubmoduleIsEmittedUnderEachName) {
  auto linear =
      MustBuild(R"({"type": "Linear", "in_features": 1, "out_features": 1})");
  auto root = std::make_shared<Module>("Net");
  ASSERT_TRUE(root->AddChild("a", linear).ok());
  ASSERT_TRUE(root->AddChild("b", linear).ok());
  EXPECT_THAT(KeysOf(root),
              ElementsAre("a.weight", "a.bias", "b.weight", "b.bias"));
}

TEST(StateDictTest,
     Float64CheckpointIsCastToFloat32ModelWithRoundToNearestEven) {
  ModulePtr model =
      MustBuild(R"({"type": "Module", "parameters": {"w": {"shape": [3]}}})");
  const std::vector<double> values = {0.1, 1.0 + 1e-9, 3.0000001192092896};
  StateDict state;
  state.Set("w", Tensor::FromBytes(
                     DType::kFloat64, {3},
                     {reinterpret_cast<const uint8_t*>(values.data()), 24})
                     .value());
  LoadResult result = LoadStateDict(model, state).value();
  // A copy: the state dict that Find points into is a temporary.
  const Tensor w = *GetStateDict(result.model).value().Find("w");
  ASSERT_EQ(w.dtype(), DType::kFloat32);
  for (int i = 0; i < 3; ++i)
    EXPECT_EQ(w.data_as<float>()[i], static_cast<float>(values[i]));
}

TEST(StateDictTest, ShapeOneLoadsIntoScalarButOneByOneDoesNot) {
  ModulePtr model =
      MustBuild(R"({"type": "Module", "parameters": {"s": {"shape": []}}})");
  StateDict one;
  one.Set("s", FloatTensor({1}, {2.5f}));
  LoadResult result = LoadStateDict(model, one).value();
  // A copy: the state dict that Find points into is a temporary.
  const Tensor s = *GetStateDict(result.model).value().Find("s");
  EXPECT_TRUE(s.shape().empty());
  EXPECT_EQ(s.data_as<float>()[0], 2.5f);

  StateDict one_by_one;
  one_by_one.Set("s", FloatTensor({1, 1}, {2.5f}));
  EXPECT_EQ(LoadStateDict(model, one_by_one).status().message(),
            "Error(s) in loading state_dict for Module:\n\tsize mismatch for "
            "s: copying a param "
            "with shape torch.Size([1, 1]) from checkpoint, the shape in "
            "current model is "
            "torch.Size([]).");
}

TEST(StateDictTest, MissingUnexpectedAndSizeMismatchMessageOrder) {
  ModulePtr model = MustBuild(kMlp);
  StateDict state = GetStateDict(model).value();
  StateDict broken;
  broken.Set("0.weight",
             FullTensor(DType::kFloat32, {4, 5}, 0));  // size mismatch
  broken.Set("2.weight", *state.Find("2.weight"));
  broken.Set("3.weight", FullTensor(DType::kFloat32, {1}, 0));  // unexpected
  broken.Set("extra", FullTensor(DType::kFloat32, {1}, 0));     // unexpected
  absl::Status status = LoadStateDict(model, broken).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(status.message(),
            "Error(s) in loading state_dict for Sequential:\n\t"
            "Missing key(s) in state_dict: \"0.bias\", \"2.bias\". \n\t"
            "Unexpected key(s) in state_dict: \"3.weight\", \"extra\". \n\t"
            "size mismatch for 0.weight: copying a param with shape "
            "torch.Size([4, 5]) from "
            "checkpoint, the shape in current model is torch.Size([4, 3]).");
  // Size mismatches fail even when not strict; missing and unexpected keys
  // alone do not.
  absl::Status loose = LoadStateDict(model, broken, NonStrict()).status();
  EXPECT_EQ(loose.message(),
            "Error(s) in loading state_dict for Sequential:\n\t"
            "size mismatch for 0.weight: copying a param with shape "
            "torch.Size([4, 5]) from "
            "checkpoint, the shape in current model is torch.Size([4, 3]).");
}

TEST(StateDictTest, UnexpectedKeysUnderAndBesideChildren) {
  ModulePtr model = MustBuild(R"({"type": "Module", "children": {
      "fc": {"type": "Linear", "in_features": 1, "out_features": 1}, "gone": null}})");
  StateDict state = GetStateDict(model).value();
  state.Set("fc.weight.extra", FullTensor(DType::kFloat32, {1}, 0));
  state.Set("fcx.weight", FullTensor(DType::kFloat32, {1}, 0));
  state.Set("gone.weight", FullTensor(DType::kFloat32, {1},
                                      0));  // under a None child: ignored
  LoadResult result = LoadStateDict(model, state, NonStrict()).value();
  // Root-level checks come first, then fc's.
  EXPECT_THAT(result.unexpected_keys,
              ElementsAre("fcx.weight", "fc.weight.extra"));
  EXPECT_THAT(result.missing_keys, IsEmpty());
}

TEST(StateDictTest, OldBatchNormCheckpointWithoutNumBatchesTrackedLoads) {
  ModulePtr model = MustBuild(R"({"type": "BatchNorm2d", "num_features": 3})");
  StateDict state = GetStateDict(model).value();
  StateDict old;
  for (const auto& entry : state.entries()) {
    if (entry.key != "num_batches_tracked") old.Set(entry.key, entry.tensor);
  }
  LoadResult result =
      LoadStateDict(model, old).value();  // No metadata: version unknown.
  EXPECT_THAT(result.missing_keys, IsEmpty());
  // With version-2 metadata the key is really missing.
  old.SetModuleVersion("", 2);
  EXPECT_EQ(LoadStateDict(model, old).status().message(),
            "Error(s) in loading state_dict for BatchNorm2d:\n\t"
            "Missing key(s) in state_dict: \"num_batches_tracked\". ");
}

TEST(StateDictTest, EmptyModelAndEmptyDictMatch) {
  ModulePtr model = std::make_shared<Module>("Module");
  LoadResult result = LoadStateDict(model, StateDict()).value();
  EXPECT_EQ(IncompatibleKeysString(result.missing_keys, result.unexpected_keys),
            "<All keys matched successfully>");
  EXPECT_EQ(
      IncompatibleKeysString({"a"}, {"b", "c"}),
      "_IncompatibleKeys(missing_keys=['a'], unexpected_keys=['b', 'c'])");
}

TEST(StateDictTest, SubmoduleStateDictUsesModulePathSemantics) {
  std::string layers = R"({"type": "ModuleList", "modules": [)";
  for (int i = 0; i < 11; ++i) {
    layers +=
        std::string(i ? "," : "") + R"({"type": "Linear", "args": [1, 1]})";
  }
  layers += "]}";
  ModulePtr model = MustBuild(R"({"type": "Module", "children": {"layers": )" +
                              layers + "}}");
  StateDictOptions options;
  options.module = "layers.1";
  EXPECT_THAT(GetStateDict(model, options).value().Keys(),
              ElementsAre("layers.1.weight", "layers.1.bias"));
  options.keep_module_prefix = false;
  EXPECT_THAT(GetStateDict(model, options).value().Keys(),
              ElementsAre("weight", "bias"));
  options.module =
      "layers.1.";  // A prefix spelled with its trailing dot works too.
  options.prefix = "p.";
  EXPECT_THAT(GetStateDict(model, options).value().Keys(),
              ElementsAre("p.weight", "p.bias"));
  options.module = "layers.11";
  EXPECT_EQ(GetStateDict(model, options).status().code(),
            absl::StatusCode::kNotFound);
}

TEST(StateDictTest, RecurseFalseBuffersOffAndKeyFilter) {
  ModulePtr model =
      MustBuild(R"({"type": "Module", "parameters": {"p": {"shape": [1]}},
      "children": {"bn": {"type": "BatchNorm1d", "num_features": 1}}})");
  StateDictOptions own;
  own.recurse = false;
  EXPECT_THAT(GetStateDict(model, own).value().Keys(), ElementsAre("p"));
  StateDictOptions params;
  params.include_buffers = false;
  EXPECT_THAT(GetStateDict(model, params).value().Keys(),
              ElementsAre("p", "bn.weight", "bn.bias"));
  StateDictOptions keys;
  keys.keys = {"bn.running_var", "p"};
  EXPECT_THAT(GetStateDict(model, keys).value().Keys(),
              ElementsAre("bn.running_var", "p"));
  keys.keys = {"nope"};
  EXPECT_EQ(GetStateDict(model, keys).status().code(),
            absl::StatusCode::kNotFound);
  StateDict destination;
  destination.Set("x", FullTensor(DType::kFloat32, {1}, 0));
  ASSERT_TRUE(AppendStateDict(model, own, &destination).ok());
  EXPECT_THAT(destination.Keys(), ElementsAre("x", "p"));
}

TEST(StateDictTest, LoadIntoSubmoduleLeavesTheRestShared) {
  ModulePtr model = MustBuild(R"({"type": "Module", "children": {
      "encoder": {"type": "Linear", "args": [2, 2]},
      "decoder": {"type": "Linear", "args": [2, 2]}}})");
  StateDict state;
  state.Set("weight", FullTensor(DType::kFloat32, {2, 2}, 9));
  LoadOptions options;
  options.module = "encoder";
  options.strict = false;
  LoadResult result = LoadStateDict(model, state, options).value();
  EXPECT_THAT(result.missing_keys, ElementsAre("bias"));
  EXPECT_EQ(result.model->children()[1].module, model->children()[1].module);
  StateDict after = GetStateDict(result.model).value();
  EXPECT_TRUE(after.Find("encoder.weight")
                  ->BitwiseEquals(FullTensor(DType::kFloat32, {2, 2}, 9)));
  // The original tree is untouched.
  EXPECT_FALSE(GetStateDict(model)
                   .value()
                   .Find("encoder.weight")
                   ->BitwiseEquals(FullTensor(DType::kFloat32, {2, 2}, 9)));
  options.strict = true;
  EXPECT_EQ(LoadStateDict(model, state, options).status().message(),
            "Error(s) in loading state_dict for Linear:\n\tMissing key(s) in "
            "state_dict: "
            "\"bias\". ");
}

TEST(StateDictTest, AssignKeepsCheckpointDtypeButStillChecksShape) {
  ModulePtr model = MustBuild(R"({"type": "Linear", "args": [2, 1]})");
  StateDict state;
  state.Set("weight", FullTensor(DType::kBFloat16, {1, 2}, 1));
  state.Set("bias", FullTensor(DType::kFloat16, {1}, 1));
  LoadOptions assign;
  assign.assign = true;
  StateDict after =
      GetStateDict(LoadStateDict(model, state, assign).value().model).value();
  EXPECT_EQ(after.Find("weight")->dtype(), DType::kBFloat16);
  EXPECT_EQ(after.Find("bias")->dtype(), DType::kFloat16);
  StateDict cast =
      GetStateDict(LoadStateDict(model, state).value().model).value();
  EXPECT_EQ(cast.Find("weight")->dtype(), DType::kFloat32);
  state.Set("bias", FullTensor(DType::kFloat16, {2}, 1));
  EXPECT_EQ(LoadStateDict(model, state, assign).status().code(),
            absl::StatusCode::kFailedPrecondition);
}

TEST(StateDictTest, PlanLoadRejectsDuplicateKeys) {
  ModulePtr model = MustBuild(kMlp);
  std::vector<TensorSpec> specs = {{"0.bias", DType::kFloat32, {4}},
                                   {"0.bias", DType::kFloat32, {4}}};
  EXPECT_EQ(PlanLoad(model, specs, NonStrict()).status().code(),
            absl::StatusCode::kInvalidArgument);
}

// The index views the entries' keys: every key must still be found after
// the entries move (growth, Reserve), in copies and in moved-to dicts, short
// keys (inside their string objects) and long ones alike.
TEST(StateDictTest, KeysAreFoundThroughGrowthCopiesAndMoves) {
  auto key = [](int i) {
    return i % 2 == 0 ? absl::StrCat("k", i)
                      : absl::StrCat("encoder.layers.", i, ".self_attn.weight");
  };
  auto expect_all = [&](const StateDict& state, int count) {
    ASSERT_EQ(state.size(), static_cast<size_t>(count));
    for (int i = 0; i < count; ++i) {
      const Tensor* found = state.Find(key(i));
      ASSERT_NE(found, nullptr) << key(i);
      EXPECT_EQ(found->num_elements(), i + 1);
    }
    EXPECT_EQ(state.Find("absent"), nullptr);
  };
  StateDict state;
  for (int i = 0; i < 300; ++i)
    state.Set(key(i), Tensor::Zeros(DType::kFloat32, {i + 1}).value());
  expect_all(state, 300);
  state.Reserve(5000);
  expect_all(state, 300);
  StateDict copy = state;
  for (int i = 300; i < 700; ++i)
    ASSERT_TRUE(
        state.Insert(key(i), Tensor::Zeros(DType::kFloat32, {i + 1}).value())
            .ok());
  expect_all(copy, 300);
  expect_all(state, 700);
  EXPECT_EQ(state.Insert(key(5), Tensor()).code(),
            absl::StatusCode::kInvalidArgument);
  StateDict assigned;
  assigned = copy;
  copy = StateDict();
  expect_all(assigned, 300);
  StateDict moved = std::move(state);
  expect_all(moved, 700);
  // Set on an existing key keeps its place.
  moved.Set(key(3), Tensor::Zeros(DType::kFloat32, {4}).value());
  EXPECT_EQ(moved.entries()[3].key, key(3));
  expect_all(moved, 700);
  StateDict& alias = moved;
  moved = std::move(alias);  // A self-move keeps everything.
  expect_all(moved, 700);
  assigned = std::move(moved);
  expect_all(assigned, 700);
}

}  // namespace
}  // namespace modelstate

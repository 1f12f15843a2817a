// Layouts of spec §6 and torch's default initialisation.
#include "model/module_factory.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <string>

#include "absl/strings/str_cat.h"
#include "common/limits.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "model/module_version.h"
#include "model/test_util.h"

namespace modelstate {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

Shape ShapeOf(const ModulePtr& model, const std::string& key) {
  return GetStateDict(model).value().Find(key)->shape();
}

void ExpectAll(const Tensor& tensor, float value) {
  Tensor f = tensor.CastTo(DType::kFloat32).value();
  for (int64_t i = 0; i < f.num_elements(); ++i)
    ASSERT_EQ(f.data_as<float>()[i], value);
}

void ExpectWithin(const Tensor& tensor, double bound) {
  Tensor f = tensor.CastTo(DType::kFloat32).value();
  bool any_nonzero = false;
  for (int64_t i = 0; i < f.num_elements(); ++i) {
    ASSERT_LE(std::fabs(f.data_as<float>()[i]), bound);
    any_nonzero |= f.data_as<float>()[i] != 0;
  }
  EXPECT_TRUE(any_nonzero || f.num_elements() == 0);
}

TEST(ModuleFactoryTest, LinearUsesKaimingUniformBounds) {
  ModulePtr linear =
      MustBuild(R"({"type": "Linear", "in_features": 16, "out_features": 4})");
  StateDict state = GetStateDict(linear).value();
  EXPECT_EQ(state.Find("weight")->shape(), (Shape{4, 16}));
  ExpectWithin(*state.Find("weight"), 0.25);
  ExpectWithin(*state.Find("bias"), 0.25);
  // The same seed gives the same weights; another seed does not.
  EXPECT_TRUE(GetStateDict(MustBuild(R"({"type": "Linear", "args": [16, 4]})"))
                  .value()
                  .Find("weight")
                  ->BitwiseEquals(*state.Find("weight")));
  EXPECT_FALSE(
      GetStateDict(MustBuild(R"({"type": "Linear", "args": [16, 4]})", 7))
          .value()
          .Find("weight")
          ->BitwiseEquals(*state.Find("weight")));
}

TEST(ModuleFactoryTest, ConvolutionLayouts) {
  ModulePtr conv =
      MustBuild(R"({"type": "Conv2d", "in_channels": 4, "out_channels": 8,
                                 "kernel_size": [3, 5], "groups": 2, "padding": "same"})");
  EXPECT_EQ(ShapeOf(conv, "weight"), (Shape{8, 2, 3, 5}));
  ExpectWithin(*GetStateDict(conv).value().Find("weight"), 1 / std::sqrt(30.0));
  EXPECT_EQ(
      ShapeOf(MustBuild(R"({"type": "Conv1d", "args": [3, 6, 4]})"), "weight"),
      (Shape{6, 3, 4}));
  ModulePtr transposed = MustBuild(
      R"({"type": "ConvTranspose2d", "args": [4, 6, 3], "groups": 2, "bias": false})");
  EXPECT_EQ(ShapeOf(transposed, "weight"), (Shape{4, 3, 3, 3}));
  EXPECT_THAT(KeysOf(transposed), ElementsAre("weight"));
  EXPECT_THAT(BuildModuleFromSpec(
                  R"({"type": "Conv2d", "args": [3, 6, 3], "groups": 2})")
                  .status()
                  .message(),
              HasSubstr("in_channels must be divisible by groups"));
}

TEST(ModuleFactoryTest, NormalisationLayersStartAtOnesAndZeros) {
  ModulePtr bn = MustBuild(R"({"type": "BatchNorm2d", "num_features": 3})");
  StateDict state = GetStateDict(bn).value();
  EXPECT_THAT(state.Keys(), ElementsAre("weight", "bias", "running_mean",
                                        "running_var", "num_batches_tracked"));
  ExpectAll(*state.Find("weight"), 1);
  ExpectAll(*state.Find("bias"), 0);
  ExpectAll(*state.Find("running_var"), 1);
  EXPECT_EQ(state.Find("num_batches_tracked")->dtype(), DType::kInt64);
  EXPECT_TRUE(state.Find("num_batches_tracked")->shape().empty());
  EXPECT_EQ(bn->version(), 2);
  EXPECT_THAT(
      KeysOf(MustBuild(
          R"({"type": "BatchNorm1d", "args": [3], "affine": false})")),
      ElementsAre("running_mean", "running_var", "num_batches_tracked"));
  EXPECT_THAT(
      KeysOf(MustBuild(
          R"({"type": "BatchNorm1d", "args": [3], "track_running_stats": false})")),
      ElementsAre("weight", "bias"));
  EXPECT_EQ(
      ShapeOf(MustBuild(R"({"type": "LayerNorm", "normalized_shape": [4, 5]})"),
              "weight"),
      (Shape{4, 5}));
  EXPECT_THAT(
      KeysOf(MustBuild(
          R"({"type": "LayerNorm", "args": [4], "elementwise_affine": false})")),
      ElementsAre());
  EXPECT_EQ(
      ShapeOf(MustBuild(R"({"type": "GroupNorm", "args": [2, 6]})"), "bias"),
      (Shape{6}));
}

TEST(ModuleFactoryTest, EmbeddingZeroesThePaddingRow) {
  ModulePtr embedding =
      MustBuild(R"({"type": "Embedding", "args": [10, 4], "padding_idx": -1})");
  Tensor weight = *GetStateDict(embedding).value().Find("weight");
  EXPECT_EQ(weight.shape(), (Shape{10, 4}));
  for (int i = 0; i < 4; ++i) EXPECT_EQ(weight.data_as<float>()[36 + i], 0.0f);
  EXPECT_NE(weight.data_as<float>()[0], 0.0f);
}

TEST(ModuleFactoryTest, IntegersBeyondInt64AreRejectedNotWrapped) {
  // 2^64 - 1 would wrap to padding_idx -1, a valid index.
  absl::Status status = BuildModuleFromSpec(
                            R"({"type": "Embedding", "args": [10, 4],
              "padding_idx": 18446744073709551615})")
                            .status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("does not fit in int64"));
  EXPECT_TRUE(BuildModuleFromSpec(
                  R"({"type": "Linear", "args": [9223372036854775807, 0]})")
                  .status()
                  .message()
                  .find("does not fit") == absl::string_view::npos);
}

TEST(ModuleFactoryTest, AttentionAndTransformerLayouts) {
  ModulePtr mha = MustBuild(
      R"({"type": "MultiheadAttention", "embed_dim": 8, "num_heads": 2})");
  EXPECT_THAT(KeysOf(mha), ElementsAre("in_proj_weight", "in_proj_bias",
                                       "out_proj.weight", "out_proj.bias"));
  EXPECT_EQ(ShapeOf(mha, "in_proj_weight"), (Shape{24, 8}));
  ExpectWithin(*GetStateDict(mha).value().Find("in_proj_weight"),
               std::sqrt(6.0 / 32));
  ExpectAll(*GetStateDict(mha).value().Find("out_proj.bias"), 0);
  ModulePtr kv =
      MustBuild(R"({"type": "MultiheadAttention", "args": [8, 2], "kdim": 3,
                               "vdim": 5, "add_bias_kv": true})");
  EXPECT_THAT(KeysOf(kv),
              ElementsAre("q_proj_weight", "k_proj_weight", "v_proj_weight",
                          "in_proj_bias", "bias_k", "bias_v", "out_proj.weight",
                          "out_proj.bias"));
  EXPECT_EQ(ShapeOf(kv, "k_proj_weight"), (Shape{8, 3}));
  ModulePtr layer =
      MustBuild(R"({"type": "TransformerEncoderLayer", "d_model": 8, "nhead": 2,
                                  "dim_feedforward": 16})");
  EXPECT_THAT(
      KeysOf(layer),
      ElementsAre("self_attn.in_proj_weight", "self_attn.in_proj_bias",
                  "self_attn.out_proj.weight", "self_attn.out_proj.bias",
                  "linear1.weight", "linear1.bias", "linear2.weight",
                  "linear2.bias", "norm1.weight", "norm1.bias", "norm2.weight",
                  "norm2.bias"));
}

TEST(ModuleFactoryTest, ContainersAndGenericModules) {
  ModulePtr dict = MustBuild(R"({"type": "ModuleDict", "modules": {
      "b": {"type": "Linear", "args": [1, 1], "dtype": "float16"},
      "a": {"type": "Identity"}}})");
  EXPECT_THAT(KeysOf(dict), ElementsAre("b.weight", "b.bias"));
  EXPECT_EQ(GetStateDict(dict).value().Find("b.weight")->dtype(),
            DType::kFloat16);
  ModulePtr generic =
      MustBuild(R"({"type": "Module", "class_name": "Net", "dtype": "bfloat16",
      "parameters": {"w": {"shape": [2], "init": "constant", "value": 3}, "none": null},
      "buffers": {"steps": {"shape": [], "dtype": "int64", "init": "ones"}}})");
  EXPECT_EQ(generic->type_name(), "Net");
  StateDict state = GetStateDict(generic).value();
  EXPECT_EQ(state.Find("w")->dtype(), DType::kBFloat16);
  ExpectAll(*state.Find("w"), 3);
  EXPECT_EQ(state.Find("steps")->dtype(), DType::kInt64);
  EXPECT_EQ(generic->parameters().size(), 2u);
}

TEST(ModuleFactoryTest, BadSpecsNameTheProblemAndItsPath) {
  EXPECT_THAT(BuildModuleFromSpec("{").status().message(),
              HasSubstr("not valid JSON"));
  EXPECT_THAT(BuildModuleFromSpec(R"({"type": "Linaer"})").status().message(),
              HasSubstr("unknown module type \"Linaer\""));
  EXPECT_THAT(BuildModuleFromSpec(R"({"type": "Sequential", "modules": [
                  {"type": "Linear", "in_features": 2, "out_feature": 3}]})")
                  .status()
                  .message(),
              HasSubstr("at 0: unknown argument \"out_feature\""));
  EXPECT_THAT(BuildModuleFromSpec(R"({"type": "Linear", "args": [2]})")
                  .status()
                  .message(),
              HasSubstr("missing argument \"out_features\""));
  EXPECT_THAT(BuildModuleFromSpec(
                  R"({"type": "Linear", "args": [2, 3], "in_features": 2})")
                  .status()
                  .message(),
              HasSubstr("multiple values"));
  EXPECT_THAT(
      BuildModuleFromSpec(
          R"({"type": "Module", "parameters": {"a.b": {"shape": [1]}}})")
          .status()
          .message(),
      HasSubstr("can't contain"));
  EXPECT_THAT(BuildModuleFromSpec(
                  R"({"type": "Linear", "args": [2, 3], "dtype": "float128"})")
                  .status()
                  .message(),
              HasSubstr("unknown dtype"));
  for (const char* bad :
       {R"({"type": "Linear", "args": [2, 3.5]})",
        R"({"type": "Module", "parameters": {"w": {"shape": [-1]}}})",
        R"({"type": "Module", "parameters": {"x": {"shape": [1]}},
                              "children": {"x": {"type": "ReLU"}}})"}) {
    EXPECT_EQ(BuildModuleFromSpec(bad).status().code(),
              absl::StatusCode::kInvalidArgument)
        << bad;
  }
}

TEST(ModuleFactoryTest, FlatStateDictBecomesAModuleTree) {
  StateDict state;
  state.Set("model.layers.0.weight", FullTensor(DType::kFloat32, {2}, 1));
  state.Set("model.norm.weight", FullTensor(DType::kFloat32, {2}, 1));
  state.Set("model.layers.0.stat", FullTensor(DType::kFloat32, {2}, 1));
  state.Set("lm_head.weight", FullTensor(DType::kFloat32, {2}, 1));
  ModulePtr model =
      BuildModuleFromStateDict(state, {"model.layers.0.stat"}).value();
  EXPECT_THAT(KeysOf(model),
              ElementsAre("model.layers.0.weight", "model.layers.0.stat",
                          "model.norm.weight", "lm_head.weight"));
  EXPECT_EQ(
      model->GetSubmodule(model, "model.layers.0").value()->buffers().size(),
      1u);
  // Tensors are shared with the checkpoint, not copied.
  EXPECT_EQ(GetStateDict(model).value().Find("lm_head.weight")->data(),
            state.Find("lm_head.weight")->data());
  StateDict clash;
  clash.Set("a", FullTensor(DType::kFloat32, {1}, 1));
  clash.Set("a.b", FullTensor(DType::kFloat32, {1}, 1));
  EXPECT_EQ(BuildModuleFromStateDict(clash).status().code(),
            absl::StatusCode::kInvalidArgument);
  StateDict empty_part;
  empty_part.Set("a..b", FullTensor(DType::kFloat32, {1}, 1));
  EXPECT_FALSE(BuildModuleFromStateDict(empty_part).ok());
  EXPECT_FALSE(BuildModuleFromStateDict(state, {"nope"}).ok());
}

// Required arguments of the classes that have any; the others build from
// {"type": T} alone.
const std::map<std::string, std::string>& RequiredArgs() {
  static const auto* args = new std::map<std::string, std::string>{
      {"Linear", R"("args": [2, 3])"},
      {"Conv1d", R"("args": [2, 4, 3])"},
      {"Conv2d", R"("args": [2, 4, 3])"},
      {"Conv3d", R"("args": [2, 4, 3])"},
      {"ConvTranspose1d", R"("args": [2, 4, 3])"},
      {"ConvTranspose2d", R"("args": [2, 4, 3])"},
      {"BatchNorm1d", R"("args": [3])"},
      {"BatchNorm2d", R"("args": [3])"},
      {"BatchNorm3d", R"("args": [3])"},
      {"LayerNorm", R"("args": [4])"},
      {"GroupNorm", R"("args": [2, 4])"},
      {"Embedding", R"("args": [5, 3])"},
      {"MultiheadAttention", R"("args": [4, 2])"},
      {"TransformerEncoderLayer", R"("args": [4, 2, 8])"},
  };
  return *args;
}

TEST(ModuleFactoryTest, EverySupportedTypeBuildsWithDefaultArguments) {
  const std::vector<std::string> types = SupportedModuleTypes();
  EXPECT_EQ(types.size(), 29u);
  EXPECT_TRUE(std::is_sorted(types.begin(), types.end()));
  for (const auto& [type, args] : RequiredArgs()) {
    EXPECT_NE(std::find(types.begin(), types.end(), type), types.end()) << type;
  }
  for (const std::string& type : types) {
    SCOPED_TRACE(type);
    auto required = RequiredArgs().find(type);
    const std::string bare = absl::StrCat(R"({"type": ")", type, R"("})");
    if (required != RequiredArgs().end()) {
      // Without its required arguments the class is an error, not a guess.
      EXPECT_THAT(BuildModuleFromSpec(bare).status().message(),
                  HasSubstr("missing argument"));
    }
    const std::string spec = required == RequiredArgs().end()
                                 ? bare
                                 : absl::StrCat(R"({"type": ")", type, R"(", )",
                                                required->second, "}");
    absl::StatusOr<ModulePtr> module = BuildModuleFromSpec(spec);
    ASSERT_TRUE(module.ok()) << module.status();
    EXPECT_EQ((*module)->type_name(), type);
    EXPECT_EQ((*module)->version(), TorchModuleVersion(type));
    // Layers with tensors have them; activations, pooling and empty
    // containers have none.
    EXPECT_EQ(KeysOf(*module).empty(), required == RequiredArgs().end());
  }
}

// `levels` Sequentials, each holding the next, around a ReLU.
std::string NestedSequentials(int levels) {
  std::string spec;
  for (int i = 0; i < levels; ++i)
    spec += R"({"type": "Sequential", "modules": [)";
  spec += R"({"type": "ReLU"})";
  for (int i = 0; i < levels; ++i) spec += "]}";
  return spec;
}

TEST(ModuleFactoryTest, SpecNestingIsBoundedWithoutOverflowingTheStack) {
  // kMaxSpecDepth modules deep (the ReLU is the last) builds.
  ModulePtr deepest = MustBuild(NestedSequentials(kMaxSpecDepth - 1));
  ASSERT_NE(deepest, nullptr);
  std::string relu_path = "0";
  for (int i = 1; i < kMaxSpecDepth - 1; ++i) relu_path += ".0";
  EXPECT_EQ(deepest->GetSubmodule(deepest, relu_path).value()->type_name(),
            "ReLU");

  absl::Status one_more =
      BuildModuleFromSpec(NestedSequentials(kMaxSpecDepth)).status();
  EXPECT_EQ(one_more.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(one_more.message()),
              HasSubstr(absl::StrCat("at ", relu_path,
                                     ".0: modules nest more "
                                     "than kMaxSpecDepth (",
                                     kMaxSpecDepth, ")")));

  absl::Status hostile = BuildModuleFromSpec(NestedSequentials(10000)).status();
  EXPECT_EQ(hostile.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(hostile.message()), HasSubstr("kMaxSpecDepth"));

  // Generic modules nest through "children" under the same bound.
  std::string generic;
  for (int i = 0; i < 10000; ++i)
    generic += R"({"type": "Module", "children": {"c": )";
  generic += R"({"type": "Module"})";
  for (int i = 0; i < 10000; ++i) generic += "}}";
  EXPECT_THAT(std::string(BuildModuleFromSpec(generic).status().message()),
              HasSubstr("kMaxSpecDepth"));
}

TEST(ModuleFactoryTest, SizeProductsThatOverflowAreRejected) {
  // in_channels / groups * 2^62 * 4 overflows int64 before any allocation.
  absl::Status conv =
      BuildModuleFromSpec(
          R"({"type": "Conv2d", "args": [4, 8, [4611686018427387904, 4]]})")
          .status();
  EXPECT_EQ(conv.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(conv.message(), HasSubstr("fan-in"));
  EXPECT_THAT(conv.message(), HasSubstr("overflows int64"));
  absl::Status transposed =
      BuildModuleFromSpec(
          R"({"type": "ConvTranspose1d", "args": [3037000500, 3037000500, 3037000500]})")
          .status();
  EXPECT_THAT(transposed.message(), HasSubstr("fan-in"));
  // The packed in_proj_weight has 3 * embed_dim rows.
  absl::Status attention =
      BuildModuleFromSpec(
          R"({"type": "MultiheadAttention", "args": [4611686018427387904, 1]})")
          .status();
  EXPECT_EQ(attention.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(attention.message(), HasSubstr("3 * embed_dim overflows int64"));
  // Products of tensor shapes are checked by the tensor allocation.
  EXPECT_EQ(BuildModuleFromSpec(
                R"({"type": "Linear", "args": [4294967296, 4294967296]})")
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(ModuleFactoryTest, TheDryRunMeasuresExactlyWhatTheBuildMakes) {
  const std::vector<std::string> specs = {
      R"({"type": "Linear", "in_features": 3, "out_features": 5})",
      R"({"type": "Conv2d", "args": [3, 8, 3], "dtype": "bfloat16"})",
      R"({"type": "BatchNorm2d", "num_features": 4})",
      R"({"type": "Embedding", "args": [10, 4], "padding_idx": 0,
          "dtype": "float16"})",
      R"({"type": "TransformerEncoderLayer", "d_model": 8, "nhead": 2,
          "dim_feedforward": 16})",
      R"({"type": "MultiheadAttention", "embed_dim": 8, "num_heads": 2,
          "kdim": 4, "vdim": 4, "add_bias_kv": true})",
      R"({"type": "Module", "class_name": "Odd",
          "parameters": {"p": {"shape": [2, 3], "init": "normal"}, "n": null},
          "buffers": {"b": {"shape": [], "init": "ones", "persistent": false}},
          "children": {"c": {"type": "LayerNorm", "normalized_shape": [3]}}})",
  };
  for (const std::string& spec : specs) {
    SCOPED_TRACE(spec);
    const TreeCost built = MustBuild(spec)->Cost();
    const TreeCost estimate = EstimateSpecCost(spec).value();
    EXPECT_EQ(estimate.tensor_bytes, built.tensor_bytes);
    EXPECT_EQ(estimate.metadata_bytes, built.metadata_bytes);
    EXPECT_EQ(estimate.modules, built.modules);
  }
  // Nothing is allocated: 40 GB of weights are measured at once.
  EXPECT_EQ(EstimateSpecCost(R"({"type": "Linear", "args": [100000, 100000]})")
                .value()
                .tensor_bytes,
            int64_t{40000000000} + 400000);
  // A float32 model is drawn in place; another dtype is drawn in float32
  // first, and the largest such draw is the build's scratch.
  EXPECT_EQ(EstimateSpecCost(R"({"type": "Linear", "args": [1000, 100]})")
                .value()
                .build_scratch_bytes,
            0);
  EXPECT_EQ(EstimateSpecCost(R"({"type": "Sequential", "dtype": "float16",
                                 "modules": [
                                   {"type": "Linear", "args": [1000, 100]},
                                   {"type": "Embedding", "args": [300, 2000],
                                    "padding_idx": 0}]})")
                .value()
                .build_scratch_bytes,
            300 * 2000 * 4);
  // And its errors are the build's.
  EXPECT_EQ(EstimateSpecCost(R"({"type": "Linear", "args": [-1, 2]})")
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(ModuleFactoryTest, SpecTextIsBounded) {
  std::string spec = R"({"type": "Sequential", "modules": [)";
  while (spec.size() <= kMaxSpecBytes) spec += R"({"type": "ReLU"},)";
  spec += R"({"type": "ReLU"}]})";
  for (absl::Status status :
       {BuildModuleFromSpec(spec).status(), EstimateSpecCost(spec).status()}) {
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(status.message()), HasSubstr("kMaxSpecBytes"));
  }
}

}  // namespace
}  // namespace modelstate

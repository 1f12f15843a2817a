// BuildModuleFromStateDict: a checkpoint without a spec becomes a module tree,
// with the torch classes and buffers the caller names.
#include "model/module_tree.h"

#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_join.h"
#include "common/limits.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "model/module_version.h"
#include "model/test_util.h"

namespace modelstate {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;

Tensor Floats(const Shape& shape) {
  return FullTensor(DType::kFloat32, shape, 1);
}

std::string TypeAt(const ModulePtr& model, const std::string& path) {
  return model->GetSubmodule(model, path).value()->type_name();
}

int VersionAt(const ModulePtr& model, const std::string& path) {
  return model->GetSubmodule(model, path).value()->version();
}

StateDict EncoderCheckpoint() {
  StateDict state;
  state.Set("encoder.0.weight", Floats({2, 2}));
  state.Set("encoder.0.bias", Floats({2}));
  state.Set("encoder.1.weight", Floats({2}));
  state.Set("head.weight", Floats({2}));
  return state;
}

TEST(ModuleTreeTest, ClassNamesApplyPerPathAndTheRestAreModules) {
  ModuleTreeOptions options;
  options.class_names = {{"", "Net"},
                         {"encoder", "Sequential"},
                         {"encoder.0", "Linear"},
                         {"head", "torch.nn.Linear"}};
  ModulePtr model =
      BuildModuleFromStateDict(EncoderCheckpoint(), options).value();
  EXPECT_EQ(model->type_name(), "Net");
  EXPECT_EQ(TypeAt(model, "encoder"), "Sequential");
  EXPECT_EQ(TypeAt(model, "encoder.0"), "Linear");
  EXPECT_EQ(TypeAt(model, "encoder.1"), "Module");
  EXPECT_EQ(TypeAt(model, "head"), "torch.nn.Linear");
  EXPECT_EQ(VersionAt(model, ""), 1);
  EXPECT_EQ(VersionAt(model, "encoder.0"), 1);
  // Class names change no key and no tensor.
  EXPECT_THAT(KeysOf(model), ElementsAre("encoder.0.weight", "encoder.0.bias",
                                         "encoder.1.weight", "head.weight"));
}

TEST(ModuleTreeTest, WithoutOptionsEveryModuleIsAVersionOneModule) {
  ModulePtr model = BuildModuleFromStateDict(EncoderCheckpoint()).value();
  for (const char* path : {"", "encoder", "encoder.0", "encoder.1", "head"}) {
    EXPECT_EQ(TypeAt(model, path), "Module") << path;
    EXPECT_EQ(VersionAt(model, path), 1) << path;
  }
}

TEST(ModuleTreeTest, BufferKeysInOptionsBecomePersistentBuffers) {
  ModuleTreeOptions options;
  options.buffer_keys = {"encoder.1.weight"};
  ModulePtr model =
      BuildModuleFromStateDict(EncoderCheckpoint(), options).value();
  ModulePtr one = model->GetSubmodule(model, "encoder.1").value();
  ASSERT_EQ(one->buffers().size(), 1u);
  EXPECT_TRUE(one->buffers()[0].persistent);
  EXPECT_THAT(one->parameters(), IsEmpty());
  options.buffer_keys = {"encoder.1"};
  EXPECT_THAT(
      BuildModuleFromStateDict(EncoderCheckpoint(), options).status().message(),
      HasSubstr("buffer key \"encoder.1\" is not in the state dict"));
}

TEST(ModuleTreeTest, TorchVersionFollowsTheClass) {
  for (const char* norm :
       {"BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm",
        "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "LazyBatchNorm1d",
        "LazyBatchNorm2d", "LazyBatchNorm3d", "LazyInstanceNorm1d",
        "LazyInstanceNorm2d", "LazyInstanceNorm3d"}) {
    EXPECT_EQ(TorchModuleVersion(norm), 2) << norm;
  }
  for (const char* other : {"Module", "Linear", "LayerNorm", "GroupNorm",
                            "BatchNorm", "batchnorm2d"}) {
    EXPECT_EQ(TorchModuleVersion(other), 1) << other;
  }
}

StateDict BatchNormCheckpoint() {
  StateDict state;
  state.Set("bn.weight", Floats({3}));
  state.Set("bn.bias", Floats({3}));
  state.Set("bn.running_mean", Floats({3}));
  state.Set("bn.running_var", Floats({3}));
  state.Set("bn.num_batches_tracked", Tensor::Zeros(DType::kInt64, {}).value());
  return state;
}

ModulePtr BatchNormModel(const std::string& class_name) {
  ModuleTreeOptions options;
  options.buffer_keys = {"bn.running_mean", "bn.running_var",
                         "bn.num_batches_tracked"};
  options.class_names = {{"bn", class_name}};
  return BuildModuleFromStateDict(BatchNormCheckpoint(), options).value();
}

// A checkpoint older than BatchNorm's version 2, without num_batches_tracked.
StateDict WithoutNumBatchesTracked(const StateDict& state) {
  StateDict old;
  for (const StateDict::Entry& entry : state.entries()) {
    if (entry.key != "bn.num_batches_tracked") old.Set(entry.key, entry.tensor);
  }
  return old;
}

TEST(ModuleTreeTest, BatchNormClassNameGivesVersionTwoAndItsLoadRule) {
  ModulePtr model = BatchNormModel("BatchNorm2d");
  EXPECT_EQ(VersionAt(model, "bn"), 2);
  StateDict state = GetStateDict(model).value();
  EXPECT_EQ(state.ModuleVersion("bn"), 2);
  EXPECT_EQ(state.ModuleVersion(""), 1);

  // No metadata (a safetensors file): torch fills num_batches_tracked in.
  StateDict old = WithoutNumBatchesTracked(state);
  LoadResult loaded = LoadStateDict(model, old).value();
  EXPECT_THAT(loaded.missing_keys, IsEmpty());
  // Version-2 metadata: the key is really missing.
  old.SetModuleVersion("bn", 2);
  EXPECT_THAT(LoadStateDict(model, old).status().message(),
              HasSubstr("Missing key(s) in state_dict: "
                        "\"bn.num_batches_tracked\""));

  // The same tree as generic modules has no such rule.
  LoadOptions loose;
  loose.strict = false;
  LoadResult generic = LoadStateDict(BatchNormModel("Module"),
                                     WithoutNumBatchesTracked(state), loose)
                           .value();
  EXPECT_THAT(generic.missing_keys, ElementsAre("bn.num_batches_tracked"));
}

TEST(ModuleTreeTest, ClassNamesAddModulesThatHoldNoTensors) {
  ModuleTreeOptions options;
  options.class_names = {{"encoder.5", "ReLU"}, {"act", "GELU"}};
  ModulePtr root =
      BuildModuleFromStateDict(EncoderCheckpoint(), options).value();
  ModulePtr relu = root->GetSubmodule(root, "encoder.5").value();
  EXPECT_EQ(relu->type_name(), "ReLU");
  EXPECT_TRUE(relu->parameters().empty());
  EXPECT_EQ(root->GetSubmodule(root, "act").value()->type_name(), "GELU");
  // The state dict is the checkpoint's, in its order.
  EXPECT_EQ(GetStateDict(root).value().Keys(), EncoderCheckpoint().Keys());
}

TEST(ModuleTreeTest, ClassNamePathsFollowTheKeyRules) {
  const std::pair<const char*, const char*> cases[] = {
      {"head.weight", "as a tensor and as a module"},
      {"encoder..0", "empty component"},
      {"encoder.", "empty component"},
      {".encoder", "empty component"}};
  for (const auto& [path, message] : cases) {
    ModuleTreeOptions options;
    options.class_names = {{path, "Linear"}};
    absl::Status status =
        BuildModuleFromStateDict(EncoderCheckpoint(), options).status();
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << path;
    EXPECT_THAT(status.message(), HasSubstr(message)) << path;
  }
  ModuleTreeOptions deep;
  deep.class_names = {
      {absl::StrJoin(std::vector<std::string>(kMaxKeyComponents + 1, "m"), "."),
       "Linear"}};
  EXPECT_THAT(
      BuildModuleFromStateDict(EncoderCheckpoint(), deep).status().message(),
      HasSubstr("kMaxKeyComponents"));
}

TEST(ModuleTreeTest, ClassNamesMustBeShortIdentifiers) {
  for (const std::string& bad :
       {std::string(""), std::string("Bad Name"), std::string("Conv2d<T>"),
        std::string("a/b"), std::string(129, 'A')}) {
    ModuleTreeOptions options;
    options.class_names = {{"encoder", bad}};
    absl::Status status =
        BuildModuleFromStateDict(EncoderCheckpoint(), options).status();
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_THAT(status.message(), HasSubstr("[A-Za-z0-9_.]")) << bad;
    EXPECT_THAT(status.message(), HasSubstr("\"encoder\"")) << bad;
  }
  ModuleTreeOptions options;
  options.class_names = {{"encoder", std::string(128, 'A')}};
  EXPECT_TRUE(BuildModuleFromStateDict(EncoderCheckpoint(), options).ok());
}

// "a.a.a...": a key of `components` components.
std::string KeyOfComponents(int components) {
  std::string key = "a";
  for (int i = 1; i < components; ++i) key += ".a";
  return key;
}

TEST(ModuleTreeTest, KeysWithTooManyComponentsAreRejectedWithoutRecursion) {
  StateDict deepest;
  deepest.Set(KeyOfComponents(kMaxKeyComponents), Floats({1}));
  ModulePtr model = BuildModuleFromStateDict(deepest).value();
  EXPECT_THAT(KeysOf(model), ElementsAre(KeyOfComponents(kMaxKeyComponents)));

  StateDict one_more;
  one_more.Set(KeyOfComponents(kMaxKeyComponents + 1), Floats({1}));
  absl::Status status = BuildModuleFromStateDict(one_more).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(status.message()), HasSubstr("kMaxKeyComponents"));

  // 100,000 components are also far over the length limit, checked first.
  StateDict hostile;
  hostile.Set(KeyOfComponents(100000), Floats({1}));
  status = BuildModuleFromStateDict(hostile).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(status.message()), HasSubstr("kMaxKeyLength"));
  // The message quotes the key's start only.
  EXPECT_LT(status.message().size(), 300u);
}

TEST(ModuleTreeTest, KeysLongerThanTheLimitAreRejected) {
  StateDict longest;
  longest.Set(std::string(kMaxKeyLength, 'w'), Floats({1}));
  EXPECT_TRUE(BuildModuleFromStateDict(longest).ok());
  StateDict state;
  state.Set(std::string(kMaxKeyLength + 1, 'w'), Floats({1}));
  absl::Status status = BuildModuleFromStateDict(state).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(status.message()), HasSubstr("kMaxKeyLength"));
}

TEST(ModuleTreeTest, TheDeepestTensorModuleClashIsReportedFirst) {
  // As torch's recursive construction would: "a.b" clashes inside "a" before
  // "a" clashes in the root.
  StateDict state;
  state.Set("a", Floats({1}));
  state.Set("a.b", Floats({1}));
  state.Set("a.b.c", Floats({1}));
  ModuleTreeOptions options;
  options.class_names = {{"a", "Block"}};
  EXPECT_EQ(BuildModuleFromStateDict(state, options).status().message(),
            "state dict keys name the same thing as a tensor and as a module: "
            "attribute 'b' already exists in Block");
}

}  // namespace
}  // namespace modelstate

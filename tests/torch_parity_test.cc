// Parity with real PyTorch: fixtures come from tests/torch_oracle.py, run at
// test time with Debian's python3-torch, and are written by the independent
// tests/safetensors_ref.py.
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>

#include "absl/strings/escaping.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "model/module_factory.h"
#include "model/safetensors.h"
#include "model/state_dict.h"
#include "nlohmann/json.hpp"

namespace modelstate {
namespace {

using Json = nlohmann::ordered_json;

const std::string* fixture_dir = nullptr;

void RemoveFixtures() {
  if (fixture_dir != nullptr) std::system(("rm -rf " + *fixture_dir).c_str());
}

std::string FixtureDir() {
  static const std::string* dir = [] {
    // One directory per process: CTest runs these tests in parallel processes,
    // and two oracles writing the same files would let one test read another's
    // half-written fixture.
    auto* path = new std::string(testing::TempDir() + "/torch_oracle." +
                                 std::to_string(getpid()));
    const std::string command = std::string(MODELSTATE_PYTHON3) + " " +
                                MODELSTATE_SOURCE_DIR +
                                "/tests/torch_oracle.py " + *path + " 2>&1";
    const int rc = std::system(command.c_str());
    EXPECT_EQ(rc, 0) << "the PyTorch oracle failed: " << command;
    fixture_dir = path;
    std::atexit(RemoveFixtures);
    return path;
  }();
  return *dir;
}

Json ReadJson(const std::string& path) {
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  return Json::parse(text.str());
}

StateDict ReadState(const std::string& file) {
  absl::StatusOr<SafetensorsFile> parsed =
      ReadSafetensorsFile(FixtureDir() + "/" + file);
  EXPECT_TRUE(parsed.ok()) << parsed.status();
  return parsed.ok() ? parsed->tensors : StateDict();
}

std::vector<std::string> Strings(const Json& list) {
  std::vector<std::string> out;
  for (const Json& item : list) out.push_back(item.get<std::string>());
  return out;
}

class TorchParityTest : public testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    const std::string dir = FixtureDir();
    manifest_ = ReadJson(dir + "/" + GetParam() + ".cases.json");
    std::ifstream spec_file(std::string(MODELSTATE_SOURCE_DIR) +
                            "/tests/models/" + GetParam() + ".json");
    std::stringstream spec;
    spec << spec_file.rdbuf();
    absl::StatusOr<ModulePtr> model = BuildModuleFromSpec(spec.str());
    ASSERT_TRUE(model.ok()) << model.status();
    model_ = *model;
  }

  Json manifest_;
  ModulePtr model_;
};

TEST_P(TorchParityTest, KeysShapesDtypesAndClassMatch) {
  StateDict ours = GetStateDict(model_).value();
  EXPECT_EQ(ours.Keys(), Strings(manifest_["keys"]));
  ASSERT_EQ(ours.size(), manifest_["keys"].size());
  for (size_t i = 0; i < ours.size(); ++i) {
    const Tensor& tensor = ours.entries()[i].tensor;
    EXPECT_EQ(tensor.shape(), manifest_["shapes"][i].get<Shape>())
        << ours.entries()[i].key;
    EXPECT_EQ(SafetensorsName(tensor.dtype()),
              manifest_["dtypes"][i].get<std::string>())
        << ours.entries()[i].key;
  }
  EXPECT_EQ(model_->type_name(), manifest_["class"].get<std::string>());
}

TEST_P(TorchParityTest, DeterministicDefaultsAreBitIdentical) {
  StateDict ours = GetStateDict(model_).value();
  StateDict torch = ReadState(GetParam() + ".safetensors");
  for (const std::string& key : Strings(manifest_["deterministic"])) {
    ASSERT_NE(ours.Find(key), nullptr) << key;
    EXPECT_TRUE(ours.Find(key)->BitwiseEquals(*torch.Find(key))) << key;
  }
}

// Loads every broken state dict of the oracle into `model`, strict and not,
// and compares the outcome with torch's: error text, missing and unexpected
// keys, and the bits of every loaded tensor.
void ExpectTorchOutcomes(const Json& manifest, const std::string& model_name,
                         const ModulePtr& model) {
  for (const Json& broken : manifest["cases"]) {
    const std::string name = broken["name"].get<std::string>();
    StateDict input = ReadState(broken["file"].get<std::string>());
    for (const char* mode : {"strict", "loose"}) {
      SCOPED_TRACE(model_name + "." + name + " " + mode);
      const Json& expected = broken[mode];
      LoadOptions options;
      options.strict = std::string(mode) == "strict";
      absl::StatusOr<LoadResult> result = LoadStateDict(model, input, options);
      if (expected.contains("error")) {
        ASSERT_FALSE(result.ok());
        EXPECT_EQ(result.status().code(),
                  absl::StatusCode::kFailedPrecondition);
        EXPECT_EQ(result.status().message(),
                  expected["error"].get<std::string>());
        continue;
      }
      ASSERT_TRUE(result.ok()) << result.status();
      EXPECT_EQ(result->missing_keys, Strings(expected["missing"]));
      EXPECT_EQ(result->unexpected_keys, Strings(expected["unexpected"]));
      // Every tensor torch loaded holds the same bits in our model after the
      // load.
      StateDict after = GetStateDict(result->model).value();
      StateDict torch_after =
          ReadState(expected["after_file"].get<std::string>());
      for (const auto& entry : torch_after.entries()) {
        if (input.Find(entry.key) == nullptr)
          continue;  // kept its own (random) init
        ASSERT_NE(after.Find(entry.key), nullptr) << entry.key;
        EXPECT_TRUE(after.Find(entry.key)->BitwiseEquals(entry.tensor))
            << entry.key;
      }
    }
  }
}

// torch's refusal of a bad load into one child names the child's class.
void ExpectSubmoduleLoadMessage(const Json& manifest, const ModulePtr& model) {
  const Json& case_ = manifest["submodule_load"];
  LoadOptions options;
  options.module = case_["module"].get<std::string>();
  absl::StatusOr<LoadResult> result = LoadStateDict(
      model, ReadState(case_["file"].get<std::string>()), options);
  ASSERT_FALSE(result.ok());
  EXPECT_EQ(result.status().message(), case_["error"].get<std::string>());
}

TEST_P(TorchParityTest, BrokenStateDictsGiveTorchsOutcome) {
  ExpectTorchOutcomes(manifest_, GetParam(), model_);
  ExpectSubmoduleLoadMessage(manifest_, model_);
}

TEST_P(TorchParityTest, ModelsCreatedFromTensorsSpeakWithTorchsClassNames) {
  ModuleTreeOptions options;
  options.buffer_keys = Strings(manifest_["buffers"]);
  for (const auto& [path, name] : manifest_["class_names"].items())
    options.class_names[path] = name.get<std::string>();
  absl::StatusOr<ModulePtr> model =
      BuildModuleFromStateDict(ReadState(GetParam() + ".safetensors"), options);
  ASSERT_TRUE(model.ok()) << model.status();
  EXPECT_EQ((*model)->type_name(), manifest_["class"].get<std::string>());
  ExpectTorchOutcomes(manifest_, GetParam() + " from tensors", *model);
  ExpectSubmoduleLoadMessage(manifest_, *model);
}

TEST_P(TorchParityTest, OurFilesReadTheSameInTheReferenceReader) {
  StateDict ours = GetStateDict(model_).value();
  const std::string path =
      testing::TempDir() + "/" + GetParam() + ".ours.safetensors";
  ASSERT_TRUE(WriteSafetensorsFile(path, ours, {{"format", "pt"}}).ok());
  const std::string command = std::string(MODELSTATE_PYTHON3) + " " +
                              MODELSTATE_SOURCE_DIR +
                              "/tests/safetensors_ref.py dump " + path;
  std::unique_ptr<FILE, int (*)(FILE*)> pipe(popen(command.c_str(), "r"),
                                             pclose);
  ASSERT_NE(pipe, nullptr);
  std::string output;
  char buffer[1 << 16];
  size_t got;
  while ((got = fread(buffer, 1, sizeof buffer, pipe.get())) > 0)
    output.append(buffer, got);
  Json dumped = Json::parse(output, nullptr, false);
  ASSERT_FALSE(dumped.is_discarded()) << output.substr(0, 500);
  EXPECT_EQ(dumped["metadata"]["format"], "pt");
  ASSERT_EQ(dumped["tensors"].size(), ours.size());
  for (const auto& entry : ours.entries()) {
    const Json& tensor = dumped["tensors"][entry.key];
    EXPECT_EQ(tensor["dtype"].get<std::string>(),
              SafetensorsName(entry.tensor.dtype()));
    EXPECT_EQ(tensor["shape"].get<Shape>(), entry.tensor.shape());
    EXPECT_EQ(tensor["hex"].get<std::string>(),
              absl::BytesToHexString(absl::string_view(
                  reinterpret_cast<const char*>(entry.tensor.data()),
                  entry.tensor.num_bytes())))
        << entry.key;
  }
  std::remove(path.c_str());
}

INSTANTIATE_TEST_SUITE_P(Models, TorchParityTest,
                         testing::Values("mlp", "cnn", "attention",
                                         "transformer", "gpt2", "llama"));

TEST(TorchConversionParityTest, CopyMatchesTorchBitForBit) {
  const Json manifest = ReadJson(FixtureDir() + "/conversions.json");
  StateDict tensors = ReadState("conversions.safetensors");
  ASSERT_FALSE(manifest.empty());
  for (const Json& conversion : manifest) {
    const std::string name = conversion["name"].get<std::string>();
    const Tensor& src = *tensors.Find(name + ".src");
    const Tensor& expected = *tensors.Find(name + ".dst");
    absl::StatusOr<Tensor> ours = src.CastTo(expected.dtype());
    ASSERT_TRUE(ours.ok()) << ours.status();
    ASSERT_EQ(ours->num_bytes(), expected.num_bytes()) << name;
    int mismatches = 0;
    const size_t element = ElementSize(expected.dtype());
    for (int64_t i = 0; i < expected.num_elements() && mismatches < 5; ++i) {
      if (std::memcmp(ours->data() + i * element, expected.data() + i * element,
                      element) != 0) {
        ++mismatches;
        ADD_FAILURE()
            << name << " element " << i << ": source bytes "
            << absl::BytesToHexString(
                   absl::string_view(reinterpret_cast<const char*>(src.data()) +
                                         i * ElementSize(src.dtype()),
                                     ElementSize(src.dtype())))
            << " gave "
            << absl::BytesToHexString(absl::string_view(
                   reinterpret_cast<const char*>(ours->data()) + i * element,
                   element))
            << ", torch gives "
            << absl::BytesToHexString(absl::string_view(
                   reinterpret_cast<const char*>(expected.data()) + i * element,
                   element));
      }
    }
  }
}

}  // namespace
}  // namespace modelstate

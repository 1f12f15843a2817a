#include "store/model_files.h"

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/file_util.h"
#include "common/status_macros.h"
#include "model/safetensors.h"

namespace modelstate {

const char kDemoArchitecture[] = R"({"type": "Sequential", "modules": [
  {"type": "Conv2d", "in_channels": 3, "out_channels": 16, "kernel_size": 3, "padding": 1},
  {"type": "BatchNorm2d", "num_features": 16},
  {"type": "ReLU"},
  {"type": "Conv2d", "in_channels": 16, "out_channels": 32, "kernel_size": 3, "stride": 2},
  {"type": "BatchNorm2d", "num_features": 32},
  {"type": "ReLU"},
  {"type": "AdaptiveAvgPool2d", "output_size": 1},
  {"type": "Flatten"},
  {"type": "Linear", "in_features": 32, "out_features": 10}
]})";

absl::StatusOr<ModelFromFile> LoadModelFile(const std::string& path,
                                            const BuildOptions& options) {
  if (absl::EndsWith(path, ".safetensors")) {
    ASSIGN_OR_RETURN(SafetensorsFile file, ReadSafetensorsFile(path));
    ASSIGN_OR_RETURN(ModulePtr root, BuildModuleFromStateDict(file.tensors));
    return ModelFromFile{std::move(root), ""};
  }
  if (absl::EndsWith(path, ".json")) {
    ASSIGN_OR_RETURN(std::string text, ReadFileToString(path));
    absl::StatusOr<ModulePtr> root = BuildModuleFromSpec(text, options);
    if (!root.ok()) {
      return absl::Status(root.status().code(),
                          absl::StrCat(path, ": ", root.status().message()));
    }
    return ModelFromFile{*std::move(root), std::move(text)};
  }
  return absl::InvalidArgumentError(absl::StrCat(
      path,
      ": expected a .safetensors checkpoint or a .json architecture spec"));
}

}  // namespace modelstate

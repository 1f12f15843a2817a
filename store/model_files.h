// Models from files: a .safetensors checkpoint or an architecture spec (.json),
// and the demo.
#ifndef MODELSTATE_STORE_MODEL_FILES_H_
#define MODELSTATE_STORE_MODEL_FILES_H_

#include <string>

#include "absl/status/statusor.h"
#include "model/module.h"
#include "model/module_factory.h"

namespace modelstate {

struct ModelFromFile {
  ModulePtr root;
  std::string
      architecture;  // The spec's JSON for .json files; empty for checkpoints.
};

// Builds the model stored at `path`: a .safetensors file becomes a tree of
// generic modules (memory-mapped when large, so no copy is made), a .json file
// is built as an architecture spec. Returns InvalidArgument for another
// extension or bad contents, and I/O errors as ReadSafetensorsFile does.
absl::StatusOr<ModelFromFile> LoadModelFile(const std::string& path,
                                            const BuildOptions& options = {});

// The architecture of the built-in demo model: a small CNN (Conv2d,
// BatchNorm2d, Linear).
extern const char kDemoArchitecture[];

}  // namespace modelstate

#endif  // MODELSTATE_STORE_MODEL_FILES_H_

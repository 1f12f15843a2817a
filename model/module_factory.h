// Builds module trees from an architecture spec (JSON naming torch.nn classes
// and their arguments). See docs/architecture-spec.md. Trees built from a flat
// state dict (any checkpoint) are in module_tree.h, included here for the
// callers that use both.
#ifndef MODELSTATE_MODEL_MODULE_FACTORY_H_
#define MODELSTATE_MODEL_MODULE_FACTORY_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "model/module.h"
#include "model/module_tree.h"
#include "model/state_dict.h"

namespace modelstate {

struct BuildOptions {
  // Seeds the generator behind torch's random initialisers (kaiming/xavier
  // uniform, normal).
  uint64_t seed = 0;
  // dtype of modules whose spec does not name one (torch's default dtype).
  DType default_dtype = DType::kFloat32;
};

// Builds a module from an architecture spec such as
//   {"type": "Sequential", "modules": [
//      {"type": "Linear", "in_features": 4, "out_features": 8},
//      {"type": "ReLU"},
//      {"type": "Linear", "args": [8, 2], "bias": false, "dtype": "float16"}]}
// `type` is a torch.nn class name; arguments use torch's names (or go
// positionally in "args"). Tensors get torch's names, shapes and default
// initialisation; the same seed gives the same tensors. Returns
// InvalidArgument, naming the JSON path, for malformed JSON, an unknown type
// or argument, a bad value, a size that overflows int64, modules nested more
// than kMaxSpecDepth (common/limits.h) deep, a spec longer than kMaxSpecBytes
// or a model of more than kMaxModules modules.
absl::StatusOr<ModulePtr> BuildModuleFromSpec(absl::string_view spec_json,
                                              const BuildOptions& options = {});

// Measures the model BuildModuleFromSpec would build from `spec_json` without
// allocating or initialising any tensor: the same build runs over placeholder
// tensors (Initializer::DryRun), so the cost has the real tree's modules,
// names and shapes. The memory limit is checked against it before the real
// build. Errors as BuildModuleFromSpec.
absl::StatusOr<TreeCost> EstimateSpecCost(absl::string_view spec_json,
                                          const BuildOptions& options = {});

// Returns the torch.nn class names BuildModuleFromSpec understands, sorted.
std::vector<std::string> SupportedModuleTypes();

}  // namespace modelstate

#endif  // MODELSTATE_MODEL_MODULE_FACTORY_H_

// Builds module trees from an architecture spec (JSON naming torch.nn classes
// and their arguments) or from a flat state dict (any checkpoint). See
// docs/architecture-spec.md.
#ifndef MODELSTATE_CORE_MODULE_FACTORY_H_
#define MODELSTATE_CORE_MODULE_FACTORY_H_

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "core/module.h"
#include "core/state_dict.h"

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
// initialisation. Returns InvalidArgument, naming the JSON path, for malformed
// JSON, an unknown type or argument, or a bad value.
absl::StatusOr<ModulePtr> BuildModuleFromSpec(absl::string_view spec_json,
                                              const BuildOptions& options = {});

// Returns the torch.nn class names BuildModuleFromSpec understands.
std::vector<std::string> SupportedModuleTypes();

// Builds a tree of generic modules holding exactly `state`'s tensors (shared,
// not copied): each dotted key "a.b.w" becomes submodules "a" and "a.b" holding
// "w". Keys in `buffer_keys` become persistent buffers, the rest parameters.
// Returns InvalidArgument for a key with an empty component, a key that is both
// a tensor and a module ("a" and "a.b"), or an unknown buffer key.
absl::StatusOr<ModulePtr> BuildModuleFromStateDict(
    const StateDict& state, const std::vector<std::string>& buffer_keys = {});
// TEMPORARY SHIM
struct ModuleTreeOptions { std::vector<std::string> buffer_keys; std::map<std::string, std::string> class_names; };
inline absl::StatusOr<ModulePtr> BuildModuleFromStateDict(const StateDict& state, const ModuleTreeOptions& o) { return BuildModuleFromStateDict(state, o.buffer_keys); }

}  // namespace modelstate

#endif  // MODELSTATE_CORE_MODULE_FACTORY_H_

// Builds a module tree from a flat state dict (any checkpoint): each dotted key
// "a.b.w" becomes submodules "a" and "a.b" holding tensor "w". With no
// architecture spec the modules are generic; options name the buffers and
// the torch classes.
#ifndef MODELSTATE_MODEL_MODULE_TREE_H_
#define MODELSTATE_MODEL_MODULE_TREE_H_

#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "model/module.h"
#include "model/state_dict.h"

namespace modelstate {

struct ModuleTreeOptions {
  // State-dict keys that become persistent buffers; every other key becomes a
  // parameter.
  std::vector<std::string> buffer_keys;
  // Module path ("" for the root, "encoder.0") -> torch class name, e.g.
  // "BatchNorm2d". Modules not named here are "Module". A module's version is
  // torch's `_version` of its class (TorchModuleVersion), so loads apply the
  // class's rules (BatchNorm's num_batches_tracked).
  std::map<std::string, std::string> class_names;
};

// Builds a tree of modules holding exactly `state`'s tensors (shared, not
// copied), in key order. Returns InvalidArgument for:
//   - a key longer than kMaxKeyLength or with more than kMaxKeyComponents
//     components (common/limits.h), or with an empty component;
//   - a key that is both a tensor and a module ("a" and "a.b");
//   - a buffer key that is not in `state`;
//   - a class name that is not 1 to 128 characters of [A-Za-z0-9_.], or a
//     path for it that breaks the key rules or names a tensor.
// A class name for a path no key reaches adds that module, without tensors
// (a ReLU child of an nn.Module), so the tree has torch's submodules.
// Works without recursion, so key depth cannot exhaust the stack.
absl::StatusOr<ModulePtr> BuildModuleFromStateDict(
    const StateDict& state, const ModuleTreeOptions& options = {});

// As above with only buffer keys; for callers that name no classes.
absl::StatusOr<ModulePtr> BuildModuleFromStateDict(
    const StateDict& state, const std::vector<std::string>& buffer_keys);

}  // namespace modelstate

#endif  // MODELSTATE_MODEL_MODULE_TREE_H_

// The torch.nn classes an architecture spec can name: one row per class with
// its torch argument names (in positional order) and the function that builds
// it with torch's tensor names, shapes and default initialisation.
//
// Internal to the module factory: BuildModuleFromSpec (module_factory.h) is
// the public entry point. The table is immutable and safe to read from any
// thread; a build uses one Initializer and one NestedSpecBuilder on one
// thread.
#ifndef MODELSTATE_MODEL_MODULE_LAYERS_H_
#define MODELSTATE_MODEL_MODULE_LAYERS_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "model/dtype.h"
#include "model/initializers.h"
#include "model/module.h"
#include "model/spec_args.h"

namespace modelstate {

// Builds the module specs nested in containers and generic modules. The spec
// driver implements it, so nesting goes through its type lookup and depth
// bound.
class NestedSpecBuilder {
 public:
  // Builds module spec `spec` found at JSON path `path`, whose parent's dtype
  // is `dtype`. Returns InvalidArgument naming the path for a bad spec.
  virtual absl::StatusOr<ModulePtr> BuildNested(const SpecJson& spec,
                                                const std::string& path,
                                                DType dtype) = 0;

 protected:
  ~NestedSpecBuilder() = default;
};

// What a layer's factory gets.
struct LayerContext {
  const std::string& type;  // The row's torch class name.
  const SpecArgs& args;     // Already checked against the row's names.
  DType dtype;              // The module's dtype (its own or inherited).
  Initializer& init;
  NestedSpecBuilder& nested;

  const std::string& path() const { return args.path(); }
};

using LayerFactory =
    absl::StatusOr<std::shared_ptr<Module>> (*)(const LayerContext& layer);

struct LayerRow {
  std::string type;  // torch.nn class name, e.g. "Conv2d".
  LayerFactory build;
  std::vector<std::string> arg_names;  // torch's, in positional order.
};

// Returns every row, sorted by type.
const std::vector<LayerRow>& LayerRows();

// Returns the row of torch class `type`, or null for a class not in the table.
const LayerRow* FindLayerRow(absl::string_view type);

// Checks `spec`'s arguments against `row` (SpecArgs::Check), then builds it
// in `dtype`. Returns InvalidArgument naming `path` for bad arguments; other
// errors (e.g. from tensor allocation) are passed on.
absl::StatusOr<std::shared_ptr<Module>> BuildLayer(
    const LayerRow& row, const SpecJson& spec, const std::string& path,
    DType dtype, Initializer& init, NestedSpecBuilder& nested);

}  // namespace modelstate

#endif  // MODELSTATE_MODEL_MODULE_LAYERS_H_

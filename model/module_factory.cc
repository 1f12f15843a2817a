#include "model/module_factory.h"

#include <memory>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/limits.h"
#include "common/status_macros.h"
#include "model/initializers.h"
#include "model/module_layers.h"
#include "model/spec_args.h"

namespace modelstate {
namespace {

// Walks a spec: finds each module's row in the layer table, resolves its
// dtype, and builds it. Nesting is bounded by kMaxSpecDepth, so a hostile spec
// gets an error rather than overflowing the stack.
class SpecBuilder : public NestedSpecBuilder {
 public:
  explicit SpecBuilder(Initializer& init) : init_(init) {}

  absl::StatusOr<ModulePtr> BuildNested(const SpecJson& spec,
                                        const std::string& path,
                                        DType inherited) override;

 private:
  absl::StatusOr<ModulePtr> BuildModule(const SpecJson& spec,
                                        const std::string& path,
                                        DType inherited);

  Initializer& init_;
  int depth_ = 0;  // Modules under construction, the root included.
};

absl::StatusOr<ModulePtr> SpecBuilder::BuildNested(const SpecJson& spec,
                                                   const std::string& path,
                                                   DType inherited) {
  if (depth_ >= kMaxSpecDepth) {
    return SpecError(path,
                     absl::StrCat("modules nest more than kMaxSpecDepth (",
                                  kMaxSpecDepth, ") levels deep"));
  }
  ++depth_;
  absl::StatusOr<ModulePtr> module = BuildModule(spec, path, inherited);
  --depth_;
  return module;
}

absl::StatusOr<ModulePtr> SpecBuilder::BuildModule(const SpecJson& spec,
                                                   const std::string& path,
                                                   DType inherited) {
  if (!spec.is_object())
    return SpecError(path, "a module spec must be a JSON object");
  auto type_it = spec.find("type");
  if (type_it == spec.end() || !type_it->is_string()) {
    return SpecError(path, "a module spec needs a string \"type\"");
  }
  const std::string type = type_it->get<std::string>();
  const LayerRow* row = FindLayerRow(type);
  if (row == nullptr) {
    return SpecError(
        path, absl::StrCat("unknown module type \"", type, "\"; supported: ",
                           absl::StrJoin(SupportedModuleTypes(), ", ")));
  }
  if (type != "Module" && spec.contains("class_name")) {
    return SpecError(path,
                     "\"class_name\" is only for the generic \"Module\" type");
  }
  ASSIGN_OR_RETURN(DType dtype, SpecDType(spec, path, inherited));
  absl::StatusOr<std::shared_ptr<Module>> module =
      BuildLayer(*row, spec, path, dtype, init_, *this);
  // Spec errors already name their path; others (allocation) get this one.
  if (!module.ok()) {
    if (module.status().code() == absl::StatusCode::kInvalidArgument)
      return module.status();
    return SpecError(path, module.status().message());
  }
  return ModulePtr(*std::move(module));
}

}  // namespace

std::vector<std::string> SupportedModuleTypes() {
  std::vector<std::string> types;
  for (const LayerRow& row : LayerRows()) types.push_back(row.type);
  return types;
}

namespace {

absl::StatusOr<ModulePtr> BuildWith(absl::string_view spec_json,
                                    const BuildOptions& options,
                                    Initializer& init) {
  if (spec_json.size() > kMaxSpecBytes) {
    return SpecError("", absl::StrCat("spec of ", spec_json.size(),
                                      " bytes is longer than kMaxSpecBytes (",
                                      kMaxSpecBytes, ")"));
  }
  SpecJson spec = SpecJson::parse(spec_json.begin(), spec_json.end(), nullptr,
                                  /*allow_exceptions=*/false);
  if (spec.is_discarded()) return SpecError("", "not valid JSON");
  SpecBuilder builder(init);
  ASSIGN_OR_RETURN(ModulePtr root,
                   builder.BuildNested(spec, "", options.default_dtype));
  return root;
}

absl::Status CheckModuleCount(const TreeCost& cost) {
  if (cost.modules > kMaxModules) {
    return SpecError("", absl::StrCat("the model has ", cost.modules,
                                      " modules, more than kMaxModules (",
                                      kMaxModules, ")"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<ModulePtr> BuildModuleFromSpec(absl::string_view spec_json,
                                              const BuildOptions& options) {
  Initializer init(options.seed);
  ASSIGN_OR_RETURN(ModulePtr root, BuildWith(spec_json, options, init));
  RETURN_IF_ERROR(CheckModuleCount(root->Cost()));
  return root;
}

absl::StatusOr<TreeCost> EstimateSpecCost(absl::string_view spec_json,
                                          const BuildOptions& options) {
  Initializer dry_run = Initializer::DryRun();
  ASSIGN_OR_RETURN(ModulePtr root, BuildWith(spec_json, options, dry_run));
  TreeCost cost = root->Cost();
  RETURN_IF_ERROR(CheckModuleCount(cost));
  cost.build_scratch_bytes = dry_run.peak_scratch_bytes();
  return cost;
}

}  // namespace modelstate

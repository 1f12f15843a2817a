#include "store/state_reader.h"

#include <map>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace modelstate {

StateReader::StateReader(const Catalog& catalog, StoreMemory& memory,
                         CastCache& cast_cache)
    : catalog_(catalog), memory_(memory), cast_cache_(cast_cache) {}

absl::StatusOr<std::shared_ptr<const StateDict>> StateReader::SelectState(
    const Snapshot& snapshot, const StateDictOptions& options) const {
  if (options.SelectsWholeModel() && snapshot.memo != nullptr) {
    return snapshot.memo->Get(snapshot.root, [this](const MemoryCharge& charge,
                                                    int64_t bytes) {
      return memory_.ChargeIfFits(charge, /*bytes=*/0, /*metadata_bytes=*/bytes)
          .ok();
    });
  }
  ASSIGN_OR_RETURN(StateDict state, GetStateDict(snapshot.root, options));
  return std::make_shared<const StateDict>(std::move(state));
}

absl::StatusOr<FetchPlan> StateReader::Fetch(const FetchRequest& request) {
  ASSIGN_OR_RETURN(Snapshot snapshot,
                   catalog_.GetSnapshot(request.model, request.version));
  FetchPlan plan;
  plan.model = snapshot.model;
  plan.version = snapshot.version;
  plan.epoch = catalog_.epoch();
  ASSIGN_OR_RETURN(plan.state,
                   SelectState(snapshot, ToStateDictOptions(request)));
  if (request.dtype.has_value()) {
    ASSIGN_OR_RETURN(StateDict cast,
                     CastFloatingForFetch(*plan.state, *request.dtype));
    plan.state = std::make_shared<const StateDict>(std::move(cast));
  }
  const uint64_t total_bytes = plan.state->TotalBytes();
  if (request.offset > total_bytes) {
    return absl::OutOfRangeError(absl::StrCat(
        "offset ", request.offset, " is past the end of version ", plan.version,
        " of model \"", plan.model, "\" (", total_bytes, " bytes)"));
  }
  plan.offset = request.offset;
  return plan;
}

namespace {

// Module path -> class name of `module` (at `path`) and every module under it.
// Iterative, so a deep tree cannot exhaust the stack.
std::map<std::string, std::string> ClassNames(const ModulePtr& module,
                                              const std::string& path) {
  std::map<std::string, std::string> names;
  std::vector<std::pair<std::string, const Module*>> pending = {
      {path, module.get()}};
  while (!pending.empty()) {
    auto [at, node] = std::move(pending.back());
    pending.pop_back();
    for (const ChildSlot& child : node->children()) {
      if (child.module == nullptr) continue;
      pending.emplace_back(at.empty() ? child.name : at + "." + child.name,
                           child.module.get());
    }
    names.emplace(std::move(at), node->type_name());
  }
  return names;
}

}  // namespace

absl::StatusOr<ModelManifest> StateReader::Describe(
    const FetchRequest& request) const {
  ModelManifest manifest;
  ASSIGN_OR_RETURN(Snapshot snapshot, catalog_.GetSnapshotAndVersions(
                                          request.model, request.version,
                                          &manifest.retained_versions));
  manifest.summary.version = manifest.retained_versions.front();
  ASSIGN_OR_RETURN(ModulePtr module,
                   snapshot.root->GetSubmodule(snapshot.root, request.module));
  StateDictOptions options;
  options.module = request.module;
  ASSIGN_OR_RETURN(const std::shared_ptr<const StateDict> selected,
                   SelectState(snapshot, options));
  const StateDict& state = *selected;
  manifest.summary.name = snapshot.model;
  manifest.summary.num_tensors = static_cast<int64_t>(state.size());
  manifest.summary.num_bytes = state.TotalBytes();
  manifest.summary.root_class = module->type_name();
  manifest.version = snapshot.version;
  manifest.tensors = DescribeTensors(state);
  manifest.architecture_json = snapshot.architecture;
  manifest.class_names = ClassNames(module, request.module);
  manifest.epoch = catalog_.epoch();
  return manifest;
}

std::vector<ModelSummary> StateReader::Summaries() const {
  std::vector<ModelSummary> summaries;
  for (const Snapshot& snapshot : catalog_.List())
    summaries.push_back(Summarize(snapshot));
  return summaries;
}

ModelSummary Summarize(const Snapshot& snapshot) {
  ModelSummary summary;
  summary.name = snapshot.model;
  summary.version = snapshot.version;
  summary.root_class = snapshot.root->type_name();
  absl::StatusOr<StateDict> state = GetStateDict(snapshot.root);
  if (state.ok()) {
    summary.num_tensors = static_cast<int64_t>(state->size());
    summary.num_bytes = state->TotalBytes();
  }
  return summary;
}

absl::StatusOr<StateDict> StateReader::CastFloatingForFetch(
    const StateDict& state, DType dtype) {
  if (!IsFloatingPoint(dtype)) {
    return absl::InvalidArgumentError(
        absl::StrCat("can only cast floating tensors to a floating dtype, not ",
                     TorchName(dtype)));
  }
  cast_cache_.Purge();
  StateDict out;
  for (const StateDict::Entry& entry : state.entries()) {
    if (!IsFloatingPoint(entry.tensor.dtype())) {
      out.Set(entry.key, entry.tensor, entry.kind);
      continue;
    }
    // Kept only while it fits the limit; computed either way.
    const bool remember =
        memory_.limit_bytes() <= 0 ||
        memory_.CheckFits(NumBytes(dtype, entry.tensor.shape()).value()).ok();
    ASSIGN_OR_RETURN(Tensor cast,
                     cast_cache_.Get(entry.tensor, dtype, remember));
    if (remember) memory_.AttachStorage(cast);
    out.Set(entry.key, std::move(cast), entry.kind);
  }
  for (const auto& [path, version] : state.metadata()) {
    out.SetModuleVersion(path, version);
  }
  return out;
}

}  // namespace modelstate

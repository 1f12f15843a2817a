#include "store/state_reader.h"

#include <map>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "model/names.h"

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
  if (request.dtype.has_value() || !request.key_dtypes.empty()) {
    ASSIGN_OR_RETURN(StateDict cast, CastForFetch(*plan.state, request));
    plan.state = std::make_shared<const StateDict>(std::move(cast));
  }
  if (request.accept_shared_tensors) {
    plan.shared_with = SharedEntries(*plan.state);
  }
  const uint64_t total_bytes = plan.SentBytes();
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
  FetchRequest request;
  request.dtype = dtype;
  return CastForFetch(state, request);
}

namespace {

absl::Status CheckFloatingCast(DType dtype) {
  if (IsFloatingPoint(dtype)) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat("can only cast floating tensors to a floating dtype, not ",
                   TorchName(dtype)));
}

// InvalidArgument unless every key of `key_dtypes` names a floating tensor of
// `state` and a floating dtype.
absl::Status CheckKeyDtypes(const StateDict& state,
                            const std::map<std::string, DType>& key_dtypes) {
  for (const auto& [key, dtype] : key_dtypes) {
    const Tensor* tensor = state.Find(key);
    if (tensor == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat("key_dtypes names ", QuotedForMessage(key),
                       ", which the request does not select"));
    }
    if (tensor->dtype() == dtype) continue;
    RETURN_IF_ERROR(CheckFloatingCast(dtype));
    if (!IsFloatingPoint(tensor->dtype())) {
      return absl::InvalidArgumentError(absl::StrCat(
          "cannot cast ", QuotedForMessage(key), " of dtype ",
          TorchName(tensor->dtype()), ": only floating tensors are cast"));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<StateDict> StateReader::CastForFetch(
    const StateDict& state, const FetchRequest& request) {
  if (request.dtype.has_value())
    RETURN_IF_ERROR(CheckFloatingCast(*request.dtype));
  RETURN_IF_ERROR(CheckKeyDtypes(state, request.key_dtypes));
  cast_cache_.Purge();
  StateDict out;
  for (const StateDict::Entry& entry : state.entries()) {
    const auto named = request.key_dtypes.find(entry.key);
    const absl::optional<DType> dtype = named != request.key_dtypes.end()
                                            ? absl::make_optional(named->second)
                                            : request.dtype;
    if (!dtype.has_value() || !IsFloatingPoint(entry.tensor.dtype()) ||
        entry.tensor.dtype() == *dtype) {
      out.Set(entry.key, entry.tensor, entry.kind);
      continue;
    }
    ASSIGN_OR_RETURN(Tensor cast, CastTensor(entry.tensor, *dtype));
    out.Set(entry.key, std::move(cast), entry.kind);
  }
  for (const auto& [path, version] : state.metadata()) {
    out.SetModuleVersion(path, version);
  }
  return out;
}

absl::StatusOr<Tensor> StateReader::CastTensor(const Tensor& tensor,
                                               DType dtype) {
  // Kept only while it fits the limit; computed either way.
  const bool remember =
      memory_.limit_bytes() <= 0 ||
      memory_.CheckFits(NumBytes(dtype, tensor.shape()).value()).ok();
  ASSIGN_OR_RETURN(Tensor cast, cast_cache_.Get(tensor, dtype, remember));
  if (remember) memory_.AttachStorage(cast);
  return cast;
}

}  // namespace modelstate

#include "store/load_session.h"

#include <utility>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/limits.h"
#include "common/status_macros.h"
#include "model/module_factory.h"

namespace modelstate {

PendingLoad::~PendingLoad() {
  if (memory_ != nullptr)
    memory_->Release(reserved_bytes_, /*finished_load=*/true);
}

void PendingLoad::ReleaseReservation() {
  memory_->Release(reserved_bytes_, /*finished_load=*/false);
  reserved_bytes_ = 0;
}

LoadSessions::LoadSessions(const Catalog& catalog, CatalogWriter& writer,
                           StoreMemory& memory, int max_pending_loads)
    : catalog_(catalog),
      writer_(writer),
      memory_(memory),
      max_pending_loads_(max_pending_loads) {}

namespace {

LoadOptions ToLoadOptions(const LoadRequest& request) {
  LoadOptions options;
  options.strict = request.strict;
  options.assign = request.assign;
  options.module = request.module;
  return options;
}

ModuleTreeOptions ToTreeOptions(const LoadRequest& request) {
  ModuleTreeOptions options;
  options.buffer_keys = request.buffer_keys;
  options.class_names = request.class_names;
  return options;
}

// The destinations of two plans of the same inputs agree (same dtype and shape
// for each input).
bool SameDestinations(const LoadPlan& a, const LoadPlan& b) {
  if (a.targets.size() != b.targets.size()) return false;
  for (size_t i = 0; i < a.targets.size(); ++i) {
    if (a.targets[i].has_value() != b.targets[i].has_value()) return false;
    if (a.targets[i] && (a.targets[i]->dtype != b.targets[i]->dtype ||
                         a.targets[i]->shape != b.targets[i]->shape)) {
      return false;
    }
  }
  return true;
}

// The bytes of receiving `inputs`, each into a storage of its own, after
// checking their keys and sizes.
absl::StatusOr<int64_t> ReceivingBytes(absl::Span<const TensorSpec> inputs) {
  int64_t needed = 0;
  for (const TensorSpec& spec : inputs) {
    RETURN_IF_ERROR(ValidateTensorKey(spec.key));
    ASSIGN_OR_RETURN(int64_t bytes, NumBytes(spec.dtype, spec.shape));
    needed += bytes + kStorageOverheadBytes;
  }
  return needed;
}

// Checks that a load creating `request.model` from `inputs` can succeed, from
// the keys alone: they must form a module tree before any data arrives.
absl::Status ValidateCreatingLoad(const LoadRequest& request,
                                  absl::Span<const TensorSpec> inputs) {
  if (request.expected_version.has_value() && *request.expected_version != 0) {
    return absl::AbortedError(absl::StrCat(
        "model \"", request.model, "\" does not exist, expected version ",
        *request.expected_version));
  }
  if (!request.module.empty()) {
    return absl::InvalidArgumentError(
        "a load that creates a model can't name a submodule");
  }
  StateDict probe;
  for (const TensorSpec& spec : inputs) {
    RETURN_IF_ERROR(probe.Insert(spec.key, Tensor()));
  }
  return BuildModuleFromStateDict(probe, ToTreeOptions(request)).status();
}

// The module metadata of the tree a load that creates its model builds, from
// the keys alone (before the tree is): a generic module per distinct key
// prefix and the root, with a child slot each, and a slot per key. Returns
// InvalidArgument past kMaxModules modules. Keys must be valid (bounded).
absl::StatusOr<int64_t> CreatingLoadMetadataBytes(
    absl::Span<const TensorSpec> inputs) {
  const int64_t module_bytes =
      kModuleOverheadBytes + static_cast<int64_t>(sizeof("Module") - 1);
  absl::flat_hash_set<absl::string_view> prefixes;
  int64_t bytes = module_bytes;  // The root.
  for (const TensorSpec& spec : inputs) {
    const absl::string_view key = spec.key;
    size_t end = key.rfind('.');
    bytes +=
        kTensorSlotOverheadBytes + 8 * static_cast<int64_t>(spec.shape.size()) +
        static_cast<int64_t>(key.size() -
                             (end == absl::string_view::npos ? 0 : end + 1));
    // Longest prefix first: once one is known, so are all shorter ones.
    while (end != absl::string_view::npos &&
           prefixes.insert(key.substr(0, end)).second) {
      const size_t dot =
          end == 0 ? absl::string_view::npos : key.rfind('.', end - 1);
      const size_t name_start = dot == absl::string_view::npos ? 0 : dot + 1;
      bytes += module_bytes + kChildSlotOverheadBytes +
               static_cast<int64_t>(end - name_start);
      if (static_cast<int64_t>(prefixes.size()) + 1 > kMaxModules)
        return TooManyModules(static_cast<int64_t>(prefixes.size()) + 1);
      end = name_start == 0 ? absl::string_view::npos : name_start - 1;
    }
  }
  return bytes;
}

// The module metadata a load into an existing model adds: a copy of each
// module it changes and of their ancestors (shared subtrees are not copied).
// Tensors tied to a loaded one may copy a few more modules.
int64_t UpdatingLoadMetadataBytes(const Module& root,
                                  absl::string_view submodule,
                                  const LoadPlan& plan) {
  absl::flat_hash_set<const Module*> copied;
  int64_t bytes = 0;
  auto copy = [&](const Module* module) {
    if (copied.insert(module).second) bytes += module->OwnMetadataBytes();
  };
  const Module* load_root = &root;
  copy(load_root);
  if (!submodule.empty()) {
    for (absl::string_view part :
         absl::StrSplit(submodule, '.', absl::SkipEmpty())) {
      const ChildSlot* child = load_root->FindChild(part);
      if (child == nullptr || child->module == nullptr) break;
      load_root = child->module.get();
      copy(load_root);
    }
  }
  for (const absl::optional<LoadTarget>& target : plan.targets) {
    if (!target) continue;
    const Module* owner = load_root;
    for (size_t c : target->child_path) {
      owner = owner->children()[c].module.get();
      copy(owner);
    }
  }
  return bytes;
}

absl::Status CheckExpectedVersion(const LoadRequest& request, int64_t version) {
  if (request.expected_version.has_value() &&
      *request.expected_version != version) {
    return absl::AbortedError(
        absl::StrCat("model \"", request.model, "\" is at version ", version,
                     ", expected ", *request.expected_version));
  }
  return absl::OkStatus();
}

absl::Status CheckArrivedTensors(absl::Span<const TensorSpec> inputs,
                                 absl::Span<const Tensor> tensors) {
  if (tensors.size() != inputs.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("load declared ", inputs.size(), " tensors but ",
                     tensors.size(), " arrived"));
  }
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (tensors[i].dtype() != inputs[i].dtype ||
        tensors[i].shape() != inputs[i].shape) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensor \"", inputs[i].key,
                       "\" does not match its declared dtype and shape"));
    }
  }
  return absl::OkStatus();
}

// Converts each received tensor for its target, dropping it as soon as it is
// converted, so that a load that changes dtypes never holds the received and
// the converted version whole at once (with the current one, a third copy).
absl::StatusOr<std::vector<Tensor>> ConvertForTargets(
    const LoadPlan& plan, std::vector<Tensor> tensors) {
  std::vector<Tensor> converted;
  converted.reserve(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    ASSIGN_OR_RETURN(Tensor tensor,
                     ConvertForTarget(plan.targets[i], tensors[i]));
    converted.push_back(std::move(tensor));
    tensors[i] = Tensor();
  }
  return converted;
}

}  // namespace

absl::StatusOr<std::unique_ptr<PendingLoad>> LoadSessions::Begin(
    const LoadRequest& request, std::vector<TensorSpec> inputs) {
  RETURN_IF_ERROR(ValidateModelName(request.model));
  std::unique_ptr<PendingLoad> load(new PendingLoad());
  load->request_ = request;
  ASSIGN_OR_RETURN(int64_t needed, ReceivingBytes(inputs));
  absl::StatusOr<Snapshot> base = catalog_.GetSnapshot(request.model);
  if (base.ok()) {
    ASSIGN_OR_RETURN(int64_t planned,
                     PlanUpdatingLoad(*load, *std::move(base), inputs));
    needed += planned;
  } else if (request.create_if_missing &&
             base.status().code() == absl::StatusCode::kNotFound) {
    ASSIGN_OR_RETURN(int64_t metadata, PlanCreatingLoad(*load, inputs, needed));
    needed += metadata;
  } else {
    return base.status();
  }
  load->inputs_ = std::move(inputs);
  RETURN_IF_ERROR(memory_.ReserveForLoad(needed, max_pending_loads_));
  load->memory_ = &memory_;
  load->reserved_bytes_ = needed;
  return load;
}

absl::StatusOr<int64_t> LoadSessions::PlanUpdatingLoad(
    PendingLoad& load, Snapshot base,
    absl::Span<const TensorSpec> inputs) const {
  const LoadRequest& request = load.request_;
  RETURN_IF_ERROR(CheckExpectedVersion(request, base.version));
  ASSIGN_OR_RETURN(load.plan_,
                   PlanLoad(base.root, inputs, ToLoadOptions(request)));
  const int64_t needed =
      load.plan_.conversion_bytes +
      UpdatingLoadMetadataBytes(*base.root, request.module, load.plan_);
  load.base_ = std::move(base);
  return needed;
}

absl::StatusOr<int64_t> LoadSessions::PlanCreatingLoad(
    PendingLoad& load, absl::Span<const TensorSpec> inputs,
    int64_t receiving_bytes) const {
  ASSIGN_OR_RETURN(int64_t metadata, CreatingLoadMetadataBytes(inputs));
  // Before the validation builds a probe tree of that size.
  RETURN_IF_ERROR(memory_.CheckFits(receiving_bytes + metadata));
  RETURN_IF_ERROR(ValidateCreatingLoad(load.request_, inputs));
  load.creates_model_ = true;
  load.plan_.targets.assign(inputs.size(), absl::nullopt);
  return metadata;
}

absl::StatusOr<LoadOutcome> LoadSessions::Commit(
    std::unique_ptr<PendingLoad> load, std::vector<Tensor> tensors) {
  RETURN_IF_ERROR(CheckArrivedTensors(load->inputs_, tensors));
  if (load->creates_model_) return CommitCreating(*load, tensors);
  // Conversions and the tree rebuild happen before taking any lock; readers
  // never wait on them.
  ASSIGN_OR_RETURN(std::vector<Tensor> converted,
                   ConvertForTargets(load->plan_, std::move(tensors)));
  ASSIGN_OR_RETURN(int64_t version, CommitConverted(*load, converted));
  load->ReleaseReservation();
  LoadOutcome outcome;
  outcome.version = version;
  outcome.missing_keys = load->plan_.missing_keys;
  outcome.unexpected_keys = load->plan_.unexpected_keys;
  return outcome;
}

absl::StatusOr<LoadOutcome> LoadSessions::CommitCreating(
    PendingLoad& load, absl::Span<const Tensor> tensors) {
  StateDict state;
  for (size_t i = 0; i < tensors.size(); ++i) {
    RETURN_IF_ERROR(state.Insert(load.inputs_[i].key, tensors[i]));
  }
  ASSIGN_OR_RETURN(ModulePtr root, BuildModuleFromStateDict(
                                       state, ToTreeOptions(load.request_)));
  load.ReleaseReservation();
  RETURN_IF_ERROR(writer_.Add(load.request_.model, std::move(root),
                              /*architecture=*/"", /*version=*/0,
                              /*persist=*/true));
  ASSIGN_OR_RETURN(Snapshot created, catalog_.GetSnapshot(load.request_.model));
  LoadOutcome outcome;
  outcome.version = created.version;
  outcome.created = true;
  return outcome;
}

absl::StatusOr<int64_t> LoadSessions::CommitConverted(
    const PendingLoad& load, absl::Span<const Tensor> converted) {
  const std::string& name = load.request_.model;
  const LoadOptions options = ToLoadOptions(load.request_);
  ASSIGN_OR_RETURN(ModulePtr rebuilt,
                   ApplyLoad(load.base_.root, options.module, load.plan_,
                             options, converted));
  absl::StatusOr<std::shared_ptr<absl::Mutex>> commit_mu =
      catalog_.CommitMutex(name);
  if (!commit_mu.ok()) {
    return absl::NotFoundError(
        absl::StrCat("model \"", name, "\" was deleted during the load"));
  }
  absl::MutexLock commit(commit_mu->get());
  ASSIGN_OR_RETURN(Snapshot current, catalog_.GetSnapshot(name));
  if (current.root != load.base_.root) {
    // Another load committed first: apply ours on top of it, as torch would
    // have.
    RETURN_IF_ERROR(CheckExpectedVersion(load.request_, current.version));
    ASSIGN_OR_RETURN(LoadPlan replanned,
                     PlanLoad(current.root, load.inputs_, options));
    if (!SameDestinations(replanned, load.plan_)) {
      return absl::AbortedError(absl::StrCat(
          "model \"", name, "\" changed dtype during the load; retry"));
    }
    ASSIGN_OR_RETURN(rebuilt, ApplyLoad(current.root, options.module, replanned,
                                        options, converted));
  }
  Snapshot next{name, current.version + 1, std::move(rebuilt),
                current.architecture, /*memo=*/nullptr};
  RETURN_IF_ERROR(
      writer_.Publish(*commit_mu, next, ModelEvent::Type::kUpdated));
  return next.version;
}

}  // namespace modelstate

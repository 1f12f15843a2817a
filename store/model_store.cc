#include "store/model_store.h"

#include <utility>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/limits.h"
#include "model/module_factory.h"
#include "common/status_macros.h"

namespace modelstate {

absl::Status ValidateModelName(absl::string_view name) {
  if (name.empty() || name.size() > kMaxModelNameLength) {
    return absl::InvalidArgumentError(absl::StrCat(
        "model name must have 1 to ", kMaxModelNameLength, " characters"));
  }
  if (name[0] == '.')
    return absl::InvalidArgumentError("model name must not start with '.'");
  for (char c : name) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
                    (c >= '0' && c <= '9') || c == '.' || c == '_' || c == '-';
    if (!ok) {
      return absl::InvalidArgumentError(
          absl::StrCat("model name \"", name,
                       "\" may only use letters, digits, '.', '_' and '-'"));
    }
  }
  return absl::OkStatus();
}

PendingLoad::~PendingLoad() {
  if (store_ != nullptr) store_->Release(reserved_bytes_, /*finished=*/true);
}

class ModelStore::PoolBudget : public StoragePoolBudget {
 public:
  explicit PoolBudget(const ModelStore& store) : store_(store) {}
  int64_t HeadroomBytes() const override {
    return store_.options_.memory_limit_bytes -
           store_.accountant_->live_bytes() -
           store_.accountant_->metadata_bytes() - store_.reserved_bytes_.load();
  }

 private:
  const ModelStore& store_;
};

ModelStore::ModelStore(Options options)
    : options_(options), accountant_(std::make_shared<MemoryAccountant>()) {
  if (options_.memory_limit_bytes > 0) {
    pool_budget_ = std::make_unique<PoolBudget>(*this);
    Storage::AddPoolBudget(pool_budget_.get());
  }
}

ModelStore::~ModelStore() {
  if (pool_budget_ != nullptr) Storage::RemovePoolBudget(pool_budget_.get());
}

namespace {

// Charges a tree's modules and storages to `accountant`. A module charged
// before had its whole subtree charged with it, so the walk stops there: a
// load that changed one tensor walks only the modules it copied.
void AttachTreeTo(const Module& module,
                  const std::shared_ptr<MemoryAccountant>& accountant) {
  if (!module.ChargeTo(accountant)) return;
  for (const auto* slots : {&module.parameters(), &module.buffers()}) {
    for (const TensorSlot& slot : *slots) {
      if (slot.tensor) slot.tensor->storage()->AttachAccountant(accountant);
    }
  }
  for (const ChildSlot& child : module.children()) {
    if (child.module) AttachTreeTo(*child.module, accountant);
  }
}

absl::Status TooManyModules(int64_t modules) {
  return absl::InvalidArgumentError(
      absl::StrCat("the model would have ", modules,
                   " modules, more than kMaxModules (", kMaxModules, ")"));
}

absl::Status ModelNotFound(const std::string& name) {
  return absl::NotFoundError(absl::StrCat("model \"", name, "\" not found"));
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

}  // namespace

void ModelStore::AttachTree(const Module& root) {
  AttachTreeTo(root, accountant_);
}

absl::Status ModelStore::CheckMemory(int64_t extra_bytes) const {
  if (options_.memory_limit_bytes <= 0) return absl::OkStatus();
  const int64_t in_use = accountant_->live_bytes() +
                         accountant_->metadata_bytes() + reserved_bytes_;
  if (in_use + extra_bytes > options_.memory_limit_bytes) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "memory limit: ", extra_bytes, " more bytes needed, ", in_use, " of ",
        options_.memory_limit_bytes, " bytes in use"));
  }
  // Pooled memory is spare: it makes room rather than failing the request.
  const int64_t over = in_use + extra_bytes +
                       static_cast<int64_t>(Storage::pooled_bytes()) -
                       options_.memory_limit_bytes;
  if (over > 0) Storage::TrimPool(static_cast<size_t>(over));
  return absl::OkStatus();
}

void ModelStore::Release(int64_t reserved_bytes, bool finished) {
  absl::MutexLock lock(&mu_);
  reserved_bytes_ -= reserved_bytes;
  if (finished) --pending_loads_;
}

void ModelStore::Notify(const ModelEvent& event) {
  for (const auto& [id, listener] : listeners_) listener(event);
}

absl::Status ModelStore::CheckWritable() const {
  if (options_.replica_of.empty()) return absl::OkStatus();
  return absl::FailedPreconditionError(absl::StrCat(
      "this server follows ", options_.replica_of,
      " and serves reads only; send writes to ", options_.replica_of));
}

absl::Status ModelStore::Create(const std::string& name, ModulePtr root,
                                std::string architecture) {
  RETURN_IF_ERROR(CheckWritable());
  return Add(name, std::move(root), std::move(architecture), /*version=*/0,
             /*persist=*/true);
}

absl::Status ModelStore::Restore(const std::string& name, ModulePtr root,
                                 std::string architecture, int64_t version) {
  if (version <= 0)
    return absl::InvalidArgumentError("restored version must be positive");
  return Add(name, std::move(root), std::move(architecture), version,
             /*persist=*/false);
}

absl::Status ModelStore::Add(const std::string& name, ModulePtr root,
                             std::string architecture, int64_t version,
                             bool persist) {
  RETURN_IF_ERROR(ValidateModelName(name));
  const TreeCost cost = root->Cost();
  if (cost.modules > kMaxModules) return TooManyModules(cost.modules);
  const int64_t bytes = cost.total_bytes();
  absl::MutexLock admin(&admin_mu_);
  {
    absl::MutexLock lock(&mu_);
    if (models_.count(name) > 0) {
      return absl::AlreadyExistsError(
          absl::StrCat("model \"", name, "\" already exists"));
    }
    RETURN_IF_ERROR(CheckMemory(bytes));
    if (version == 0) {
      auto retired = retired_versions_.find(name);
      version = retired == retired_versions_.end() ? 1 : retired->second + 1;
    }
  }
  Snapshot snapshot{name, version, std::move(root), std::move(architecture),
                    std::make_shared<StateDictMemo>()};
  if (persist && options_.persister != nullptr) {
    RETURN_IF_ERROR(options_.persister->Persist(snapshot));
  }
  absl::MutexLock events_lock(&events_mu_);
  {
    absl::MutexLock lock(&mu_);
    AttachTree(*snapshot.root);
    Entry& entry = models_[name];
    entry.current = std::move(snapshot);
  }
  Notify(ModelEvent{ModelEvent::Type::kCreated, name, version});
  return absl::OkStatus();
}

absl::Status ModelStore::Delete(const std::string& name, Snapshot* deleted) {
  RETURN_IF_ERROR(CheckWritable());
  return Erase(name, deleted);
}

absl::Status ModelStore::Erase(const std::string& name, Snapshot* erased) {
  absl::MutexLock admin(&admin_mu_);
  ASSIGN_OR_RETURN(std::shared_ptr<absl::Mutex> commit_mu, CommitMutex(name));
  absl::MutexLock commit(commit_mu.get());
  absl::Status removed = options_.persister != nullptr
                             ? options_.persister->Remove(name)
                             : absl::OkStatus();
  absl::MutexLock events_lock(&events_mu_);
  ModelEvent event;
  {
    absl::MutexLock lock(&mu_);
    auto it = models_.find(name);
    if (it == models_.end()) return ModelNotFound(name);
    retired_versions_[name] = it->second.current.version;
    event = ModelEvent{ModelEvent::Type::kDeleted, name,
                       it->second.current.version};
    if (erased != nullptr) *erased = it->second.current;
    models_.erase(it);
  }
  Notify(event);
  // The model is gone from memory either way; a leftover file is reported.
  return removed;
}

absl::StatusOr<std::shared_ptr<absl::Mutex>> ModelStore::CommitMutex(
    const std::string& name) const {
  absl::ReaderMutexLock lock(&mu_);
  auto it = models_.find(name);
  if (it == models_.end()) return ModelNotFound(name);
  return it->second.commit_mu;
}

absl::Status ModelStore::Publish(const std::shared_ptr<absl::Mutex>& commit_mu,
                                 const Snapshot& next,
                                 ModelEvent::Type event_type) {
  if (options_.persister != nullptr)
    RETURN_IF_ERROR(options_.persister->Persist(next));
  absl::MutexLock events_lock(&events_mu_);
  {
    absl::MutexLock lock(&mu_);
    auto it = models_.find(next.model);
    if (it == models_.end() || it->second.commit_mu != commit_mu) {
      return absl::NotFoundError(absl::StrCat(
          "model \"", next.model, "\" was deleted during the update"));
    }
    Entry& entry = it->second;
    AttachTree(*next.root);
    if (options_.retain_versions > 1) {
      entry.history.push_front(std::move(entry.current));
      while (entry.history.size() >
             static_cast<size_t>(options_.retain_versions - 1)) {
        entry.history.pop_back();
      }
    }
    entry.current = next;
    entry.current.memo = std::make_shared<StateDictMemo>();
  }
  Notify(ModelEvent{event_type, next.model, next.version});
  cast_cache_.Purge();
  return absl::OkStatus();
}

absl::StatusOr<Snapshot> ModelStore::FindVersion(const Entry& entry,
                                                 int64_t version) {
  if (version == 0 || version == entry.current.version) return entry.current;
  for (const Snapshot& old : entry.history) {
    if (old.version == version) return old;
  }
  return absl::NotFoundError(absl::StrCat("version ", version, " of model \"",
                                          entry.current.model,
                                          "\" is not retained"));
}

absl::StatusOr<Snapshot> ModelStore::GetSnapshot(const std::string& name,
                                                 int64_t version) const {
  absl::ReaderMutexLock lock(&mu_);
  auto it = models_.find(name);
  if (it == models_.end()) return ModelNotFound(name);
  return FindVersion(it->second, version);
}

absl::StatusOr<std::vector<int64_t>> ModelStore::RetainedVersions(
    const std::string& name) const {
  absl::ReaderMutexLock lock(&mu_);
  auto it = models_.find(name);
  if (it == models_.end()) return ModelNotFound(name);
  std::vector<int64_t> versions = {it->second.current.version};
  for (const Snapshot& old : it->second.history)
    versions.push_back(old.version);
  return versions;
}

absl::StatusOr<Snapshot> ModelStore::Rollback(const std::string& name,
                                              int64_t version) {
  RETURN_IF_ERROR(CheckWritable());
  ASSIGN_OR_RETURN(std::shared_ptr<absl::Mutex> commit_mu, CommitMutex(name));
  absl::MutexLock commit(commit_mu.get());
  ASSIGN_OR_RETURN(Snapshot target, GetSnapshot(name, version));
  ASSIGN_OR_RETURN(Snapshot current, GetSnapshot(name));
  Snapshot next{name, current.version + 1, target.root, current.architecture,
                /*memo=*/nullptr};
  RETURN_IF_ERROR(Publish(commit_mu, next, ModelEvent::Type::kUpdated));
  return next;
}

absl::StatusOr<Snapshot> ModelStore::GetSnapshot(
    const std::string& name) const {
  return GetSnapshot(name, 0);
}

std::vector<Snapshot> ModelStore::List() const {
  absl::ReaderMutexLock lock(&mu_);
  std::vector<Snapshot> out;
  out.reserve(models_.size());
  for (const auto& [name, entry] : models_) out.push_back(entry.current);
  return out;
}

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

}  // namespace

absl::StatusOr<std::unique_ptr<PendingLoad>> ModelStore::BeginLoad(
    const LoadRequest& request, std::vector<TensorSpec> inputs) {
  RETURN_IF_ERROR(CheckWritable());
  RETURN_IF_ERROR(ValidateModelName(request.model));
  std::unique_ptr<PendingLoad> load(new PendingLoad());
  load->request_ = request;
  int64_t needed = 0;
  for (const TensorSpec& spec : inputs) {
    RETURN_IF_ERROR(ValidateTensorKey(spec.key));
    ASSIGN_OR_RETURN(int64_t bytes, NumBytes(spec.dtype, spec.shape));
    // Each input is received into a storage of its own.
    needed += bytes + kStorageOverheadBytes;
  }
  absl::StatusOr<Snapshot> base = GetSnapshot(request.model);
  if (base.ok()) {
    RETURN_IF_ERROR(CheckExpectedVersion(request, base->version));
    ASSIGN_OR_RETURN(load->plan_,
                     PlanLoad(base->root, inputs, ToLoadOptions(request)));
    needed +=
        load->plan_.conversion_bytes +
        UpdatingLoadMetadataBytes(*base->root, request.module, load->plan_);
    load->base_ = *std::move(base);
  } else if (request.create_if_missing &&
             base.status().code() == absl::StatusCode::kNotFound) {
    ASSIGN_OR_RETURN(int64_t metadata, CreatingLoadMetadataBytes(inputs));
    needed += metadata;
    {
      // Before the validation builds a probe tree of that size.
      absl::ReaderMutexLock lock(&mu_);
      RETURN_IF_ERROR(CheckMemory(needed));
    }
    RETURN_IF_ERROR(ValidateCreatingLoad(request, inputs));
    load->creates_model_ = true;
    load->plan_.targets.assign(inputs.size(), absl::nullopt);
  } else {
    return base.status();
  }
  load->inputs_ = std::move(inputs);
  {
    absl::MutexLock lock(&mu_);
    if (options_.max_pending_loads > 0 &&
        pending_loads_ >= options_.max_pending_loads) {
      return absl::ResourceExhaustedError(
          absl::StrCat(pending_loads_,
                       " loads are in flight, the most this server takes; "
                       "retry later"));
    }
    RETURN_IF_ERROR(CheckMemory(needed));
    reserved_bytes_ += needed;
    ++pending_loads_;
  }
  load->store_ = this;
  load->reserved_bytes_ = needed;
  return load;
}

namespace {

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

}  // namespace

absl::StatusOr<LoadOutcome> ModelStore::CommitLoad(
    std::unique_ptr<PendingLoad> load, std::vector<Tensor> tensors) {
  RETURN_IF_ERROR(CheckArrivedTensors(load->inputs_, tensors));
  if (load->creates_model_) return CommitCreatingLoad(*load, tensors);
  // Conversions and the tree rebuild happen before taking the lock; readers
  // never wait on them. Each received tensor is dropped as soon as it is
  // converted, so a load that changes dtypes never holds the received and the
  // converted version whole at once (with the current one, a third copy).
  std::vector<Tensor> converted;
  converted.reserve(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    ASSIGN_OR_RETURN(Tensor tensor,
                     ConvertForTarget(load->plan_.targets[i], tensors[i]));
    converted.push_back(std::move(tensor));
    tensors[i] = Tensor();
  }
  tensors.clear();
  ASSIGN_OR_RETURN(int64_t version, CommitConverted(*load, converted));
  Release(load->reserved_bytes_, /*finished=*/false);
  load->reserved_bytes_ = 0;
  LoadOutcome outcome;
  outcome.version = version;
  outcome.missing_keys = load->plan_.missing_keys;
  outcome.unexpected_keys = load->plan_.unexpected_keys;
  return outcome;
}

absl::StatusOr<LoadOutcome> ModelStore::CommitCreatingLoad(
    PendingLoad& load, absl::Span<const Tensor> tensors) {
  StateDict state;
  for (size_t i = 0; i < tensors.size(); ++i) {
    RETURN_IF_ERROR(state.Insert(load.inputs_[i].key, tensors[i]));
  }
  ASSIGN_OR_RETURN(ModulePtr root, BuildModuleFromStateDict(
                                       state, ToTreeOptions(load.request_)));
  Release(load.reserved_bytes_, /*finished=*/false);
  load.reserved_bytes_ = 0;
  RETURN_IF_ERROR(Create(load.request_.model, std::move(root)));
  ASSIGN_OR_RETURN(Snapshot created, GetSnapshot(load.request_.model));
  LoadOutcome outcome;
  outcome.version = created.version;
  outcome.created = true;
  return outcome;
}

absl::StatusOr<int64_t> ModelStore::CommitConverted(
    const PendingLoad& load, absl::Span<const Tensor> converted) {
  const std::string& name = load.request_.model;
  const LoadOptions options = ToLoadOptions(load.request_);
  ASSIGN_OR_RETURN(ModulePtr rebuilt,
                   ApplyLoad(load.base_.root, options.module, load.plan_,
                             options, converted));
  absl::StatusOr<std::shared_ptr<absl::Mutex>> commit_mu = CommitMutex(name);
  if (!commit_mu.ok()) {
    return absl::NotFoundError(
        absl::StrCat("model \"", name, "\" was deleted during the load"));
  }
  absl::MutexLock commit(commit_mu->get());
  ASSIGN_OR_RETURN(Snapshot current, GetSnapshot(name));
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
  RETURN_IF_ERROR(Publish(*commit_mu, next, ModelEvent::Type::kUpdated));
  return next.version;
}

absl::StatusOr<LoadOutcome> ModelStore::Load(const LoadRequest& request,
                                             const StateDict& state) {
  std::vector<TensorSpec> specs;
  std::vector<Tensor> tensors;
  specs.reserve(state.size());
  tensors.reserve(state.size());
  for (const StateDict::Entry& entry : state.entries()) {
    specs.push_back(
        TensorSpec{entry.key, entry.tensor.dtype(), entry.tensor.shape()});
    tensors.push_back(entry.tensor);
  }
  ASSIGN_OR_RETURN(std::unique_ptr<PendingLoad> load,
                   BeginLoad(request, std::move(specs)));
  return CommitLoad(std::move(load), std::move(tensors));
}

StateDictOptions ToStateDictOptions(const FetchRequest& request) {
  StateDictOptions options;
  options.module = request.module;
  options.keep_module_prefix = request.keep_module_prefix;
  options.recurse = request.recurse;
  options.include_buffers = request.include_buffers;
  options.keys = request.keys;
  return options;
}

absl::StatusOr<Snapshot> ModelStore::CreateFromSpec(
    const std::string& name, const std::string& spec_json, uint64_t seed) {
  RETURN_IF_ERROR(CheckWritable());
  RETURN_IF_ERROR(ValidateModelName(name));
  BuildOptions options;
  options.seed = seed;
  // Measure first, and hold the estimate (with the build's scratch) while
  // building, so that a model that would not fit allocates nothing and
  // concurrent creates cannot both build into the same headroom. Create then
  // counts the built tree itself.
  ASSIGN_OR_RETURN(const TreeCost cost, EstimateSpecCost(spec_json, options));
  const int64_t building = cost.total_bytes() + cost.build_scratch_bytes;
  {
    absl::MutexLock lock(&mu_);
    RETURN_IF_ERROR(CheckMemory(building));
    reserved_bytes_ += building;
  }
  absl::StatusOr<ModulePtr> root = BuildModuleFromSpec(spec_json, options);
  Release(building, /*finished=*/false);
  if (!root.ok()) return root.status();
  RETURN_IF_ERROR(Create(name, *std::move(root), spec_json));
  return GetSnapshot(name);
}

absl::StatusOr<std::shared_ptr<const StateDict>> ModelStore::SelectState(
    const Snapshot& snapshot, const StateDictOptions& options) const {
  if (options.SelectsWholeModel() && snapshot.memo != nullptr) {
    return snapshot.memo->Get(snapshot.root, [this](const MemoryCharge& charge,
                                                    int64_t bytes) {
      return ChargeIfFits(charge, /*bytes=*/0, /*metadata_bytes=*/bytes).ok();
    });
  }
  ASSIGN_OR_RETURN(StateDict state, GetStateDict(snapshot.root, options));
  return std::make_shared<const StateDict>(std::move(state));
}

absl::StatusOr<FetchPlan> ModelStore::Fetch(const FetchRequest& request) {
  ASSIGN_OR_RETURN(Snapshot snapshot,
                   GetSnapshot(request.model, request.version));
  FetchPlan plan;
  plan.model = snapshot.model;
  plan.version = snapshot.version;
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

absl::StatusOr<ModelManifest> ModelStore::Describe(
    const FetchRequest& request) const {
  ModelManifest manifest;
  Snapshot snapshot;
  {
    absl::ReaderMutexLock lock(&mu_);
    auto it = models_.find(request.model);
    if (it == models_.end()) return ModelNotFound(request.model);
    ASSIGN_OR_RETURN(snapshot, FindVersion(it->second, request.version));
    manifest.summary.version = it->second.current.version;
    manifest.retained_versions.push_back(manifest.summary.version);
    for (const Snapshot& old : it->second.history)
      manifest.retained_versions.push_back(old.version);
  }
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
  return manifest;
}

std::vector<ModelSummary> ModelStore::Summaries() const {
  std::vector<ModelSummary> summaries;
  for (const Snapshot& snapshot : List())
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

int64_t ModelStore::AddListener(
    std::function<void(const ModelEvent&)> listener) {
  absl::MutexLock lock(&events_mu_);
  const int64_t id = next_listener_id_++;
  listeners_.emplace(id, std::move(listener));
  return id;
}

int64_t ModelStore::Watch(const std::string& model,
                          std::function<void(const ModelEvent&)> listener) {
  absl::MutexLock lock(&events_mu_);
  // Holding events_mu_ orders this first event before any later commit's.
  absl::StatusOr<Snapshot> current = GetSnapshot(model);
  listener(current.ok()
               ? ModelEvent{ModelEvent::Type::kCurrent, model, current->version}
               : ModelEvent{ModelEvent::Type::kAbsent, model, 0});
  const int64_t id = next_listener_id_++;
  listeners_.emplace(
      id, [model, listener = std::move(listener)](const ModelEvent& event) {
        if (event.model == model) listener(event);
      });
  return id;
}

absl::StatusOr<int64_t> ModelStore::WatchAll(
    std::function<void(const ModelEvent&)> listener) {
  absl::MutexLock lock(&events_mu_);
  if (!options_.replica_of.empty() && !replica_synced_) {
    return absl::UnavailableError(absl::StrCat(
        "this server has not mirrored ", options_.replica_of, " yet; retry"));
  }
  // Holding events_mu_ orders the listing before any later commit's event.
  for (const Snapshot& snapshot : List()) {
    listener(ModelEvent{ModelEvent::Type::kCurrent, snapshot.model,
                        snapshot.version});
  }
  listener(ModelEvent{ModelEvent::Type::kListed, "", 0});
  const int64_t id = next_listener_id_++;
  listeners_.emplace(id, std::move(listener));
  return id;
}

void ModelStore::MarkReplicaSynced() {
  absl::MutexLock lock(&events_mu_);
  replica_synced_ = true;
}

absl::Status ModelStore::ApplyReplicated(Snapshot snapshot) {
  if (options_.replica_of.empty()) {
    return absl::FailedPreconditionError(
        "only a follower's store applies replicated versions");
  }
  RETURN_IF_ERROR(ValidateModelName(snapshot.model));
  if (snapshot.version <= 0)
    return absl::InvalidArgumentError("replicated version must be positive");
  absl::StatusOr<Snapshot> current = GetSnapshot(snapshot.model);
  if (current.ok() && current->version < snapshot.version) {
    ASSIGN_OR_RETURN(std::shared_ptr<absl::Mutex> commit_mu,
                     CommitMutex(snapshot.model));
    absl::MutexLock commit(commit_mu.get());
    return Publish(commit_mu, snapshot, ModelEvent::Type::kUpdated);
  }
  // Version numbers only grow on one upstream, so a version at or below ours
  // means the upstream lost or replaced the model: mirror that.
  if (current.ok()) RETURN_IF_ERROR(Erase(snapshot.model));
  const std::string name = snapshot.model;
  return Add(name, std::move(snapshot.root), std::move(snapshot.architecture),
             snapshot.version, /*persist=*/true);
}

absl::Status ModelStore::CheckMemoryFor(int64_t extra_bytes) const {
  absl::ReaderMutexLock lock(&mu_);
  return CheckMemory(extra_bytes);
}

absl::Status ModelStore::ChargeIfFits(const MemoryCharge& charge, int64_t bytes,
                                      int64_t metadata_bytes) const {
  absl::ReaderMutexLock lock(&mu_);
  RETURN_IF_ERROR(CheckMemory(bytes + metadata_bytes));
  charge.Charge(accountant_, bytes, metadata_bytes);
  return absl::OkStatus();
}

absl::Status ModelStore::RemoveReplicated(const std::string& name) {
  if (options_.replica_of.empty()) {
    return absl::FailedPreconditionError(
        "only a follower's store removes replicated models");
  }
  return Erase(name);
}

void ModelStore::RemoveListener(int64_t id) {
  absl::MutexLock lock(&events_mu_);
  listeners_.erase(id);
}

absl::StatusOr<StateDict> ModelStore::CastFloatingForFetch(
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
    bool remember = true;
    if (options_.memory_limit_bytes > 0) {
      absl::ReaderMutexLock lock(&mu_);
      remember =
          CheckMemory(NumBytes(dtype, entry.tensor.shape()).value()).ok();
    }
    ASSIGN_OR_RETURN(Tensor cast,
                     cast_cache_.Get(entry.tensor, dtype, remember));
    if (remember) cast.storage()->AttachAccountant(accountant_);
    out.Set(entry.key, std::move(cast), entry.kind);
  }
  for (const auto& [path, version] : state.metadata()) {
    out.SetModuleVersion(path, version);
  }
  return out;
}

absl::Status ModelStore::CheckLoadSize(int64_t num_tensors) const {
  const int64_t limit = options_.memory_limit_bytes;
  if (limit <= 0) return absl::OkStatus();
  // Past limit / overhead the product would only say "over the limit".
  const int64_t bytes = num_tensors > limit / kStorageOverheadBytes
                            ? limit + 1
                            : num_tensors * kStorageOverheadBytes;
  absl::ReaderMutexLock lock(&mu_);
  return CheckMemory(bytes);
}

int64_t ModelStore::live_bytes() const { return accountant_->live_bytes(); }

int64_t ModelStore::metadata_bytes() const {
  return accountant_->metadata_bytes();
}

int ModelStore::pending_loads() const {
  absl::ReaderMutexLock lock(&mu_);
  return pending_loads_;
}

int64_t ModelStore::reserved_bytes() const { return reserved_bytes_.load(); }

int64_t ModelStore::pooled_bytes() const {
  return static_cast<int64_t>(Storage::pooled_bytes());
}

}  // namespace modelstate

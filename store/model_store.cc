#include "store/model_store.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "model/module_factory.h"

namespace modelstate {

ModelStore::ModelStore(Options options)
    : options_(std::move(options)),
      memory_(options_.memory_limit_bytes),
      catalog_(options_.retain_versions),
      events_(catalog_, options_.replica_of),
      writer_(catalog_, events_, memory_, cast_cache_, options_.persister),
      loads_(catalog_, writer_, memory_, options_.max_pending_loads),
      reader_(catalog_, memory_, cast_cache_) {}

// The models go with the catalog after this, as blocks the pool keeps or not
// without this store's budget.
ModelStore::~ModelStore() { memory_.StopBudgetingPool(); }

absl::Status ModelStore::CheckWritable() const {
  if (options_.replica_of.empty()) return absl::OkStatus();
  return absl::FailedPreconditionError(absl::StrCat(
      "this server follows ", options_.replica_of,
      " and serves reads only; send writes to ", options_.replica_of));
}

absl::Status ModelStore::CheckFollower(absl::string_view what) const {
  if (!options_.replica_of.empty()) return absl::OkStatus();
  return absl::FailedPreconditionError(
      absl::StrCat("only a follower's store ", what));
}

absl::Status ModelStore::Create(const std::string& name, ModulePtr root,
                                std::string architecture) {
  RETURN_IF_ERROR(CheckWritable());
  return writer_.Add(name, std::move(root), std::move(architecture),
                     /*version=*/0, /*persist=*/true);
}

absl::Status ModelStore::Restore(const std::string& name, ModulePtr root,
                                 std::string architecture, int64_t version) {
  if (version <= 0)
    return absl::InvalidArgumentError("restored version must be positive");
  return writer_.Add(name, std::move(root), std::move(architecture), version,
                     /*persist=*/false);
}

absl::Status ModelStore::Delete(const std::string& name, Snapshot* deleted) {
  RETURN_IF_ERROR(CheckWritable());
  return writer_.Erase(name, deleted);
}

absl::StatusOr<Snapshot> ModelStore::GetSnapshot(
    const std::string& name) const {
  return catalog_.GetSnapshot(name);
}

absl::StatusOr<Snapshot> ModelStore::GetSnapshot(const std::string& name,
                                                 int64_t version) const {
  return catalog_.GetSnapshot(name, version);
}

absl::StatusOr<std::vector<int64_t>> ModelStore::RetainedVersions(
    const std::string& name) const {
  return catalog_.RetainedVersions(name);
}

absl::StatusOr<Snapshot> ModelStore::Rollback(const std::string& name,
                                              int64_t version) {
  RETURN_IF_ERROR(CheckWritable());
  return writer_.Rollback(name, version);
}

std::vector<Snapshot> ModelStore::List() const { return catalog_.List(); }

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
  RETURN_IF_ERROR(memory_.Reserve(building));
  absl::StatusOr<ModulePtr> root = BuildModuleFromSpec(spec_json, options);
  memory_.Release(building, /*finished_load=*/false);
  if (!root.ok()) return root.status();
  RETURN_IF_ERROR(Create(name, *std::move(root), spec_json));
  return GetSnapshot(name);
}

absl::StatusOr<FetchPlan> ModelStore::Fetch(const FetchRequest& request) {
  return reader_.Fetch(request);
}

absl::StatusOr<ModelManifest> ModelStore::Describe(
    const FetchRequest& request) const {
  return reader_.Describe(request);
}

std::vector<ModelSummary> ModelStore::Summaries() const {
  return reader_.Summaries();
}

absl::StatusOr<StateDict> ModelStore::CastFloatingForFetch(
    const StateDict& state, DType dtype) {
  return reader_.CastFloatingForFetch(state, dtype);
}

absl::StatusOr<std::unique_ptr<PendingLoad>> ModelStore::BeginLoad(
    const LoadRequest& request, std::vector<TensorSpec> inputs) {
  RETURN_IF_ERROR(CheckWritable());
  return loads_.Begin(request, std::move(inputs));
}

absl::StatusOr<LoadOutcome> ModelStore::CommitLoad(
    std::unique_ptr<PendingLoad> load, std::vector<Tensor> tensors) {
  return loads_.Commit(std::move(load), std::move(tensors));
}

absl::Status ModelStore::CheckLoadSize(int64_t num_tensors) const {
  return memory_.CheckLoadSize(num_tensors);
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

int64_t ModelStore::AddListener(
    std::function<void(const ModelEvent&)> listener) {
  return events_.AddListener(std::move(listener));
}

int64_t ModelStore::Watch(const std::string& model,
                          std::function<void(const ModelEvent&)> listener) {
  return events_.Watch(model, std::move(listener));
}

absl::StatusOr<int64_t> ModelStore::WatchAll(
    std::function<void(const ModelEvent&)> listener) {
  return events_.WatchAll(std::move(listener));
}

void ModelStore::MarkReplicaSynced() { events_.MarkReplicaSynced(true); }

void ModelStore::RemoveListener(int64_t id) { events_.RemoveListener(id); }

absl::Status ModelStore::ApplyReplicated(Snapshot snapshot, ReplicaWrite how) {
  RETURN_IF_ERROR(CheckFollower("applies replicated versions"));
  return writer_.ApplyReplicated(std::move(snapshot), how);
}

absl::Status ModelStore::RemoveReplicated(const std::string& name,
                                          int64_t deleted_at,
                                          ReplicaWrite how) {
  RETURN_IF_ERROR(CheckFollower("removes replicated models"));
  return writer_.RemoveReplicated(name, deleted_at, how);
}

Lineage ModelStore::lineage() const { return catalog_.lineage(); }

uint64_t ModelStore::epoch() const { return catalog_.epoch(); }

int64_t ModelStore::DeletedVersion(const std::string& name) const {
  return catalog_.DeletedVersion(name);
}

void ModelStore::RestoreLineage(Lineage lineage) {
  catalog_.SetLineage(std::move(lineage));
}

absl::Status ModelStore::RecordEpoch(uint64_t epoch) {
  return writer_.ChangeLineage([epoch](Lineage& lineage) {
    lineage.epoch = epoch;
    lineage.adopting = false;
  });
}

absl::Status ModelStore::BeginAdoption(uint64_t epoch) {
  RETURN_IF_ERROR(CheckFollower("adopts epochs"));
  events_.MarkReplicaSynced(false);
  return writer_.ChangeLineage([epoch](Lineage& lineage) {
    lineage.epoch = epoch;
    lineage.adopting = true;
    lineage.deleted.clear();
  });
}

absl::Status ModelStore::EndAdoption() {
  RETURN_IF_ERROR(CheckFollower("adopts epochs"));
  return writer_.ChangeLineage(
      [](Lineage& lineage) { lineage.adopting = false; });
}

absl::Status ModelStore::CheckMemoryFor(int64_t extra_bytes) const {
  return memory_.CheckFits(extra_bytes);
}

absl::Status ModelStore::ChargeIfFits(const MemoryCharge& charge, int64_t bytes,
                                      int64_t metadata_bytes) const {
  return memory_.ChargeIfFits(charge, bytes, metadata_bytes);
}

int64_t ModelStore::live_bytes() const { return memory_.live_bytes(); }

int64_t ModelStore::metadata_bytes() const { return memory_.metadata_bytes(); }

int64_t ModelStore::reserved_bytes() const { return memory_.reserved_bytes(); }

int64_t ModelStore::pooled_bytes() const {
  return static_cast<int64_t>(Storage::pooled_bytes());
}

int ModelStore::pending_loads() const { return memory_.pending_loads(); }

}  // namespace modelstate

#include "store/catalog_writer.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "common/limits.h"
#include "common/status_macros.h"

namespace modelstate {

CatalogWriter::CatalogWriter(Catalog& catalog, StoreEvents& events,
                             StoreMemory& memory, CastCache& cast_cache,
                             StatePersister* persister)
    : catalog_(catalog),
      events_(events),
      memory_(memory),
      cast_cache_(cast_cache),
      persister_(persister) {}

absl::Status CatalogWriter::Add(const std::string& name, ModulePtr root,
                                std::string architecture, int64_t version,
                                bool persist) {
  RETURN_IF_ERROR(ValidateModelName(name));
  const TreeCost cost = root->Cost();
  if (cost.modules > kMaxModules) return TooManyModules(cost.modules);
  absl::MutexLock admin(&admin_mu_);
  ASSIGN_OR_RETURN(version, catalog_.VersionForNew(name, version));
  RETURN_IF_ERROR(memory_.CheckFits(cost.total_bytes()));
  Snapshot snapshot{name, version, std::move(root), std::move(architecture),
                    std::make_shared<StateDictMemo>()};
  if (persist && persister_ != nullptr) {
    RETURN_IF_ERROR(persister_->Persist(snapshot));
  }
  return events_.Commit([&]() -> absl::StatusOr<ModelEvent> {
    memory_.AttachTree(*snapshot.root);
    catalog_.Insert(std::move(snapshot));
    return ModelEvent{ModelEvent::Type::kCreated, name, version};
  });
}

absl::Status CatalogWriter::Erase(const std::string& name, Snapshot* erased) {
  absl::MutexLock admin(&admin_mu_);
  ASSIGN_OR_RETURN(std::shared_ptr<absl::Mutex> commit_mu,
                   catalog_.CommitMutex(name));
  absl::MutexLock commit(commit_mu.get());
  absl::Status removed =
      persister_ != nullptr ? persister_->Remove(name) : absl::OkStatus();
  RETURN_IF_ERROR(events_.Commit([&]() -> absl::StatusOr<ModelEvent> {
    ASSIGN_OR_RETURN(Snapshot current, catalog_.Remove(name));
    ModelEvent event{ModelEvent::Type::kDeleted, name, current.version};
    if (erased != nullptr) *erased = std::move(current);
    return event;
  }));
  // The model is gone from memory either way; a leftover file is reported.
  return removed;
}

absl::Status CatalogWriter::Publish(
    const std::shared_ptr<absl::Mutex>& commit_mu, const Snapshot& next,
    ModelEvent::Type event_type) {
  if (persister_ != nullptr) RETURN_IF_ERROR(persister_->Persist(next));
  RETURN_IF_ERROR(events_.Commit([&]() -> absl::StatusOr<ModelEvent> {
    // Counted before it becomes visible, so no memory check misses it.
    memory_.AttachTree(*next.root);
    RETURN_IF_ERROR(catalog_.Advance(commit_mu, next));
    return ModelEvent{event_type, next.model, next.version};
  }));
  cast_cache_.Purge();
  return absl::OkStatus();
}

absl::StatusOr<Snapshot> CatalogWriter::Rollback(const std::string& name,
                                                 int64_t version) {
  ASSIGN_OR_RETURN(std::shared_ptr<absl::Mutex> commit_mu,
                   catalog_.CommitMutex(name));
  absl::MutexLock commit(commit_mu.get());
  ASSIGN_OR_RETURN(Snapshot target, catalog_.GetSnapshot(name, version));
  ASSIGN_OR_RETURN(Snapshot current, catalog_.GetSnapshot(name));
  Snapshot next{name, current.version + 1, target.root, current.architecture,
                /*memo=*/nullptr};
  RETURN_IF_ERROR(Publish(commit_mu, next, ModelEvent::Type::kUpdated));
  return next;
}

absl::Status CatalogWriter::ApplyReplicated(Snapshot snapshot) {
  RETURN_IF_ERROR(ValidateModelName(snapshot.model));
  if (snapshot.version <= 0)
    return absl::InvalidArgumentError("replicated version must be positive");
  absl::StatusOr<Snapshot> current = catalog_.GetSnapshot(snapshot.model);
  if (current.ok() && current->version < snapshot.version) {
    ASSIGN_OR_RETURN(std::shared_ptr<absl::Mutex> commit_mu,
                     catalog_.CommitMutex(snapshot.model));
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

}  // namespace modelstate

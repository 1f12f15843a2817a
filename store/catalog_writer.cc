#include "store/catalog_writer.h"

#include <algorithm>
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

absl::Status CatalogWriter::Erase(const std::string& name, Snapshot* erased,
                                  int64_t deleted_at, bool remember) {
  absl::MutexLock admin(&admin_mu_);
  ASSIGN_OR_RETURN(std::shared_ptr<absl::Mutex> commit_mu,
                   catalog_.CommitMutex(name));
  absl::MutexLock commit(commit_mu.get());
  absl::Status removed =
      persister_ != nullptr ? persister_->Remove(name) : absl::OkStatus();
  RETURN_IF_ERROR(events_.Commit([&]() -> absl::StatusOr<ModelEvent> {
    ASSIGN_OR_RETURN(Snapshot current,
                     catalog_.Remove(name, deleted_at, remember));
    ModelEvent event{
        ModelEvent::Type::kDeleted, name,
        remember ? std::max(current.version, deleted_at) : current.version};
    if (erased != nullptr) *erased = std::move(current);
    return event;
  }));
  if (remember && removed.ok()) removed = PersistLineage();
  // The model is gone from memory either way; a leftover file is reported.
  return removed;
}

absl::Status CatalogWriter::PersistLineage() {
  if (persister_ == nullptr) return absl::OkStatus();
  return persister_->PersistLineage(catalog_.lineage());
}

absl::Status CatalogWriter::ChangeLineage(
    absl::FunctionRef<void(Lineage&)> change) {
  absl::MutexLock admin(&admin_mu_);
  Lineage lineage = catalog_.lineage();
  change(lineage);
  if (persister_ != nullptr)
    RETURN_IF_ERROR(persister_->PersistLineage(lineage));
  // Under the events lock, so that every event after it carries the new
  // epoch and none before it does.
  return events_.CommitSilently([&] {
    catalog_.SetLineage(lineage);
    return absl::OkStatus();
  });
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

namespace {

// Aborted: the upstream that sent version `version` of `model` lags behind
// what this store holds (`held`, or its deletion at `deleted`).
absl::Status UpstreamBehind(const std::string& model, int64_t version,
                            int64_t held, int64_t deleted) {
  return absl::AbortedError(absl::StrCat(
      "version ", version, " of model \"", model, "\" is not newer than ",
      held > 0 ? absl::StrCat("version ", held, ", held here")
               : absl::StrCat("its deletion at version ", deleted),
      ": the upstream lags"));
}

}  // namespace

absl::Status CatalogWriter::ApplyReplicated(Snapshot snapshot,
                                            ReplicaWrite how) {
  RETURN_IF_ERROR(ValidateModelName(snapshot.model));
  if (snapshot.version <= 0)
    return absl::InvalidArgumentError("replicated version must be positive");
  absl::StatusOr<Snapshot> current = catalog_.GetSnapshot(snapshot.model);
  if (how == ReplicaWrite::kReplace) {
    if (current.ok()) {
      RETURN_IF_ERROR(Erase(snapshot.model, nullptr, 0, /*remember=*/false));
    }
  } else if (current.ok()) {
    ASSIGN_OR_RETURN(std::shared_ptr<absl::Mutex> commit_mu,
                     catalog_.CommitMutex(snapshot.model));
    absl::MutexLock commit(commit_mu.get());
    // Checked again under the commit mutex: only this writer moves it.
    ASSIGN_OR_RETURN(Snapshot held, catalog_.GetSnapshot(snapshot.model));
    if (snapshot.version <= held.version)
      return UpstreamBehind(snapshot.model, snapshot.version, held.version, 0);
    return Publish(commit_mu, snapshot, ModelEvent::Type::kUpdated);
  } else if (const int64_t deleted = catalog_.DeletedVersion(snapshot.model);
             deleted >= snapshot.version) {
    return UpstreamBehind(snapshot.model, snapshot.version, 0, deleted);
  }
  const std::string name = snapshot.model;
  return Add(name, std::move(snapshot.root), std::move(snapshot.architecture),
             snapshot.version, /*persist=*/true);
}

absl::Status CatalogWriter::RemoveReplicated(const std::string& name,
                                             int64_t deleted_at,
                                             ReplicaWrite how) {
  RETURN_IF_ERROR(ValidateModelName(name));
  absl::StatusOr<Snapshot> current = catalog_.GetSnapshot(name);
  if (how == ReplicaWrite::kReplace) {
    if (!current.ok()) return absl::OkStatus();
    return Erase(name, nullptr, deleted_at, /*remember=*/deleted_at > 0);
  }
  if (deleted_at <= 0)
    return absl::InvalidArgumentError("a deletion needs its version");
  if (current.ok()) {
    if (current->version > deleted_at) {
      return absl::AbortedError(
          absl::StrCat("model \"", name, "\" was deleted at version ",
                       deleted_at, ", before version ", current->version,
                       " held here: the upstream lags"));
    }
    absl::Status erased = Erase(name, nullptr, deleted_at);
    // Gone meanwhile: remember the deletion all the same.
    if (erased.code() != absl::StatusCode::kNotFound) return erased;
  }
  return RememberDeletion(name, deleted_at);
}

absl::Status CatalogWriter::RememberDeletion(const std::string& name,
                                             int64_t deleted_at) {
  absl::MutexLock admin(&admin_mu_);
  bool changed = false;
  RETURN_IF_ERROR(
      events_.CommitIfAny([&]() -> absl::StatusOr<absl::optional<ModelEvent>> {
        changed = catalog_.RecordDeletion(name, deleted_at);
        if (!changed) return absl::nullopt;
        // Followers of this store learn of the deletion too.
        return ModelEvent{ModelEvent::Type::kDeleted, name, deleted_at};
      }));
  return changed ? PersistLineage() : absl::OkStatus();
}

}  // namespace modelstate

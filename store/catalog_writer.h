// The one way the catalog changes: a new version is validated, made durable
// (StatePersister), swapped in and announced (StoreEvents), in that order, so
// that on any error nothing changed and listeners hear of commits in order.
//
// Thread-safety: every method may be called from any thread. Locks, in the
// order taken: the admin lock (creates and deletes), a model's commit mutex,
// the events lock, the catalog's lock.
#ifndef MODELSTATE_STORE_CATALOG_WRITER_H_
#define MODELSTATE_STORE_CATALOG_WRITER_H_

#include <cstdint>
#include <memory>
#include <string>

#include "absl/functional/function_ref.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "model/cast_cache.h"
#include "model/module.h"
#include "store/catalog.h"
#include "store/events.h"
#include "store/requests.h"
#include "store/snapshot.h"
#include "store/state_persister.h"
#include "store/store_memory.h"

namespace modelstate {

// How a follower's store takes a version or a deletion from its upstream.
enum class ReplicaWrite {
  // Within one epoch: only forward. A version at or below the one held, or
  // one of a model deleted at that version or later, is refused, as is a
  // deletion of a version older than the one held (the upstream lags).
  kForward,
  // While taking on a new epoch (store/lineage.h): the upstream's state
  // replaces whatever is held, retained versions included.
  kReplace,
};

class CatalogWriter {
 public:
  // Every argument but `persister` (which may be null) must outlive this.
  // `cast_cache` loses the conversions of tensors a commit made unreachable.
  CatalogWriter(Catalog& catalog, StoreEvents& events, StoreMemory& memory,
                CastCache& cast_cache, StatePersister* persister);
  CatalogWriter(const CatalogWriter&) = delete;
  CatalogWriter& operator=(const CatalogWriter&) = delete;

  // Adds model `name` at `version` (0: the next for its name, see
  // Catalog::VersionForNew), persisting it first when `persist`. Errors as
  // ModelStore::Create.
  absl::Status Add(const std::string& name, ModulePtr root,
                   std::string architecture, int64_t version, bool persist);
  // Removes `name` and its persisted versions, as ModelStore::Delete without
  // the follower-mode check. With `remember`, the lineage remembers the
  // deletion at the later of the model's version and `deleted_at`, and is
  // persisted.
  absl::Status Erase(const std::string& name, Snapshot* erased = nullptr,
                     int64_t deleted_at = 0, bool remember = true);
  // With the model's `commit_mu` held: persists `next` and publishes it as the
  // current version of the same model (`commit_mu` identifies it), announcing
  // it as `event_type`. NotFound if the model was deleted meanwhile; the
  // persister's error.
  absl::Status Publish(const std::shared_ptr<absl::Mutex>& commit_mu,
                       const Snapshot& next, ModelEvent::Type event_type);
  // As ModelStore::Rollback, without the follower-mode check.
  absl::StatusOr<Snapshot> Rollback(const std::string& name, int64_t version);
  // As ModelStore::ApplyReplicated, RemoveReplicated and ChangeLineage,
  // past their follower-mode checks.
  absl::Status ApplyReplicated(Snapshot snapshot, ReplicaWrite how);
  absl::Status RemoveReplicated(const std::string& name, int64_t deleted_at,
                                ReplicaWrite how);
  absl::Status ChangeLineage(absl::FunctionRef<void(Lineage&)> change);

 private:
  Catalog& catalog_;
  StoreEvents& events_;
  StoreMemory& memory_;
  CastCache& cast_cache_;
  StatePersister* const persister_;

  // Remembers that `name`, not held, was deleted at `deleted_at` (unless a
  // later deletion is known), announcing it and persisting the lineage.
  absl::Status RememberDeletion(const std::string& name, int64_t deleted_at);
  // Persists the catalog's lineage, when there is a persister.
  absl::Status PersistLineage() ABSL_EXCLUSIVE_LOCKS_REQUIRED(admin_mu_);

  // Serialises creates, deletes and lineage changes (which persist and
  // remove files). Taken first.
  absl::Mutex admin_mu_;
};

}  // namespace modelstate

#endif  // MODELSTATE_STORE_CATALOG_WRITER_H_

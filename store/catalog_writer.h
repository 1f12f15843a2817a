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
  // the follower-mode check.
  absl::Status Erase(const std::string& name, Snapshot* erased = nullptr);
  // With the model's `commit_mu` held: persists `next` and publishes it as the
  // current version of the same model (`commit_mu` identifies it), announcing
  // it as `event_type`. NotFound if the model was deleted meanwhile; the
  // persister's error.
  absl::Status Publish(const std::shared_ptr<absl::Mutex>& commit_mu,
                       const Snapshot& next, ModelEvent::Type event_type);
  // As ModelStore::Rollback, without the follower-mode check.
  absl::StatusOr<Snapshot> Rollback(const std::string& name, int64_t version);
  // As ModelStore::ApplyReplicated, past its follower-mode check.
  absl::Status ApplyReplicated(Snapshot snapshot);

 private:
  Catalog& catalog_;
  StoreEvents& events_;
  StoreMemory& memory_;
  CastCache& cast_cache_;
  StatePersister* const persister_;

  // Serialises creates and deletes (which persist and remove files). Taken
  // first.
  absl::Mutex admin_mu_;
};

}  // namespace modelstate

#endif  // MODELSTATE_STORE_CATALOG_WRITER_H_

// The store's persistence hook: where committed versions go to become durable.
//
// Thread-safety: the store calls a persister from several threads at once, for
// different models; calls for one model are serialised by its commit lock.
#ifndef MODELSTATE_STORE_STATE_PERSISTER_H_
#define MODELSTATE_STORE_STATE_PERSISTER_H_

#include <string>

#include "absl/status/status.h"
#include "store/lineage.h"
#include "store/snapshot.h"

namespace modelstate {

// Where committed versions go to become durable (see store/data_dir.h). The
// store calls it with the model's commit lock held, before the version becomes
// visible.
class StatePersister {
 public:
  virtual ~StatePersister() = default;
  // Makes `snapshot` durable (or schedules it, for asynchronous persisters). A
  // non-OK status fails the create, load or rollback, which then changes
  // nothing.
  virtual absl::Status Persist(const Snapshot& snapshot) = 0;
  // Removes every persisted version of `model`.
  virtual absl::Status Remove(const std::string& model) = 0;
  // Makes `lineage` (the epoch and the deleted names) durable, replacing the
  // one kept before. The store calls it after a delete and when its epoch
  // changes, one call at a time.
  virtual absl::Status PersistLineage(const Lineage& lineage) = 0;
};

}  // namespace modelstate

#endif  // MODELSTATE_STORE_STATE_PERSISTER_H_

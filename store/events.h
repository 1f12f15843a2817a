// The store's events: who listens to changes of its models, and the order in
// which they hear of them.
//
// Thread-safety: every method may be called from any thread. Writers commit
// through Commit, which holds the events lock across the change and the
// notification, so listeners see events in commit order; a watch's first
// events are sent under the same lock, so none is missed or seen twice. The
// events lock is taken after a model's commit mutex and before the catalog's
// lock.
#ifndef MODELSTATE_STORE_EVENTS_H_
#define MODELSTATE_STORE_EVENTS_H_

#include <cstdint>
#include <functional>
#include <map>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/functional/function_ref.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/optional.h"
#include "store/catalog.h"
#include "store/requests.h"

namespace modelstate {

class StoreEvents {
 public:
  using Listener = std::function<void(const ModelEvent&)>;

  // Watches read `catalog`, which must outlive this. `replica_of` as
  // ModelStore::Options::replica_of.
  StoreEvents(const Catalog& catalog, std::string replica_of);
  StoreEvents(const StoreEvents&) = delete;
  StoreEvents& operator=(const StoreEvents&) = delete;

  // Runs `change` with the events lock held and, when it succeeds, calls every
  // listener with the event it returns before releasing the lock. Returns
  // `change`'s error, telling no one.
  absl::Status Commit(absl::FunctionRef<absl::StatusOr<ModelEvent>()> change);
  // As Commit, for a change that announces an event only when it returns one.
  absl::Status CommitIfAny(
      absl::FunctionRef<absl::StatusOr<absl::optional<ModelEvent>>()> change);
  // As Commit, for a change that announces nothing (the lineage's: every
  // event after it carries the new epoch).
  absl::Status CommitSilently(absl::FunctionRef<absl::Status()> change);

  // See ModelStore::AddListener, Watch, WatchAll, MarkReplicaSynced and
  // RemoveListener.
  int64_t AddListener(Listener listener);
  int64_t Watch(const std::string& model, Listener listener);
  absl::StatusOr<int64_t> WatchAll(Listener listener);
  void MarkReplicaSynced(bool synced);
  void RemoveListener(int64_t id);

 private:
  int64_t Register(Listener listener) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // `event` stamped with the catalog's epoch.
  ModelEvent Stamped(ModelEvent event) const;

  const Catalog& catalog_;
  const std::string replica_of_;

  // Serialises writers' swap-and-notify so listeners see events in commit
  // order. Taken after any commit mutex and before the catalog's lock.
  absl::Mutex mu_;
  std::map<int64_t, Listener> listeners_ ABSL_GUARDED_BY(mu_);
  int64_t next_listener_id_ ABSL_GUARDED_BY(mu_) = 1;
  bool replica_synced_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace modelstate

#endif  // MODELSTATE_STORE_EVENTS_H_

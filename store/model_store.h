// The set of named model instances the daemon serves, with atomic loads and
// point-in-time snapshots: a facade over the classes that each keep one
// concern of it (the catalog of versions, load sessions, the memory
// accountant, events, persistence and reads; see below).
//
// Thread-safety: every method may be called from any thread. Readers
// (GetSnapshot, List) hold the catalog's lock only to copy a pointer, and
// writers hold it only to validate and swap pointers, so no reader ever waits
// for a writer's data transfer or dtype conversion. Locks are taken in one
// order: creates' and deletes' admin lock, a model's commit mutex, the events
// lock, the catalog's lock; the memory accountant's lock is a leaf.
#ifndef MODELSTATE_STORE_MODEL_STORE_H_
#define MODELSTATE_STORE_MODEL_STORE_H_

#include <atomic>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/optional.h"
#include "model/cast_cache.h"
#include "model/module.h"
#include "model/state_dict.h"
#include "store/catalog.h"
#include "store/catalog_writer.h"
#include "store/events.h"
#include "store/lineage.h"
#include "store/load_session.h"
#include "store/requests.h"
#include "store/snapshot.h"
#include "store/state_dict_memo.h"
#include "store/state_persister.h"
#include "store/state_reader.h"
#include "store/store_memory.h"

namespace modelstate {

// Snapshot, PendingLoad, StatePersister, ValidateModelName and Summarize live
// with their concerns (the headers above) and reach callers through this one.
class ModelStore {
 public:
  struct Options {
    // Live tensor bytes (models, retained versions, snapshots still held,
    // staged loads) plus the estimated metadata of their modules and storages
    // (model/module.h) may not exceed this. 0 means unlimited.
    int64_t memory_limit_bytes = 0;
    // Versions kept in memory per model, the current one included (>= 1). Older
    // versions share the storage of tensors they have in common.
    int retain_versions = 1;
    // Persists every committed version when set; must outlive the store.
    StatePersister* persister = nullptr;
    // Loads between BeginLoad and their commit or abort may not exceed this
    // (each holds a memory reservation and staging memory). 0: unlimited.
    int max_pending_loads = 0;
    // Follower mode: when set (the upstream's target), the store mirrors that
    // upstream. Create, CreateFromSpec, Delete, BeginLoad, Load and Rollback
    // fail with FailedPrecondition naming it, and only ApplyReplicated and
    // RemoveReplicated (store/follower.h) change models.
    std::string replica_of;
  };

  explicit ModelStore(Options options);
  ModelStore() : ModelStore(Options{}) {}
  ~ModelStore();

  // Adds model `name` at version 1 (or, for a name used before, one past its
  // last version). Returns InvalidArgument for a bad name or more than
  // kMaxModules modules, AlreadyExists if the name is taken, ResourceExhausted
  // if its bytes and metadata would exceed the memory limit, or the
  // persister's error.
  absl::Status Create(const std::string& name, ModulePtr root,
                      std::string architecture = "");

  // Adds a model restored from disk at `version`, without persisting it again.
  // Errors as Create.
  absl::Status Restore(const std::string& name, ModulePtr root,
                       std::string architecture, int64_t version);

  // Removes model `name` and its persisted versions; snapshots already taken
  // stay valid. NotFound if it does not exist. If `deleted` is given, it is
  // set to the state removed (for the audit line: a writer committing just
  // before the delete cannot make it name another version).
  absl::Status Delete(const std::string& name, Snapshot* deleted = nullptr);

  // Returns the current state of `name`, or NotFound.
  absl::StatusOr<Snapshot> GetSnapshot(const std::string& name) const;

  // Returns version `version` of `name` if it is current or retained (0 means
  // current); NotFound otherwise.
  absl::StatusOr<Snapshot> GetSnapshot(const std::string& name,
                                       int64_t version) const;

  // Returns the versions of `name` held in memory, newest first, or NotFound.
  absl::StatusOr<std::vector<int64_t>> RetainedVersions(
      const std::string& name) const;

  // Makes retained version `version` of `name` current again, as a new version
  // number, and returns the model at that new version. NotFound for an unknown
  // model or a version not retained; the persister's error otherwise.
  absl::StatusOr<Snapshot> Rollback(const std::string& name, int64_t version);

  // Returns a snapshot of every model, ordered by name.
  std::vector<Snapshot> List() const;

  // Builds a model from an architecture spec (model/module_factory.h) with
  // `seed` and adds it as Create does. The model's cost is estimated from the
  // spec first (EstimateSpecCost), so one over the memory limit is refused
  // with ResourceExhausted before any tensor is allocated. Returns the new
  // model's snapshot, or InvalidArgument for a bad name or spec, and Create's
  // errors.
  absl::StatusOr<Snapshot> CreateFromSpec(const std::string& name,
                                          const std::string& spec_json,
                                          uint64_t seed);

  // torch's state_dict() of a model version, or of one submodule, with the
  // tensors cast when asked (reusing earlier conversions, see
  // CastFloatingForFetch). Returns NotFound for an unknown model, version,
  // submodule or key, InvalidArgument for a non-floating cast dtype, and
  // OutOfRange for an offset past the selected tensors' total bytes.
  // `request.min_version` is the caller's to wait for (VersionWaiter).
  absl::StatusOr<FetchPlan> Fetch(const FetchRequest& request);

  // Describes a model version, or the submodule `request.module` of it (the
  // other selection fields are ignored). Errors as Fetch.
  absl::StatusOr<ModelManifest> Describe(const FetchRequest& request) const;

  // Summaries of every model at its current version, ordered by name.
  std::vector<ModelSummary> Summaries() const;

  // Returns `state` (from a snapshot) with its floating tensors converted to
  // `dtype` as CastFloatingTensors does, reusing conversions of the same bytes
  // made for earlier fetches, so that many workers fetching a model as bf16 pay
  // for the conversion once. Kept conversions count as live bytes, are kept
  // only while they fit the memory limit, and go when their source tensors do.
  // InvalidArgument unless `dtype` is floating.
  absl::StatusOr<StateDict> CastFloatingForFetch(const StateDict& state,
                                                 DType dtype);

  // Validates a load of tensors described by `inputs` from their names, dtypes
  // and shapes alone, and reserves the memory it needs: tensor bytes,
  // conversions, and the metadata of the modules and storages it adds (for a
  // load that creates its model, estimated from the keys before any tree is
  // built; more than kMaxModules modules is InvalidArgument). Returns NotFound
  // (unknown model or submodule), InvalidArgument (duplicate keys, bad name),
  // Aborted (expected version differs), FailedPrecondition with torch's text
  // (strict key errors, shape mismatches), or ResourceExhausted (memory limit,
  // or max_pending_loads loads already pending).
  absl::StatusOr<std::unique_ptr<PendingLoad>> BeginLoad(
      const LoadRequest& request, std::vector<TensorSpec> inputs);

  // Applies `load` with `tensors` (parallel to load->inputs(), each matching
  // its spec) as one atomic step: converts dtypes and rebuilds the tree outside
  // the store's lock, persists the new version (if a persister is set), then
  // swaps it in and bumps the version. If the model changed since BeginLoad,
  // the plan is re-validated against the new state: an expected version that no
  // longer matches, or a changed destination dtype, gives Aborted; a model
  // deleted (or created) meanwhile gives NotFound (or AlreadyExists). On any
  // error, including the persister's, the model is unchanged.
  absl::StatusOr<LoadOutcome> CommitLoad(std::unique_ptr<PendingLoad> load,
                                         std::vector<Tensor> tensors);

  // The first check of a load, from its tensor count alone, before its
  // manifest is converted or validated: every tensor a load declares is
  // received into a storage of its own, so ResourceExhausted when
  // `num_tensors` storages' overhead alone would pass the memory limit. A load
  // that passes still goes through BeginLoad's full check.
  absl::Status CheckLoadSize(int64_t num_tensors) const;

  // BeginLoad + CommitLoad for a state dict already in memory.
  absl::StatusOr<LoadOutcome> Load(const LoadRequest& request,
                                   const StateDict& state);

  // Calls `listener` after every create, committed load, rollback and delete,
  // in commit order, from the committing thread. It must be quick and must not
  // call back into the store. Returns an id for RemoveListener.
  int64_t AddListener(std::function<void(const ModelEvent&)> listener);

  // As AddListener, for the events of `model` only, and first calls `listener`
  // once with kCurrent (and the current version) or kAbsent, atomically with
  // its registration: no event is missed or seen twice.
  int64_t Watch(const std::string& model,
                std::function<void(const ModelEvent&)> listener);

  // As Watch, over every model: first calls `listener` with kCurrent for each
  // model (ordered by name), then once with kListed, atomically with its
  // registration; then with every event of every model. In follower mode
  // before MarkReplicaSynced, returns Unavailable instead: a follower that has
  // not mirrored its upstream yet (just restarted without its models) must
  // not list its partial state to followers of its own, which would drop
  // what they hold.
  absl::StatusOr<int64_t> WatchAll(
      std::function<void(const ModelEvent&)> listener);

  // Follower mode: the upstream's first full listing has been mirrored, so
  // WatchAll may serve.
  void MarkReplicaSynced();

  // Follower mode only (Options::replica_of; store/follower.h): makes
  // `snapshot` the current version of its model with the upstream's version
  // number, persisting it first. kForward (within the store's epoch): a new
  // model is created and a version above the current one is committed as a
  // load would be (the current one is retained); a version at or below the
  // current one, or of a model deleted at that version or later, is refused
  // with Aborted (the upstream lags). kReplace (taking on a new epoch): the
  // model's versions, retained ones included, are dropped and `snapshot` is
  // its only version. On any error (InvalidArgument for a bad name or
  // version, FailedPrecondition outside follower mode, ResourceExhausted, the
  // persister's) the model is unchanged, except that kReplace may have
  // dropped it.
  absl::Status ApplyReplicated(Snapshot snapshot,
                               ReplicaWrite how = ReplicaWrite::kForward);

  // ResourceExhausted if `extra_bytes` more live bytes would exceed the memory
  // ResourceExhausted if `extra_bytes` more live bytes would exceed the memory
  // limit (with what pending loads reserve); OK otherwise. A follower asks
  // before fetching a version's new tensors.
  absl::Status CheckMemoryFor(int64_t extra_bytes) const;

  // Counts `bytes` that the daemon holds for this store's tensors outside
  // them (the same-host fetch's exports, store/memfd_export.h) as live bytes
  // for as long as `charge` lives, once they fit the memory limit.
  // ResourceExhausted, charging nothing, when they would not.
  // `metadata_bytes` count as metadata (see metadata_bytes()).
  absl::Status ChargeIfFits(const MemoryCharge& charge, int64_t bytes,
                            int64_t metadata_bytes = 0) const;

  // Follower mode only: the upstream deleted `name` at version `deleted_at`.
  // kForward: removes the model as Delete does unless it holds a later
  // version (Aborted: the upstream lags), and remembers the deletion (also of
  // a model not held) so that a lagging upstream cannot bring it back.
  // kReplace: removes it whatever its version, remembering `deleted_at` when
  // positive. FailedPrecondition outside follower mode; the persister's error.
  absl::Status RemoveReplicated(const std::string& name, int64_t deleted_at,
                                ReplicaWrite how = ReplicaWrite::kForward);

  // The store's lineage (store/lineage.h): the epoch of its versions and the
  // deletions it remembers.
  Lineage lineage() const;
  uint64_t epoch() const;
  // The version `name` had when it was deleted, if it is not held and its
  // deletion is remembered; 0 otherwise.
  int64_t DeletedVersion(const std::string& name) const;
  // At start, before anything is served: the lineage the data dir kept.
  void RestoreLineage(Lineage lineage);
  // Names the epoch of the versions held (a primary's new history, a
  // follower's first upstream), keeping the deletions remembered, and
  // persists it. The persister's error leaves the lineage unchanged.
  absl::Status RecordEpoch(uint64_t epoch);
  // Follower mode only: starts taking on `epoch`, another history: forgets
  // the deletions remembered, marks the lineage as adopting (persisted, so a
  // restart resumes it) and refuses watches over all models again until
  // MarkReplicaSynced, since what it holds meanwhile mixes two histories.
  absl::Status BeginAdoption(uint64_t epoch);
  // Follower mode only: every model now is of the adopted epoch.
  absl::Status EndAdoption();

  // Removes a listener added by AddListener or Watch. Once it returns, the
  // listener is not running and will not be called again.
  void RemoveListener(int64_t id);

  // Bytes of all live tensor storages the store has seen (models, retained
  // versions and snapshots still held), and of what ChargeIfFits charged.
  int64_t live_bytes() const;
  // Estimated bytes of the metadata around them (modules, slots, names,
  // shapes, storage objects; see model/module.h) and of kept state dicts
  // (Snapshot::memo), counted by the memory limit.
  int64_t metadata_bytes() const;
  // Bytes reserved by pending loads.
  int64_t reserved_bytes() const;
  // Bytes of freed tensor memory the process's storage pool holds for reuse
  // (model/tensor.h). With a memory limit they count against it: the pool
  // keeps a freed block only while live, metadata, reserved and pooled bytes
  // fit the limit, and gives blocks back when a create, load or cast needs
  // the room (it never makes one fail).
  int64_t pooled_bytes() const;
  // Loads begun and not yet committed or aborted.
  int pending_loads() const;

 private:
  // OK unless the store is a follower's (FailedPrecondition naming the
  // upstream).
  absl::Status CheckWritable() const;
  // FailedPrecondition saying only a follower's store does `what`, unless it
  // is one.
  absl::Status CheckFollower(absl::string_view what) const;

  const Options options_;
  // The concerns, each owned once and constructed in dependency order.
  StoreMemory memory_;
  CastCache cast_cache_;
  Catalog catalog_;
  StoreEvents events_;
  CatalogWriter writer_;
  LoadSessions loads_;
  StateReader reader_;
};

}  // namespace modelstate

#endif  // MODELSTATE_STORE_MODEL_STORE_H_

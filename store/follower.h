// Follower mode (modelstated --follow): a store that mirrors every model of an
// upstream daemon, with the upstream's version numbers, so that a version
// number means the same bytes on every pod. See docs/design.md, "Replication".
//
// A sync of one model is three steps, like a load: PlanSync compares the
// upstream's manifest (per-tensor XXH3-64) with the tensors the store already
// holds (current and retained versions) and lists the keys to fetch; the
// upstream sends only those, of the pinned version; BuildReplica makes the new
// tree, sharing every unchanged tensor's storage, and the store commits it
// atomically (ModelStore::ApplyReplicated).
//
// Which of the upstream's answers it applies is decided per model by
// DecideModel, within one history (store/lineage.h): never a lower version,
// never a deletion of something newer than the upstream saw, because a
// lagging upstream (a replica behind a load balancer) says so. Which history
// it follows is DecideEpoch's.
//
// Thread-safety: Run() runs on one thread (and starts one more, which syncs);
// Stop(), stats(), model_lags() and synced() may be called from any thread.
// SyncModel and the decision functions are stateless.
#ifndef MODELSTATE_STORE_FOLLOWER_H_
#define MODELSTATE_STORE_FOLLOWER_H_

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "absl/types/optional.h"
#include "model/state_dict.h"
#include "store/lineage.h"
#include "store/model_store.h"
#include "store/requests.h"

namespace modelstate {

// What a follower needs from the daemon it follows. server/ implements it over
// gRPC (a primary or another follower); tests use a fake. Every method may be
// called from any thread.
class Upstream {
 public:
  virtual ~Upstream() = default;

  // How the upstream is named in logs and errors (its gRPC target).
  virtual std::string name() const = 0;

  // Delivers the upstream's events over every model to `on_event`: first
  // kCurrent for each model, then kListed, then kCreated, kUpdated and
  // kDeleted as they happen, per model in commit order (intermediate updates
  // may be skipped). Returns OK when `on_event` returned false, otherwise the
  // stream's error (Unavailable when the upstream goes away, Cancelled after
  // Cancel).
  virtual absl::Status WatchAll(
      const std::function<bool(const ModelEvent&)>& on_event) = 0;

  // The manifest of `model` at `version` (0: its current version), with the
  // checksums, kinds and module classes of the whole model. NotFound for an
  // unknown model or a version no longer retained.
  virtual absl::StatusOr<ModelManifest> Describe(const std::string& model,
                                                 int64_t version) = 0;

  // The tensors `keys` of `model` at exactly `version`, in that order, each
  // checksum verified against the stream's manifest, calling `progress` (when
  // set) with the bytes received so far as they arrive. NotFound as Describe.
  // A transfer cut short should resume from the byte it reached rather than
  // start over (server/ resumes for about half a minute), since a sync may be
  // of many gigabytes; Unavailable once it gives up.
  virtual absl::StatusOr<StateDict> Fetch(
      const std::string& model, int64_t version,
      const std::vector<std::string>& keys,
      const std::function<void(uint64_t received)>& progress) = 0;

  // Ends every call in flight and every later one with Cancelled. Final.
  virtual void Cancel() = 0;
};

// Which tensors of an upstream version a follower already holds.
struct SyncPlan {
  // Parallel to the manifest's tensors: a held tensor with the same checksum,
  // dtype and shape (shared, not copied), or nothing when it must be fetched.
  std::vector<absl::optional<Tensor>> held;
  // Keys to fetch, one per distinct content (tied tensors travel once).
  std::vector<std::string> fetch_keys;
  uint64_t fetch_bytes = 0;
  uint64_t reused_bytes = 0;
  int64_t reused_tensors = 0;
  // The store already holds exactly this version: nothing to do.
  bool up_to_date = false;
};

// Compares `manifest` (an upstream version of `held_versions[0].model`) with
// `held_versions`: the snapshots the follower holds of that model, current
// first (empty when it has none).
SyncPlan PlanSync(const ModelManifest& manifest,
                  const std::vector<Snapshot>& held_versions);

// Builds the tree of `manifest`'s version from `plan.held` and `fetched` (the
// tensors of plan.fetch_keys, in order): kinds, key order and module classes as
// the upstream has them. Returns DataLoss if a fetched tensor's dtype, shape
// or checksum differs from the manifest, InvalidArgument if the keys do not
// form a tree.
absl::StatusOr<Snapshot> BuildReplica(const ModelManifest& manifest,
                                      const SyncPlan& plan,
                                      const StateDict& fetched);

// What one sync did.
struct SyncOutcome {
  std::string model;
  int64_t version = 0;
  bool committed = false;  // False when there was nothing to apply.
  // The upstream described a version not newer than the one held (it, or
  // the replica that answered, lags); nothing was applied.
  bool stale = false;
  int64_t tensors_fetched = 0;
  int64_t tensors_reused = 0;
  uint64_t bytes_fetched = 0;
  uint64_t bytes_reused = 0;
};

struct SyncOptions {
  // kForward applies only a version newer than the one held (else
  // SyncOutcome::stale); kReplace takes the upstream's version whatever it is
  // (a new epoch being adopted).
  ReplicaWrite how = ReplicaWrite::kForward;
  // When set, called with the bytes the sync still has to fetch: as its fetch
  // starts, as it advances, and 0 when it ends.
  std::function<void(uint64_t)> on_bytes_left;
};

// Brings `model` in `store` (a follower's store) to the upstream's current
// version: describes it, fetches the tensors PlanSync asks for, and commits
// the result. When the upstream commits again between the describe and the
// fetch and no longer retains the described version, starts over with the
// new one (a few times). Returns NotFound when the upstream has no such model,
// Aborted when the manifest is of another epoch than the store's (a replica of
// another history answered), ResourceExhausted (before fetching) when the new
// tensors would exceed the store's memory limit, or the upstream's or the
// store's error; the store's model is then unchanged.
absl::StatusOr<SyncOutcome> SyncModel(ModelStore& store, Upstream& upstream,
                                      const std::string& model,
                                      const SyncOptions& options = {});

// True for a SyncModel error that concerns one model only (the follower's
// memory limit, a tree or name it refuses), after which the follower goes on
// with the other models; after any other error (the upstream's) syncs wait a
// backoff and the model is tried again.
bool IsModelLocal(const absl::Status& status);

// Where a model stands, on the follower or as the upstream showed it.
struct ModelPosition {
  int64_t version = 0;  // The current version; 0: not held (not shown).
  // Without a version: the version it had when it was deleted; 0 when no
  // deletion is known.
  int64_t deleted_at = 0;
};

// What a follower does about one model.
enum class ModelAction {
  kNothing,           // Already where the upstream is.
  kSync,              // Fetch and apply the upstream's newer version.
  kRemove,            // The upstream deleted the version held, or a later one.
  kRememberDeletion,  // Not held: remember the upstream's deletion.
  kReplace,           // Adopting: take the upstream's version, whatever it is.
  kDrop,              // Adopting: the upstream does not have it.
  // The upstream shows an older state (a lower version, the deletion of an
  // older version, a model deleted here at that version or later): it lags.
  // Keep what is held.
  kKeepUpstreamBehind,
  // Held, but not on the upstream, which remembers no deletion of it: it may
  // lag (not created there yet). Keep it.
  kKeepUnconfirmed,
};

// Decides from what the follower holds of a model (`held`) and what the
// upstream showed of it (`upstream`), within one epoch; `adopting`: the model
// has not yet been taken from the upstream since a new epoch was adopted.
ModelAction DecideModel(const ModelPosition& held,
                        const ModelPosition& upstream, bool adopting);

struct FollowerOptions {
  // Waits between attempts to reach the upstream: doubled from min_backoff
  // after each failure up to max_backoff, back to min_backoff once a full
  // listing has been mirrored. Syncs that fail for the upstream's sake wait
  // the same way.
  absl::Duration min_backoff = absl::Milliseconds(100);
  absl::Duration max_backoff = absl::Seconds(10);
  // Which other epoch the follower may take on (store/lineage.h).
  EpochAdoption adoption;
  // Lines about an upstream that lags or is of another epoch are logged at
  // most this often each (per model, or per upstream epoch); those in
  // between are counted in the next one.
  absl::Duration repeat_log_interval = absl::Minutes(1);
  // Receives one line per committed sync, deletion and upstream connection
  // change. Null: silent.
  std::function<void(const std::string&)> log;
  // Called once, from the syncing thread, when the first full listing of the
  // upstream has been mirrored (health turns SERVING then).
  std::function<void()> on_first_sync;
};

// Counters since start and the state now; see server/metrics.h for their
// Prometheus names.
struct FollowerStats {
  int64_t syncs = 0;  // Versions committed.
  int64_t deletes = 0;
  int64_t tensors_fetched = 0;
  int64_t tensors_reused = 0;
  uint64_t bytes_fetched = 0;
  uint64_t bytes_reused = 0;
  int64_t upstream_failures = 0;  // Watches that ended in an error.
  int64_t sync_failures = 0;      // Syncs of one model that failed alone.
  // Answers of the upstream older than what is held (a lagging upstream):
  // kept, not applied.
  int64_t stale_answers = 0;
  // Sum over models of (the upstream's version as last seen - ours), for
  // models whose seen version is ahead of ours. Kept while disconnected.
  int64_t lag_versions = 0;
  bool connected = false;  // Inside a watch whose listing is mirrored.
  bool synced = false;     // The first full listing has been mirrored.
  // The store's epoch, and the upstream's as its last listing showed it.
  uint64_t epoch = 0;
  uint64_t upstream_epoch = 0;
  // The upstream's last listing was of another epoch, not allowed: nothing
  // of it is applied.
  bool epoch_refused = false;
  // 0 while the watch is up; otherwise since it ended (or since the start).
  absl::Duration since_heard;
  // The longest any model has been behind (ModelLag::behind).
  absl::Duration behind;
  // Bytes the sync in progress still has to fetch.
  uint64_t sync_bytes_in_flight = 0;
};

// One model as the upstream showed it, against what the follower holds.
struct ModelLag {
  std::string model;
  int64_t upstream_version = 0;  // Last seen; 0: the upstream lacks it.
  int64_t held_version = 0;
  // Since the upstream first showed a version the follower does not hold
  // yet; 0 when it holds the newest version seen.
  absl::Duration behind;
};

class Follower {
 public:
  // `store` must be in follower mode (ModelStore::Options::replica_of); it
  // and `upstream` must outlive the follower.
  Follower(ModelStore* store, Upstream* upstream, FollowerOptions options);

  // Mirrors the upstream until Stop. This thread watches every model and
  // notes what the upstream shows; another one reconciles each model the
  // listing or an event names (DecideModel: syncs, removals), so the watch is
  // read while syncs run. After a failure this thread waits (backoff) and
  // starts over with a fresh listing, which syncs only what changed
  // meanwhile. Reads of the store are served throughout.
  void Run();

  // Makes Run return soon: cancels the upstream's calls and the waits.
  void Stop();

  FollowerStats stats() const;
  // Every model the upstream showed or the follower holds, by name.
  std::vector<ModelLag> model_lags() const;
  bool synced() const;

 private:
  // What one watch has seen so far.
  struct Watch {
    int64_t number = 0;
    bool started = false;
    uint64_t epoch = 0;  // Of its first event; every later one must match.
    bool listed = false;
    bool refused = false;  // Its listing was of an epoch not allowed.
    // Until kListed: each model the listing shows (the deleted ones too).
    std::map<std::string, ModelPosition> shown;
  };
  // A watch's complete listing, for the syncing thread.
  struct Listing {
    int64_t watch = 0;
    EpochDecision decision;
    std::map<std::string, ModelPosition> shown;
  };
  // What the upstream showed of one model, last seen.
  struct Seen {
    ModelPosition position;
    // Versions shown beyond what was held then, each with when it was first
    // seen, oldest first; those held since are pruned.
    std::vector<std::pair<int64_t, absl::Time>> ahead;
  };
  // The syncing thread's next job: stop, start mirroring a listing, or
  // reconcile a model.
  struct Work {
    bool stop = false;
    std::unique_ptr<Listing> listing;
    std::string model;
  };

  // One watch: returns its error, or OK after Stop; sets `refused` when its
  // listing was of an epoch not allowed.
  absl::Status FollowOnce(bool* refused);
  // Notes one event of the watch; an error ends the watch.
  absl::Status OnEvent(const ModelEvent& event, Watch& watch);
  // A listing is complete: decides about its epoch and hands it over.
  absl::Status OnListed(Watch& watch);
  // Records what the upstream showed of a model after its listing.
  void Note(const std::string& model, const ModelPosition& position)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void WatchEnded();

  // The syncing thread.
  void SyncLoop();
  Work NextWork();
  absl::Status StartListing(const Listing& listing);
  void Reconcile(const std::string& model);
  absl::Status Act(const std::string& model, ModelAction action,
                   const ModelPosition& upstream);
  // Syncs `model`, whose version `wanted` the upstream's watch showed.
  absl::Status Sync(const std::string& model, int64_t wanted, ReplicaWrite how);
  // Counts and logs a sync committed.
  void Synced(const SyncOutcome& outcome, absl::Duration took);
  // Counts and logs (LogRepeated) an answer of the upstream older than what
  // is held, which is kept.
  void KeepStale(const std::string& model, const ModelPosition& held,
                 const ModelPosition& upstream);
  absl::Status Remove(const std::string& model, const ModelPosition& upstream,
                      ReplicaWrite how);
  void Reconciled(const std::string& model, const absl::Status& status);
  void ListingMirrored();

  ModelPosition Held(const std::string& model) const;
  // Logs `line` unless a line of `key` was logged within
  // options_.repeat_log_interval (then counts it for the next one).
  void LogRepeated(const std::string& key, const std::string& line);
  void Log(const std::string& line) const;
  bool stopping() const;

  ModelStore* const store_;
  Upstream* const upstream_;
  const FollowerOptions options_;
  const absl::Time started_ = absl::Now();

  mutable absl::Mutex mu_;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  FollowerStats stats_ ABSL_GUARDED_BY(mu_);
  // What the upstream showed of each model, last seen (kept across watches).
  std::map<std::string, Seen> seen_ ABSL_GUARDED_BY(mu_);
  // A listing for the syncing thread to start mirroring.
  std::unique_ptr<Listing> listing_ ABSL_GUARDED_BY(mu_);
  // Models to reconcile, and those of the listing being mirrored that are not
  // reconciled yet.
  std::set<std::string> dirty_ ABSL_GUARDED_BY(mu_);
  std::set<std::string> unmirrored_ ABSL_GUARDED_BY(mu_);
  int64_t watch_number_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t mirroring_watch_ ABSL_GUARDED_BY(mu_) = 0;
  bool watch_up_ ABSL_GUARDED_BY(mu_) = false;
  absl::Time last_heard_ ABSL_GUARDED_BY(mu_) = absl::InfinitePast();
  // Syncs wait until then after one failed for the upstream's sake.
  absl::Time sync_pause_until_ ABSL_GUARDED_BY(mu_) = absl::InfinitePast();
  absl::Duration sync_backoff_ ABSL_GUARDED_BY(mu_);
  // Models taken from the upstream since a new epoch was adopted; empty when
  // not adopting.
  bool adopting_ ABSL_GUARDED_BY(mu_) = false;
  std::set<std::string> replaced_ ABSL_GUARDED_BY(mu_);
  // Per LogRepeated key: when a line was last logged, and lines held back.
  std::map<std::string, std::pair<absl::Time, int64_t>> repeats_
      ABSL_GUARDED_BY(mu_);
};

}  // namespace modelstate

#endif  // MODELSTATE_STORE_FOLLOWER_H_

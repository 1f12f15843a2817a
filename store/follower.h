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
// Thread-safety: Run() runs on one thread; Stop(), stats() and synced() may be
// called from any thread. SyncModel and the plan functions are stateless.
#ifndef MODELSTATE_STORE_FOLLOWER_H_
#define MODELSTATE_STORE_FOLLOWER_H_

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "absl/types/optional.h"
#include "model/state_dict.h"
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
  // checksum verified against the stream's manifest. NotFound as Describe.
  // A transfer cut short should resume from the byte it reached rather than
  // start over (server/ resumes for about half a minute), since a sync may be
  // of many gigabytes; Unavailable once it gives up.
  virtual absl::StatusOr<StateDict> Fetch(
      const std::string& model, int64_t version,
      const std::vector<std::string>& keys) = 0;

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
  bool committed = false;  // False when the store was already up to date.
  int64_t tensors_fetched = 0;
  int64_t tensors_reused = 0;
  uint64_t bytes_fetched = 0;
  uint64_t bytes_reused = 0;
};

// Brings `model` in `store` (a follower's store) to the upstream's current
// version: describes it, fetches the tensors PlanSync asks for, and commits
// the result. When the upstream commits again between the describe and the
// fetch and no longer retains the described version, starts over with the
// new one (a few times). Returns NotFound when the upstream has no such model,
// ResourceExhausted (before fetching) when the new tensors would exceed the
// store's memory limit, or the upstream's or the store's error; the store's
// model is then unchanged.
absl::StatusOr<SyncOutcome> SyncModel(ModelStore& store, Upstream& upstream,
                                      const std::string& model);

// True for a SyncModel error that concerns one model only (the follower's
// memory limit, a tree or name it refuses), after which the follower goes on
// with the other models; any other error ends the watch of the upstream.
bool IsModelLocal(const absl::Status& status);

struct FollowerOptions {
  // Waits between attempts to reach the upstream: doubled from min_backoff
  // after each failure up to max_backoff, back to min_backoff once a full
  // listing has been mirrored.
  absl::Duration min_backoff = absl::Milliseconds(100);
  absl::Duration max_backoff = absl::Seconds(10);
  // Receives one line per committed sync, deletion and upstream connection
  // change. Null: silent.
  std::function<void(const std::string&)> log;
  // Called once, from Run's thread, when the first full listing of the
  // upstream has been mirrored (health turns SERVING then).
  std::function<void()> on_first_sync;
};

// Counters since start; see server/metrics.h for their Prometheus names.
struct FollowerStats {
  int64_t syncs = 0;  // Versions committed.
  int64_t deletes = 0;
  int64_t tensors_fetched = 0;
  int64_t tensors_reused = 0;
  uint64_t bytes_fetched = 0;
  uint64_t bytes_reused = 0;
  int64_t upstream_failures = 0;  // Watches that ended in an error.
  int64_t sync_failures = 0;      // Syncs of one model that failed alone.
  // Sum over the upstream's models of (its newest announced version - ours),
  // for models whose announced version is ahead of ours.
  int64_t lag_versions = 0;
  bool connected = false;  // Inside a watch that has delivered its listing.
  bool synced = false;     // The first full listing has been mirrored.
};

class Follower {
 public:
  // `store` must be in follower mode (ModelStore::Options::replica_of); it
  // and `upstream` must outlive the follower.
  Follower(ModelStore* store, Upstream* upstream, FollowerOptions options);

  // Mirrors the upstream until Stop: watches every model, syncs each one the
  // listing or an event names, removes models the upstream no longer has, and
  // after a failure waits (backoff) and starts over with a fresh listing,
  // which syncs only what changed meanwhile. Reads of the store are served
  // throughout.
  void Run();

  // Makes Run return soon: cancels the upstream's calls and the backoff wait.
  void Stop();

  FollowerStats stats() const;
  bool synced() const;

 private:
  // One watch: returns its error, or OK after Stop.
  absl::Status FollowOnce();
  // Handles one event of the watch; an error ends the watch.
  absl::Status Handle(const ModelEvent& event);
  // Records the upstream's version of a model, for the lag.
  void Announce(const ModelEvent& event);
  absl::Status Sync(const std::string& model);
  absl::Status RemoveAbsent();
  void Log(const std::string& line) const;
  bool stopping() const;

  ModelStore* const store_;
  Upstream* const upstream_;
  const FollowerOptions options_;

  mutable absl::Mutex mu_;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  FollowerStats stats_ ABSL_GUARDED_BY(mu_);
  // The upstream's newest announced version of each model (this watch).
  std::map<std::string, int64_t> announced_ ABSL_GUARDED_BY(mu_);
  // Models of the current watch's listing, until kListed.
  std::map<std::string, int64_t> listing_;
};

}  // namespace modelstate

#endif  // MODELSTATE_STORE_FOLLOWER_H_

// Consistent reads (`min_version`): waits for a model of a ModelStore to reach
// a version, for callers that must not block a thread per wait, such as RPC
// handlers. A replica that has not caught up holds the request until the model
// is at the version asked for or a deadline passes, woken by the store's
// commits (and by the model's creation), never by polling.
//
// Thread-safety: every method may be called from any thread. Callbacks run
// either on the thread that called Wait (when the version is already there) or
// on the waiter's own thread, one at a time, and must not call Cancel.
#ifndef MODELSTATE_STORE_VERSION_WAIT_H_
#define MODELSTATE_STORE_VERSION_WAIT_H_

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "store/model_store.h"

namespace modelstate {

class VersionWaiter {
 public:
  using Callback = std::function<void(absl::Status)>;

  // Follows the commits of `store`, which must outlive the waiter.
  explicit VersionWaiter(ModelStore* store);
  // Ends pending waits as Shutdown does and stops the waiter's thread.
  ~VersionWaiter();
  VersionWaiter(const VersionWaiter&) = delete;
  VersionWaiter& operator=(const VersionWaiter&) = delete;

  // Calls `done` exactly once: with OK as soon as `model` exists at a current
  // version >= `min_version` (at once, on this thread, when it already does);
  // with Unavailable, naming the version the model has and the one asked for,
  // when `deadline` passes first; with Unavailable ("shutting down") after
  // Shutdown. Returns an id for Cancel, or 0 when `done` already ran.
  int64_t Wait(const std::string& model, int64_t min_version,
               absl::Time deadline, Callback done);

  // Withdraws wait `id`. Returns true if it was pending: its callback will
  // never run. Returns false if the callback ran or is running; in either
  // case, once Cancel returns the callback is not running.
  bool Cancel(int64_t id);

  // Ends every pending wait, and every later one, with Unavailable.
  void Shutdown();

  // Waits pending now.
  int pending() const;

 private:
  struct PendingWait {
    std::string model;
    int64_t min_version = 0;
    absl::Time deadline;
    Callback done;
  };

  // The waiter's thread: sleeps until a commit, a new wait, the earliest
  // deadline or Shutdown, then runs the callbacks of waits that ended.
  void Run();
  // Moves the waits that ended out of waits_, each with its outcome.
  std::vector<std::pair<PendingWait, absl::Status>> TakeEndedLocked(
      absl::Time now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Time EarliestDeadlineLocked() const ABSL_SHARED_LOCKS_REQUIRED(mu_);
  // The model's current version, 0 when it does not exist.
  int64_t CurrentVersion(const std::string& model) const;

  ModelStore* store_;
  int64_t listener_id_ = 0;
  mutable absl::Mutex mu_;
  std::map<int64_t, PendingWait> waits_ ABSL_GUARDED_BY(mu_);
  int64_t next_id_ ABSL_GUARDED_BY(mu_) = 1;
  bool wake_ ABSL_GUARDED_BY(mu_) = false;      // Something to re-check.
  bool shutdown_ ABSL_GUARDED_BY(mu_) = false;  // No more waiting.
  bool stop_ ABSL_GUARDED_BY(mu_) = false;      // The thread must exit.
  int running_ ABSL_GUARDED_BY(mu_) = 0;  // Callbacks taken and not finished.
  std::thread thread_;
};

// The Unavailable status of a wait for `min_version` of `model` that did not
// end in time, while the model is at `current` (0: absent).
absl::Status VersionNotReached(const std::string& model, int64_t current,
                               int64_t min_version);

}  // namespace modelstate

#endif  // MODELSTATE_STORE_VERSION_WAIT_H_

#include "store/version_wait.h"

#include <algorithm>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"

namespace modelstate {

absl::Status VersionNotReached(const std::string& model, int64_t current,
                               int64_t min_version) {
  const std::string has = current > 0 ? absl::StrCat("is at version ", current)
                                      : std::string("does not exist here");
  return absl::UnavailableError(
      absl::StrCat("model \"", model, "\" ", has, ", asked for min_version ",
                   min_version, "; retry on a replica that has caught up"));
}

VersionWaiter::VersionWaiter(ModelStore* store) : store_(store) {
  // Every commit, creation and deletion wakes the thread, which re-checks the
  // waits against the store. The listener only sets a flag: it runs under the
  // store's event lock and must not call back into the store.
  listener_id_ = store_->AddListener([this](const ModelEvent&) {
    absl::MutexLock lock(&mu_);
    wake_ = true;
  });
  thread_ = std::thread([this] { Run(); });
}

VersionWaiter::~VersionWaiter() {
  store_->RemoveListener(listener_id_);
  Shutdown();
  {
    absl::MutexLock lock(&mu_);
    stop_ = true;
  }
  thread_.join();
}

int64_t VersionWaiter::CurrentVersion(const std::string& model) const {
  absl::StatusOr<Snapshot> snapshot = store_->GetSnapshot(model);
  return snapshot.ok() ? snapshot->version : 0;
}

int64_t VersionWaiter::Wait(const std::string& model, int64_t min_version,
                            absl::Time deadline, Callback done) {
  const int64_t current = CurrentVersion(model);
  if (current >= min_version) {
    done(absl::OkStatus());
    return 0;
  }
  {
    absl::MutexLock lock(&mu_);
    if (!shutdown_) {
      const int64_t id = next_id_++;
      waits_.emplace(
          id, PendingWait{model, min_version, deadline, std::move(done)});
      // A commit between the check above and this registration is caught by
      // the thread's re-check.
      wake_ = true;
      return id;
    }
  }
  done(absl::UnavailableError("server shutting down"));
  return 0;
}

bool VersionWaiter::Cancel(int64_t id) {
  absl::MutexLock lock(&mu_);
  if (waits_.erase(id) > 0) return true;
  // A callback that ends its own call may be told of the end on this thread.
  if (std::this_thread::get_id() == thread_.get_id()) return false;
  auto idle = [this]()
                  ABSL_SHARED_LOCKS_REQUIRED(mu_) { return running_ == 0; };
  mu_.Await(absl::Condition(&idle));
  return false;
}

void VersionWaiter::Shutdown() {
  absl::MutexLock lock(&mu_);
  shutdown_ = true;
  wake_ = true;
}

int VersionWaiter::pending() const {
  absl::MutexLock lock(&mu_);
  return static_cast<int>(waits_.size());
}

absl::Time VersionWaiter::EarliestDeadlineLocked() const {
  absl::Time earliest = absl::InfiniteFuture();
  for (const auto& [id, wait] : waits_)
    earliest = std::min(earliest, wait.deadline);
  return earliest;
}

std::vector<std::pair<VersionWaiter::PendingWait, absl::Status>>
VersionWaiter::TakeEndedLocked(absl::Time now) {
  std::vector<std::pair<PendingWait, absl::Status>> ended;
  for (auto it = waits_.begin(); it != waits_.end();) {
    PendingWait& wait = it->second;
    // Lock order: the store's event lock, then mu_, then the store's lock.
    const int64_t current = CurrentVersion(wait.model);
    absl::Status outcome;
    if (current >= wait.min_version) {
      outcome = absl::OkStatus();
    } else if (shutdown_) {
      outcome = absl::UnavailableError("server shutting down");
    } else if (now >= wait.deadline) {
      outcome = VersionNotReached(wait.model, current, wait.min_version);
    } else {
      ++it;
      continue;
    }
    ended.emplace_back(std::move(wait), std::move(outcome));
    it = waits_.erase(it);
  }
  return ended;
}

void VersionWaiter::Run() {
  absl::MutexLock lock(&mu_);
  // Checks once more after stop_ is set, so that no wait outlives the thread.
  for (bool last = false; !last;) {
    last = stop_;
    auto woken = [this]()
                     ABSL_SHARED_LOCKS_REQUIRED(mu_) { return wake_ || stop_; };
    mu_.AwaitWithDeadline(absl::Condition(&woken), EarliestDeadlineLocked());
    wake_ = false;
    std::vector<std::pair<PendingWait, absl::Status>> ended =
        TakeEndedLocked(absl::Now());
    if (ended.empty()) continue;
    last = false;  // Callbacks may have added waits.
    running_ = static_cast<int>(ended.size());
    mu_.Unlock();
    for (auto& [wait, outcome] : ended) {
      wait.done(outcome);
      wait.done = nullptr;  // Whatever it holds goes before Cancel returns.
      absl::MutexLock done_lock(&mu_);
      --running_;
    }
    mu_.Lock();
  }
}

}  // namespace modelstate

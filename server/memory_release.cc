#include "server/memory_release.h"

#include <malloc.h>

#include <thread>

namespace modelstate {

bool IsTrimPeriod(absl::Duration period) {
  return period > absl::ZeroDuration() && period != absl::InfiniteDuration();
}

MemoryReleaser::MemoryReleaser(absl::Duration period) {
  if (IsTrimPeriod(period))
    thread_ = std::thread([this, period] { Run(period); });
}

MemoryReleaser::~MemoryReleaser() {
  {
    absl::MutexLock lock(&mu_);
    stop_ = true;
  }
  if (thread_.joinable()) thread_.join();
}

void MemoryReleaser::Run(absl::Duration period) {
  absl::MutexLock lock(&mu_);
  while (!mu_.AwaitWithTimeout(absl::Condition(&stop_), period)) {
    // Walks every arena and returns whole free pages, also those in the
    // middle of a heap; takes milliseconds, without our lock held by anyone
    // else.
    malloc_trim(0);
  }
}

}  // namespace modelstate

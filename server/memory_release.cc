#include "server/memory_release.h"

#include <malloc.h>

#include <algorithm>
#include <thread>

namespace modelstate {

int MallocArenaBound() {
  return std::max(2, static_cast<int>(std::thread::hardware_concurrency()));
}

void KeepFreedMemoryBetweenTrims() {
  // Fixed values also turn off glibc's dynamic thresholds, which would
  // otherwise move with the sizes freed.
  mallopt(M_MMAP_THRESHOLD, kMmapThresholdBytes);
  mallopt(M_TRIM_THRESHOLD, kTrimThresholdBytes);
  mallopt(M_ARENA_MAX, MallocArenaBound());
}

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

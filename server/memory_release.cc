#include "server/memory_release.h"

#include <malloc.h>
#include <sched.h>

#include <algorithm>
#include <thread>

namespace modelstate {

int MallocArenaBound() {
  // The CPUs this process may run on (a container's share), not the host's.
  cpu_set_t cpus;
  CPU_ZERO(&cpus);
  const int usable =
      sched_getaffinity(0, sizeof(cpus), &cpus) == 0
          ? CPU_COUNT(&cpus)
          : static_cast<int>(std::thread::hardware_concurrency());
  return std::clamp(usable, 2, kMaxMallocArenas);
}

absl::Status KeepFreedMemoryBetweenTrims() {
  // Fixed values also turn off glibc's dynamic thresholds, which would
  // otherwise move with the sizes freed.
  if (mallopt(M_MMAP_THRESHOLD, kMmapThresholdBytes) != 1 ||
      mallopt(M_TRIM_THRESHOLD, kTrimThresholdBytes) != 1 ||
      mallopt(M_ARENA_MAX, MallocArenaBound()) != 1) {
    return absl::InternalError("malloc refused its thresholds (mallopt)");
  }
  return absl::OkStatus();
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

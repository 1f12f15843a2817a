#include "common/malloc_policy.h"

#include <malloc.h>
#include <sched.h>

#include <algorithm>
#include <thread>

#include "common/sanitizers.h"

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

absl::Status KeepFreedMemoryForReuse() {
  // AddressSanitizer's allocator replaces glibc's and refuses every mallopt:
  // there is no policy to set.
  if (kUnderAsan) return absl::OkStatus();
  // Fixed values also turn off glibc's dynamic thresholds, which would
  // otherwise move with the sizes freed.
  if (mallopt(M_MMAP_THRESHOLD, kMmapThresholdBytes) != 1 ||
      mallopt(M_TRIM_THRESHOLD, kTrimThresholdBytes) != 1 ||
      mallopt(M_ARENA_MAX, MallocArenaBound()) != 1) {
    return absl::InternalError("malloc refused its thresholds (mallopt)");
  }
  return absl::OkStatus();
}

}  // namespace modelstate

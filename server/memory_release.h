// Gives memory the allocator keeps after frees back to the operating system.
//
// glibc's malloc keeps what its per-thread arenas free for reuse. After a
// burst of large transient allocations (a 60 MB manifest parsed and refused,
// the buffers of a thousand connections), the daemon's resident set would
// stay at the burst's peak for as long as it runs; trimming returns it.
//
// The other way round, glibc by default gives memory back on free() itself:
// blocks past a dynamic threshold are mapped and unmapped per allocation, and
// an arena's free top is trimmed once it passes a few MiB. gRPC's receive
// buffers (up to 4 MiB each) then cost fresh page faults on every read of a
// load: 70k-120k minor faults and a third of the daemon's CPU per 1 GiB push
// (docs/performance.md). KeepFreedMemoryBetweenTrims makes frees keep their
// memory for reuse, and the periodic trim returns what an idle daemon holds.
//
// Thread-safety: constructed and destroyed on one thread; it runs its own.
#ifndef MODELSTATE_SERVER_MEMORY_RELEASE_H_
#define MODELSTATE_SERVER_MEMORY_RELEASE_H_

#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace modelstate {

// malloc's thresholds while a MemoryReleaser trims: allocations under
// kMmapThresholdBytes come from the heap, and an arena keeps up to
// kTrimThresholdBytes of free memory at its top.
inline constexpr int kMmapThresholdBytes = 32 << 20;
inline constexpr int kTrimThresholdBytes = 16 << 20;

// The arenas malloc may create: one per CPU this process may use, at least
// two and at most kMaxMallocArenas (glibc's default is eight per CPU of the
// host). malloc_trim returns the free top of the main arena only; every other
// arena keeps up to kTrimThresholdBytes, so the bound also bounds what an
// idle daemon holds: at most kMaxMallocArenas x 16 MiB = 128 MiB beyond its
// heap in use, in practice the arenas of the threads that received loads.
inline constexpr int kMaxMallocArenas = 8;
int MallocArenaBound();

// Sets the thresholds and the arena bound above. Call at the start of main,
// before any thread allocates: glibc applies an arena bound when it next
// makes an arena, and threads made before then may have their own already.
// Internal if malloc refuses a value.
absl::Status KeepFreedMemoryBetweenTrims();

// Whether `period` makes MemoryReleaser trim (positive and finite).
bool IsTrimPeriod(absl::Duration period);

class MemoryReleaser {
 public:
  // Starts a thread that calls malloc_trim(0) every `period`; a period that
  // is not IsTrimPeriod starts none.
  explicit MemoryReleaser(absl::Duration period);
  // Stops the thread and waits for it.
  ~MemoryReleaser();
  MemoryReleaser(const MemoryReleaser&) = delete;
  MemoryReleaser& operator=(const MemoryReleaser&) = delete;

 private:
  void Run(absl::Duration period);

  absl::Mutex mu_;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;
};

}  // namespace modelstate

#endif  // MODELSTATE_SERVER_MEMORY_RELEASE_H_

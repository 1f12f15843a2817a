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
// (docs/performance.md). With a releaser running, frees keep their memory
// for reuse and the periodic trim returns what an idle daemon holds.
//
// Thread-safety: constructed and destroyed on one thread; it runs its own.
#ifndef MODELSTATE_SERVER_MEMORY_RELEASE_H_
#define MODELSTATE_SERVER_MEMORY_RELEASE_H_

#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace modelstate {

class MemoryReleaser {
 public:
  static constexpr int kTrimThresholdBytes = 64 << 20;
  static constexpr int kMmapThresholdBytes = 32 << 20;

  // Starts a thread that calls malloc_trim(0) every `period`, and sets
  // malloc's thresholds so that frees in between keep their memory (up to
  // kTrimThresholdBytes of free top per arena, allocations under
  // kMmapThresholdBytes from the heap). A zero or infinite period starts
  // no thread and leaves malloc's defaults.
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

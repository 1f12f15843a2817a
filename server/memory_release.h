// Gives memory the allocator keeps after frees back to the operating system.
//
// glibc's malloc keeps what its per-thread arenas free for reuse. After a
// burst of large transient allocations (a 60 MB manifest parsed and refused,
// the buffers of a thousand connections), the daemon's resident set would
// stay at the burst's peak for as long as it runs; trimming returns it.
//
// The other way round, frees between trims keep their memory for reuse
// (KeepFreedMemoryForReuse, common/malloc_policy.h), and the periodic trim
// returns what an idle daemon holds.
//
// Thread-safety: constructed and destroyed on one thread; it runs its own.
#ifndef MODELSTATE_SERVER_MEMORY_RELEASE_H_
#define MODELSTATE_SERVER_MEMORY_RELEASE_H_

#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/malloc_policy.h"

namespace modelstate {

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

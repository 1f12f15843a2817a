// How this process's malloc treats freed memory: kept for reuse rather than
// given back on free().
//
// glibc by default gives memory back on free() itself: blocks past a dynamic
// threshold are mapped and unmapped per allocation, and an arena's free top
// is trimmed once it passes a few MiB. gRPC's receive buffers (up to 4 MiB
// each) then land in freshly zeroed pages on every read: 70k-120k minor faults
// and a third of the daemon's CPU per 1 GiB push, 43,000 faults per GiB a
// `modelstatectl pull` writes (docs/performance.md). The daemon and the CLI
// both call KeepFreedMemoryForReuse; the daemon's periodic malloc_trim
// (server/memory_release.h) returns what it holds once idle.
#ifndef MODELSTATE_COMMON_MALLOC_POLICY_H_
#define MODELSTATE_COMMON_MALLOC_POLICY_H_

#include "absl/status/status.h"

namespace modelstate {

// malloc's thresholds: allocations under kMmapThresholdBytes come from the
// heap, and an arena keeps up to kTrimThresholdBytes of free memory at its
// top.
inline constexpr int kMmapThresholdBytes = 32 << 20;
inline constexpr int kTrimThresholdBytes = 16 << 20;

// The arenas malloc may create: one per CPU this process may use, at least
// two and at most kMaxMallocArenas (glibc's default is eight per CPU of the
// host). malloc_trim returns the free top of the main arena only; every other
// arena keeps up to kTrimThresholdBytes, so the bound also bounds what an
// idle process holds: at most kMaxMallocArenas x 16 MiB = 128 MiB beyond its
// heap in use, in practice the arenas of the threads that received data.
inline constexpr int kMaxMallocArenas = 8;
int MallocArenaBound();

// Sets the thresholds and the arena bound above. Call at the start of main,
// before any thread allocates: glibc applies an arena bound when it next
// makes an arena, and threads made before then may have their own already.
// Internal if malloc refuses a value; nothing to do (OK) under
// AddressSanitizer, whose allocator is not glibc's.
absl::Status KeepFreedMemoryForReuse();

}  // namespace modelstate

#endif  // MODELSTATE_COMMON_MALLOC_POLICY_H_

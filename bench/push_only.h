// --only=P4: the push (LoadStateDict of the 1 GiB, 16-tensor model) against a
// daemon with its default storage pool, against one with the pool off
// (--storage_pool_bytes=0), and raw TCP into fresh memory, alone and
// alternating, with each sample's daemon page faults, CPU time and peak RSS
// (docs/performance.md, "What limits each figure", P4).
#ifndef MODELSTATE_BENCH_PUSH_ONLY_H_
#define MODELSTATE_BENCH_PUSH_ONLY_H_

#include "bench/plan.h"

namespace modelstate::bench {

// Runs P4, P4.off, P4.a, P4/a and P4.off/a; prints one line of counters per
// sample on stderr and the rows as markdown and JSON on stdout (and to
// config.out if set). Returns the exit code.
int RunPushOnly(const Config& config);

}  // namespace modelstate::bench

#endif  // MODELSTATE_BENCH_PUSH_ONLY_H_

// --only=P1: the full fetch into fresh memory (Client::StateDict) against raw
// TCP into fresh memory, alone, with what the kernel did during each sample
// (/proc/vmstat deltas and the process's minor faults), so that a slow sample
// can be told from a fast one by its faults and compactions
// (docs/performance.md, "P1: why it was bimodal").
#ifndef MODELSTATE_BENCH_FRESH_FETCH_H_
#define MODELSTATE_BENCH_FRESH_FETCH_H_

#include "bench/plan.h"

namespace modelstate::bench {

// Runs P1, P1.a and P1/a against a daemon holding only the main model; prints
// one line of counters per sample on stderr and the rows as markdown and JSON
// on stdout (and to config.out if set). Returns the exit code.
int RunFreshFetchOnly(const Config& config);

}  // namespace modelstate::bench

#endif  // MODELSTATE_BENCH_FRESH_FETCH_H_

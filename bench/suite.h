// The benchmark suite: runs every benchmark of a Plan, reports the figures
// and their ratios against the targets (docs/performance.md), and optionally
// checks the results file it wrote.
#ifndef MODELSTATE_BENCH_SUITE_H_
#define MODELSTATE_BENCH_SUITE_H_

#include "bench/plan.h"

namespace modelstate::bench {

// Runs the suite of `config` (every figure in one run: the measured rows in
// report order, then the ratios against the targets): prints the markdown table
// and the JSON, writes them to `config.out`.md and .json when set, and with
// `config.check` checks the JSON file read back. Returns the exit status: 0, or
// 1 when the check finds a problem. Dies on any failure to measure.
int RunSuite(const Config& config);

}  // namespace modelstate::bench

#endif  // MODELSTATE_BENCH_SUITE_H_

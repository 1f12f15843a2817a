// What a benchmark run measures: the command line's Config, the Plan derived
// from it, and the figures a run of that plan must report.
#ifndef MODELSTATE_BENCH_PLAN_H_
#define MODELSTATE_BENCH_PLAN_H_

#include <cstdint>
#include <string>
#include <vector>

#include "bench/results_check.h"

namespace modelstate::bench {

// The flags of modelstate_bench.
struct Config {
  bool quick = false;  // small models and few repetitions, for CI
  int reps = 5;
  std::string work_dir = "/tmp/modelstate-bench";
  std::string out;     // results go to `out`.md and `out`.json when set
  bool check = false;  // check `out`.json after writing it (results_check.h)
  std::string self;    // this executable, started again for the contenders
  std::string daemon;  // modelstated
  std::string ctl;     // modelstatectl (P3)
  std::string only;  // "P9" or "P1": that figure alone (bench/shared_memory.h,
                     // bench/fresh_fetch.h)
};

struct Plan {
  int reps = 0;
  uint64_t model_bytes = 0;     // the main model: 16 tensors
  int64_t many_tensors = 0;     // P5: the same bytes as this many tensors
  std::vector<int> fan_out;     // P6: concurrent fetchers, 1 first
  std::vector<uint64_t> sizes;  // P10: model sizes, each against raw TCP
  int latency_calls = 0;        // P7: calls of each kind
};

Plan MakePlan(const Config& config);

// The id of P10's figure for a model of `size` bytes, e.g. "P10.64MiB"; its
// raw-TCP baseline is SizeId + ".a" and their ratio SizeId + "/a".
std::string SizeId(uint64_t size);

// Every figure a run of `plan` reports, for CheckResultsJson.
std::vector<ExpectedFigure> ExpectedFigures(const Plan& plan);

}  // namespace modelstate::bench

#endif  // MODELSTATE_BENCH_PLAN_H_

// The C++ client's side of bench/python_bench.py: times Client::StateDict and
// Client::StateDictInto against a running modelstated, so the Python client's
// figures can be read as ratios to the C++ data path it wraps.
#ifndef MODELSTATE_BENCH_FETCH_LOOP_H_
#define MODELSTATE_BENCH_FETCH_LOOP_H_

#include <string>

namespace modelstate::bench {

// Fetches `model` from `address` `reps` times in `mode` and prints one line
// per repetition: "<mode> <GB/s>". Modes: "state-dict" (StateDict into fresh
// memory), "into" and "into-partial" (StateDictInto into memory allocated and
// touched once before timing, staged or written in place). Returns the exit
// status.
int FetchLoop(const std::string& address, const std::string& model, int reps,
              const std::string& mode);

}  // namespace modelstate::bench

#endif  // MODELSTATE_BENCH_FETCH_LOOP_H_

// --only=P1: the full fetch into fresh memory (Client::StateDict) against raw
// TCP into fresh memory, alone, with what the kernel did during each sample
// (/proc/vmstat deltas and the process's minor faults, bench/counters.h), so
// that a slow sample can be told from a fast one by its faults and compactions
// (docs/performance.md, "P1: why it was bimodal").
#ifndef MODELSTATE_BENCH_FRESH_FETCH_H_
#define MODELSTATE_BENCH_FRESH_FETCH_H_

#include <string>
#include <vector>

#include "bench/child_process.h"
#include "bench/plan.h"
#include "bench/results.h"
#include "client/client.h"

namespace modelstate::bench {

// In GB/s, one per repetition.
struct FreshFetchSamples {
  std::vector<double> modelstate, raw_tcp;
};

// Starts modelstated on a free loopback port holding no model, as P1's and
// P3 alone's daemon. Dies if it does not come up.
Child StartEmptyDaemon(const Config& config);

// Loads `file`'s tensors as model "main" (creating it) through `client`, as a
// trainer would: LoadStateDict, so the daemon holds them in anonymous memory,
// not in the page cache of a preloaded file. Dies on failure.
void LoadMainAsTrainer(Client& client, const std::string& file);

// The measurement of P1 and of each P10 size. Empties this process's pool of
// freed storage, so that every call starts as a new process would. Starts a
// daemon holding only `file`'s tensors, loaded as a trainer would
// (LoadStateDict: anonymous memory), and a raw TCP server of `file`. After one
// warm-up of each, `reps` times: Client::StateDict of the model into fresh
// memory, dropped inside the timing, then the raw TCP fetch of the file into
// fresh memory, freed inside its timing. Prints one line of counters per
// sample on stderr, labelled `id` and `id`.a ("P1 1.7 GB/s minflt ...").
// Stops both servers before returning.
FreshFetchSamples MeasureFreshFetch(const Config& config,
                                    const std::string& file, int reps,
                                    const std::string& id);

// Adds the figures P1 and P1.a.
void AddFreshFetchRows(FreshFetchSamples samples, Results& results);

// Adds the ratio P1/a (target >= 0.9) and P1/spread, P1's min over its median
// (target >= 0.7), once P1 and P1.a are in `results`.
void AddFreshFetchRatios(Results& results);

// Runs P1 alone (MeasureFreshFetch and the rows above); prints the rows as
// markdown and JSON on stdout (and to config.out if set). Returns the exit
// code.
int RunFreshFetchOnly(const Config& config);

}  // namespace modelstate::bench

#endif  // MODELSTATE_BENCH_FRESH_FETCH_H_

// P1r: the in-place refresh of a worker that keeps its weights between
// fetches (Client::StateDictInto into caller-owned buffers allocated once)
// against raw TCP into one buffer allocated once, alternating.
#ifndef MODELSTATE_BENCH_REUSED_MEMORY_H_
#define MODELSTATE_BENCH_REUSED_MEMORY_H_

#include <string>
#include <vector>

#include "bench/raw_tcp.h"
#include "bench/results.h"
#include "client/client.h"

namespace modelstate::bench {

// In GB/s, one per repetition. `in_place` writes straight into the buffers
// (IntoOptions::allow_partial_write, one copy), `staged` is StateDictInto's
// default (received and verified in staging memory, then copied).
struct ReusedMemorySamples {
  std::vector<double> in_place, staged, raw_tcp;
};

// Fetches `model` through `client` and `tcp`'s file into memory allocated once
// (and faulted in by one warm-up of each), `reps` times, the three in an order
// rotated each repetition.
ReusedMemorySamples MeasureReusedMemory(Client& client, RawTcpClient& tcp,
                                        const std::string& model, int reps);

// Adds the figures P1r, P1r.staged and P1r.a (the suite adds their ratio).
void AddReusedMemoryRows(ReusedMemorySamples samples, Results& results);

}  // namespace modelstate::bench

#endif  // MODELSTATE_BENCH_REUSED_MEMORY_H_

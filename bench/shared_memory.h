// P9: the same-host shared-memory fetch (modelstated --local_socket) against
// what the host allows it (mapping the bytes, measured in the same run), and
// beside the gRPC fetch over loopback TCP, all alternating repetition by
// repetition.
#ifndef MODELSTATE_BENCH_SHARED_MEMORY_H_
#define MODELSTATE_BENCH_SHARED_MEMORY_H_

#include <memory>
#include <string>
#include <vector>

#include "bench/plan.h"
#include "bench/results.h"
#include "client/client.h"

namespace modelstate::bench {

// Where a daemon started by the benchmark in `work_dir` serves its local
// socket.
std::string LocalSocketPath(const std::string& work_dir);

// A client that can fetch only through the local socket at `socket`: its gRPC
// target has nothing listening, so a silent fallback to TCP cannot pass for a
// shared-memory figure (it fails the run instead). With `verify`, it checks
// every checksum of the daemon's export too
// (ClientOptions::verify_shared_memory).
std::unique_ptr<Client> SharedMemoryOnlyClient(const std::string& socket,
                                               bool verify = false);

struct SharedMemorySamples {
  // GB/s: the fetches, and the floors they are judged against.
  std::vector<double> shared_memory, tcp, mapping, copy;
};
SharedMemorySamples MeasureSharedMemory(Client& tcp, Client& local,
                                        const std::string& model, int reps);

// Adds P9.shm, P9.tcp, the floors P9.map and P9.copy, the ratio P9 =
// P9.shm / P9.map (target >= 0.8) and P9.vs_tcp (informative).
void AddSharedMemoryRows(SharedMemorySamples samples, Results& results);

// modelstate_bench --only=P9: a daemon with the main model only, P9 alone;
// prints (and with --out writes) the table as the suite does.
int RunSharedMemoryOnly(const Config& config);

}  // namespace modelstate::bench

#endif  // MODELSTATE_BENCH_SHARED_MEMORY_H_

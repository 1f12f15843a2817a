// P9: the same-host shared-memory fetch (modelstated --local_socket) against
// the gRPC fetch over loopback TCP, both through Client::StateDict into fresh
// memory, alternating repetition by repetition.
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
  std::vector<double> shared_memory, tcp;  // GB/s
};
SharedMemorySamples MeasureSharedMemory(Client& tcp, Client& local,
                                        const std::string& model, int reps);

// Adds P9.shm, P9.tcp and the ratio P9 (target >= 3).
void AddSharedMemoryRows(SharedMemorySamples samples, Results& results);

// modelstate_bench --only=P9: a daemon with the main model only, P9 alone;
// prints (and with --out writes) the table as the suite does.
int RunSharedMemoryOnly(const Config& config);

}  // namespace modelstate::bench

#endif  // MODELSTATE_BENCH_SHARED_MEMORY_H_

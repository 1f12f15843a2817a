#include "bench/shared_memory.h"

#include <sys/stat.h>

#include <cstdio>
#include <fstream>
#include <utility>

#include "absl/strings/str_cat.h"
#include "bench/child_process.h"
#include "bench/common.h"
#include "model/safetensors.h"

namespace modelstate::bench {

std::string LocalSocketPath(const std::string& work_dir) {
  return work_dir + "/modelstated.local";
}

std::unique_ptr<Client> SharedMemoryOnlyClient(const std::string& socket,
                                               bool verify) {
  ClientOptions options;
  options.local_socket = socket;
  options.verify_shared_memory = verify;
  // Port 1 on loopback: nothing listens there.
  return Check(Client::Connect("127.0.0.1:1", options), "connect locally");
}

namespace {

// One fetch of `model` through `client`, freed inside the timing (as each
// repetition's memory is fresh), in GB/s.
double TimedFetch(Client& client, const std::string& model) {
  const double start = Seconds();
  FetchedStateDict fetched = Check(client.Fetch(model), "P9 fetch");
  const uint64_t bytes = fetched.state.TotalBytes();
  fetched = {};
  return GBps(bytes, Seconds() - start);
}

}  // namespace

SharedMemorySamples MeasureSharedMemory(Client& tcp, Client& local,
                                        const std::string& model, int reps) {
  SharedMemorySamples samples;
  const auto timed = [&](Client& client) { return TimedFetch(client, model); };
  // Warm-ups. The first local fetch of a version makes the daemon's export,
  // which every later one maps: its cost is reported, not in the figure.
  std::fprintf(stderr,
               "P9: first shared-memory fetch (makes the export): %.2f GB/s\n",
               timed(local));
  timed(tcp);
  std::fprintf(stderr, "P9: %d repetitions\n", reps);
  for (int rep = 0; rep < reps; ++rep) {
    if (rep % 2 == 0) {
      samples.shared_memory.push_back(timed(local));
      samples.tcp.push_back(timed(tcp));
    } else {
      samples.tcp.push_back(timed(tcp));
      samples.shared_memory.push_back(timed(local));
    }
  }
  return samples;
}

void AddSharedMemoryRows(SharedMemorySamples samples, Results& results) {
  results.Add("P9.shm", "same-host shared-memory fetch (Client::StateDict)",
              "GB/s", std::move(samples.shared_memory));
  results.Add("P9.tcp", "TCP fetch of the same model (Client::StateDict)",
              "GB/s", std::move(samples.tcp));
  results.AddRatio("P9", "shared-memory fetch / TCP fetch", "P9.shm", "P9.tcp",
                   AtLeast(3.0));
}

int RunSharedMemoryOnly(const Config& config) {
  mkdir(config.work_dir.c_str(), 0755);
  const Plan plan = MakePlan(config);
  const std::string file = ModelFile(config.work_dir, 16, plan.model_bytes);
  const std::string socket = LocalSocketPath(config.work_dir);
  Child daemon =
      Spawn({config.daemon, "--listen=127.0.0.1:0",
             "--demo_model=", "--log_rpcs=false", "--local_socket=" + socket},
            2, "serving on port ");
  Results results;
  {
    auto tcp = Check(Client::Connect(absl::StrCat("127.0.0.1:", daemon.port)),
                     "connect");
    auto local = SharedMemoryOnlyClient(socket);
    // Loaded as a trainer would, so the model lives in anonymous memory
    // (as in the suite, see Bench).
    const SafetensorsFile state =
        Check(ReadSafetensorsFile(file), "read model file");
    LoadRequest load("main");
    load.create_if_missing = true;
    Check(tcp->Load(load, state.tensors), "load main");
    AddSharedMemoryRows(MeasureSharedMemory(*tcp, *local, "main", plan.reps),
                        results);
    // What checking every checksum of the export would cost (informative,
    // not in the table): ClientOptions::verify_shared_memory.
    auto verifying = SharedMemoryOnlyClient(socket, /*verify=*/true);
    std::vector<double> verified;
    for (int rep = 0; rep < plan.reps; ++rep)
      verified.push_back(TimedFetch(*verifying, "main"));
    const Summary summary = Summarize(verified);
    std::fprintf(stderr,
                 "P9: shared-memory fetch with verify_shared_memory: "
                 "%.2f-%.2f-%.2f GB/s (min-median-max)\n",
                 summary.min, summary.median, summary.max);
  }
  Stop(daemon);
  PrintAndWrite(results, config.out);
  return 0;
}

}  // namespace modelstate::bench

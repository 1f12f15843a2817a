#include "bench/fresh_fetch.h"

#include <sys/stat.h>

#include <algorithm>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "bench/child_process.h"
#include "bench/common.h"
#include "bench/counters.h"
#include "bench/raw_tcp.h"
#include "bench/results.h"
#include "client/client.h"
#include "model/safetensors.h"
#include "model/tensor.h"

namespace modelstate::bench {
namespace {

// Room in the pool beyond the model file: each freed block is rounded up to
// whole huge pages, the raw-TCP buffer (one block) and each of the 16
// tensors (up to 2 MiB each).
constexpr uint64_t kPoolHeadroomBytes = 64 * kMiB;

// Samples `reps` times the fetch of `model` through `client` and `tcp`'s, as
// MeasureFreshFetch describes.
FreshFetchSamples Alternate(Client& client, RawTcpClient& tcp,
                            const std::string& model, int reps,
                            const std::string& id) {
  const auto fetch = [&] {
    return Check(client.Fetch(model), "fetch").state.TotalBytes();
  };
  const uint64_t tensor_bytes = fetch();  // Warm-ups.
  const uint64_t file_bytes = tcp.Fetch();
  FreshFetchSamples samples;
  std::fprintf(stderr, "%s: %d repetitions\n", id.c_str(), reps);
  for (int rep = 0; rep < reps; ++rep) {
    samples.modelstate.push_back(SampleWithCounters(
        id, [&] { return TimedGBps(tensor_bytes, fetch); }, FaultDeltas));
    samples.raw_tcp.push_back(SampleWithCounters(
        id + ".a", [&] { return TimedGBps(file_bytes, [&] { tcp.Fetch(); }); },
        FaultDeltas));
  }
  return samples;
}

}  // namespace

Child StartEmptyDaemon(const Config& config) {
  return Spawn({config.daemon, "--listen=127.0.0.1:0",
                "--demo_model=", "--log_rpcs=false"},
               2, "serving on port ");
}

void LoadMainAsTrainer(Client& client, const std::string& file) {
  // As in the suite (see Bench).
  const SafetensorsFile state =
      Check(ReadSafetensorsFile(file), "read model file");
  LoadRequest load("main");
  load.create_if_missing = true;
  Check(client.Load(load, state.tensors), "load main");
}

FreshFetchSamples MeasureFreshFetch(const Config& config,
                                    const std::string& file, int reps,
                                    const std::string& id) {
  // Start from an empty pool of freed blocks (model/tensor.h), as a new process
  // does (--only=P1), whatever the benchmarks before left in it; then bound
  // it to what either contender frees. Both receive `file`'s bytes, and the
  // raw-TCP buffer holds the header too, one huge page past a 1 GiB model:
  // under the default 1 GiB bound that buffer gathered modelstate's freed
  // tensors into itself and then went back to the kernel whole, so every
  // modelstate sample faulted 1 GiB of fresh pages while raw TCP faulted one.
  // A process that fetches the same model again keeps its pages with a pool
  // its size; so does each contender here.
  Storage::SetPoolLimit(0);
  Storage::SetPoolLimit(std::max<uint64_t>(
      Storage::kDefaultPoolLimitBytes, FileSize(file) + kPoolHeadroomBytes));
  Child daemon = StartEmptyDaemon(config);
  Child tcp_server = Spawn({config.self, "serve-tcp", file}, 1, "PORT ");
  FreshFetchSamples samples;
  {
    auto client = Check(
        Client::Connect(absl::StrCat("127.0.0.1:", daemon.port)), "connect");
    RawTcpClient tcp(tcp_server.port);
    LoadMainAsTrainer(*client, file);
    samples = Alternate(*client, tcp, "main", reps, id);
  }
  Stop(tcp_server);
  Stop(daemon);
  Storage::SetPoolLimit(Storage::kDefaultPoolLimitBytes);  // for what follows
  return samples;
}

void AddFreshFetchRows(FreshFetchSamples samples, Results& results) {
  results.Add("P1", "modelstate full fetch into fresh memory, 16 tensors",
              "GB/s", std::move(samples.modelstate));
  results.Add("P1.a", "raw TCP loopback into fresh memory, same bytes", "GB/s",
              std::move(samples.raw_tcp));
}

void AddFreshFetchRatios(Results& results) {
  results.AddRatio("P1/a", "P1 / raw TCP", "P1", "P1.a", AtLeast(0.9));
  results.AddMinOverMedian("P1/spread", "P1 min / P1 median", "P1",
                           AtLeast(0.7));
}

int RunFreshFetchOnly(const Config& config) {
  mkdir(config.work_dir.c_str(), 0755);
  const Plan plan = MakePlan(config);
  const std::string file = ModelFile(config.work_dir, 16, plan.model_bytes);
  Results results;
  AddFreshFetchRows(MeasureFreshFetch(config, file, plan.reps, "P1"), results);
  AddFreshFetchRatios(results);
  PrintAndWrite(results, config.out);
  return 0;
}

}  // namespace modelstate::bench

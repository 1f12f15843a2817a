#include "bench/fresh_fetch.h"

#include <sys/resource.h>
#include <sys/stat.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <fstream>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "bench/child_process.h"
#include "bench/common.h"
#include "bench/raw_tcp.h"
#include "bench/results.h"
#include "client/client.h"
#include "core/safetensors.h"
#include "core/tensor.h"

namespace modelstate::bench {
namespace {

// The /proc/vmstat counters that tell a sample's page-fault and huge-page
// work: faults, THP allocations and fallbacks, direct compaction and reclaim.
constexpr std::array<const char*, 7> kVmstat = {
    "pgfault",      "thp_fault_alloc", "thp_fault_fallback", "compact_stall",
    "compact_fail", "pgscan_direct",   "thp_split_pmd"};

// Free memory the guest kernel has handed back to the hypervisor (free page
// reporting), which the host must fault in and zero again on the next touch.
// Absent outside such virtual machines; then reads as 0.
constexpr char kReportedKib[] =
    "/sys/module/page_reporting/parameters/reported_kib";

// Room in the pool beyond the model file: each freed block is rounded up to
// whole huge pages, the raw-TCP buffer (one block) and each of the 16
// tensors (up to 2 MiB each).
constexpr uint64_t kPoolHeadroomBytes = 64 * kMiB;

struct Counters {
  std::map<std::string, long long> vmstat;
  long long reported_kib = 0;
  long long minor_faults = 0;
  double cpu_seconds = 0;  // user + system of this process
};

Counters ReadCounters() {
  Counters counters;
  std::ifstream in("/proc/vmstat");
  std::string name;
  long long value;
  while (in >> name >> value) counters.vmstat[name] = value;
  std::ifstream(kReportedKib) >> counters.reported_kib;
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  counters.minor_faults = usage.ru_minflt;
  counters.cpu_seconds =
      usage.ru_utime.tv_sec + usage.ru_stime.tv_sec +
      (usage.ru_utime.tv_usec + usage.ru_stime.tv_usec) / 1e6;
  return counters;
}

// Times `transfer` of `bytes` and prints its counters' deltas on stderr.
double Sample(const std::string& what, uint64_t bytes,
              const std::function<void()>& transfer) {
  const Counters before = ReadCounters();
  const double start = Seconds();
  transfer();
  const double gbps = GBps(bytes, Seconds() - start);
  const Counters after = ReadCounters();
  std::string line =
      absl::StrCat(what, " ", gbps, " GB/s minflt ",
                   after.minor_faults - before.minor_faults, " cpu_s ",
                   after.cpu_seconds - before.cpu_seconds, " reported_kib ",
                   after.reported_kib - before.reported_kib);
  for (const char* name : kVmstat) {
    absl::StrAppend(&line, " ", name, " ",
                    after.vmstat.at(name) - before.vmstat.at(name));
  }
  std::fprintf(stderr, "%s\n", line.c_str());
  return gbps;
}

// Samples `reps` times the fetch of `model` through `client` and `tcp`'s, as
// MeasureFreshFetch describes.
FreshFetchSamples Alternate(Client& client, RawTcpClient& tcp,
                            const std::string& model, int reps,
                            const std::string& id) {
  const auto fetch = [&] {
    return Check(client.StateDict(model), "fetch").state.TotalBytes();
  };
  const uint64_t tensor_bytes = fetch();  // Warm-ups.
  const uint64_t file_bytes = tcp.Fetch();
  FreshFetchSamples samples;
  std::fprintf(stderr, "%s: %d repetitions\n", id.c_str(), reps);
  for (int rep = 0; rep < reps; ++rep) {
    samples.modelstate.push_back(Sample(id, tensor_bytes, fetch));
    samples.raw_tcp.push_back(
        Sample(id + ".a", file_bytes, [&] { tcp.Fetch(); }));
  }
  return samples;
}

}  // namespace

FreshFetchSamples MeasureFreshFetch(const Config& config,
                                    const std::string& file, int reps,
                                    const std::string& id) {
  // Start from an empty pool of freed blocks (core/tensor.h), as a new process
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
  Child daemon = Spawn({config.daemon, "--listen=127.0.0.1:0",
                        "--demo_model=", "--log_rpcs=false"},
                       2, "serving on port ");
  Child tcp_server = Spawn({config.self, "serve-tcp", file}, 1, "PORT ");
  FreshFetchSamples samples;
  {
    auto client = Check(
        Client::Connect(absl::StrCat("127.0.0.1:", daemon.port)), "connect");
    RawTcpClient tcp(tcp_server.port);
    {
      // Loaded as a trainer would (as in the suite, see Bench).
      const SafetensorsFile state =
          Check(ReadSafetensorsFile(file), "read model file");
      LoadRequest load("main");
      load.create_if_missing = true;
      Check(client->LoadStateDict(load, state.tensors), "load main");
    }
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

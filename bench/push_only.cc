#include "bench/push_only.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "bench/child_process.h"
#include "bench/common.h"
#include "bench/raw_tcp.h"
#include "bench/results.h"
#include "client/client.h"
#include "model/safetensors.h"

namespace modelstate::bench {
namespace {

// What the daemon's kernel side did during a sample: its minor faults and CPU
// seconds (user + system), from /proc/PID/stat.
struct ProcessCounters {
  long long minor_faults = 0;
  double cpu_seconds = 0;
};

ProcessCounters ReadProcessCounters(pid_t pid) {
  std::ifstream in(absl::StrCat("/proc/", pid, "/stat"));
  std::string line;
  std::getline(in, line);
  // Fields after the command name (which may hold spaces) start at field 3.
  std::istringstream rest(line.substr(line.rfind(')') + 2));
  std::vector<std::string> fields;
  std::string field;
  while (rest >> field) fields.push_back(field);
  ProcessCounters counters;
  if (fields.size() < 13) return counters;
  const double ticks = static_cast<double>(sysconf(_SC_CLK_TCK));
  counters.minor_faults = std::stoll(fields[7]);  // minflt, field 10
  counters.cpu_seconds =
      (std::stoll(fields[11]) + std::stoll(fields[12])) / ticks;
  return counters;
}

// A daemon holding "main", loaded from `state` as a trainer would, and a
// client of it.
struct PushTarget {
  Child daemon;
  std::unique_ptr<Client> client;
};

PushTarget StartTarget(const Config& config,
                       const std::vector<std::string>& flags,
                       const SafetensorsFile& state) {
  std::vector<std::string> argv = {config.daemon, "--listen=127.0.0.1:0",
                                   "--demo_model=", "--log_rpcs=false"};
  argv.insert(argv.end(), flags.begin(), flags.end());
  PushTarget target;
  target.daemon = Spawn(std::move(argv), 2, "serving on port ");
  target.client =
      Check(Client::Connect(absl::StrCat("127.0.0.1:", target.daemon.port)),
            "connect");
  LoadRequest load("main");
  load.create_if_missing = true;
  Check(target.client->Load(load, state.tensors), "load main");
  return target;
}

// Times one push of `state` into `target` and prints its counters.
double PushSample(const char* what, PushTarget& target,
                  const SafetensorsFile& state) {
  const pid_t pid = target.daemon.pid;
  ResetPeakRss(pid);
  const ProcessCounters before = ReadProcessCounters(pid);
  const double start = Seconds();
  Check(target.client->Load("main", state.tensors), what);
  const double gbps = GBps(state.tensors.TotalBytes(), Seconds() - start);
  const ProcessCounters after = ReadProcessCounters(pid);
  std::fprintf(stderr,
               "%s %g GB/s daemon_minflt %lld daemon_cpu_s %g "
               "daemon_peak_rss_mib %ld\n",
               what, gbps, after.minor_faults - before.minor_faults,
               after.cpu_seconds - before.cpu_seconds,
               PeakRssBytes(pid) / static_cast<long>(kMiB));
  return gbps;
}

}  // namespace

int RunPushOnly(const Config& config) {
  mkdir(config.work_dir.c_str(), 0755);
  const Plan plan = MakePlan(config);
  const std::string file = ModelFile(config.work_dir, 16, plan.model_bytes);
  const SafetensorsFile state =
      Check(ReadSafetensorsFile(file), "read model file");
  const std::string push_bytes = ReadWholeFile(file);
  Child tcp_server = Spawn({config.self, "serve-tcp", file}, 1, "PORT ");
  Results results;
  {
    // The default pool (flag absent) and none.
    PushTarget pooled = StartTarget(config, {}, state);
    PushTarget unpooled =
        StartTarget(config, {"--storage_pool_bytes=0"}, state);
    RawTcpClient tcp(tcp_server.port);
    // Warm-ups: the first push stages into fresh memory either way.
    PushSample("warm-up", pooled, state);
    PushSample("warm-up.off", unpooled, state);
    tcp.Push(push_bytes);
    std::vector<double> ours, off, raw;
    std::fprintf(stderr, "P4: %d repetitions\n", plan.reps);
    for (int rep = 0; rep < plan.reps; ++rep) {
      ours.push_back(PushSample("P4", pooled, state));
      off.push_back(PushSample("P4.off", unpooled, state));
      const double start = Seconds();
      tcp.Push(push_bytes);
      raw.push_back(GBps(push_bytes.size(), Seconds() - start));
      std::fprintf(stderr, "P4.a %g GB/s\n", raw.back());
    }
    results.Add("P4", "modelstate push (LoadStateDict), 16 tensors", "GB/s",
                std::move(ours));
    results.Add("P4.off", "the same push, daemon without storage pool", "GB/s",
                std::move(off));
    results.Add("P4.a", "raw TCP loopback push", "GB/s", std::move(raw));
    results.AddRatio("P4/a", "P4 / raw TCP push", "P4", "P4.a", AtLeast(0.8));
    results.AddRatio("P4.off/a", "P4.off / raw TCP push", "P4.off", "P4.a",
                     AtLeast(0.8));
    Stop(unpooled.daemon);
    Stop(pooled.daemon);
  }
  Stop(tcp_server);
  PrintAndWrite(results, config.out);
  return 0;
}

}  // namespace modelstate::bench

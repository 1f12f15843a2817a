// modelstate_bench: measures modelstated beside raw TCP, a naive gRPC server
// and nginx, in one run, contenders alternating, and prints a markdown table
// and JSON (docs/performance.md).
//
//   modelstate_bench [--quick] [--reps=N] [--work_dir=DIR] [--out=PREFIX]
//                    [--check] [--only=P9|P1|P3|P4]
//
// --only=P4 measures the push against daemons with and without the storage
// pool and raw TCP alone, printing each sample's daemon faults and peak RSS
// (bench/push_only.h).
// --only=P1 measures the fetch into fresh memory and raw TCP alone, printing
// each sample's page-fault and compaction counters (bench/fresh_fetch.h).
// --only=P3 measures modelstatectl pull to tmpfs and nginx -> libcurl to the
// same tmpfs alone, printing each sample's counters: the pull's process and
// the daemon's CPU, curl's and nginx's, reclaim (bench/pull_to_file.h).
// --only=P9 measures the same-host shared-memory fetch alone
// (bench/shared_memory.h), against a daemon holding only the main model.
//
// --check (needs --out) reads PREFIX.json back after the run and fails if a
// figure is missing or not a positive number (bench/results_check.h); CI runs
// it with --quick.
//
// Child modes (used by the driver itself): serve-tcp FILE, serve-naive FILE.
// fetch-loop ADDRESS MODEL REPS MODE times the C++ client for
// bench/python_bench.py (bench/fetch_loop.h).
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "bench/fetch_loop.h"
#include "bench/fresh_fetch.h"
#include "bench/naive_grpc.h"
#include "bench/plan.h"
#include "bench/pull_to_file.h"
#include "bench/push_only.h"
#include "bench/raw_tcp.h"
#include "bench/shared_memory.h"
#include "bench/suite.h"

namespace modelstate::bench {
namespace {

constexpr char kUsage[] =
    "usage: modelstate_bench [--quick] [--reps=N] [--work_dir=DIR] "
    "[--out=PREFIX] [--check] [--only=P9|P1|P3|P4]\n";

std::string SelfPath() {
  char self[4096];
  const ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
  self[n > 0 ? n : 0] = '\0';
  return self;
}

// Parses the flags into `config`; false on an unknown flag or --check without
// --out.
bool ParseFlags(int argc, char** argv, Config& config) {
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--quick") {
      config.quick = true;
      config.reps = 3;
    } else if (arg.rfind("--reps=", 0) == 0) {
      config.reps = std::max(1, std::atoi(arg.c_str() + 7));
    } else if (arg.rfind("--work_dir=", 0) == 0) {
      config.work_dir = arg.substr(11);
    } else if (arg.rfind("--out=", 0) == 0) {
      config.out = arg.substr(6);
    } else if (arg == "--check") {
      config.check = true;
    } else if (arg == "--only=P9") {
      config.only = "P9";
    } else if (arg == "--only=P1") {
      config.only = "P1";
    } else if (arg == "--only=P3") {
      config.only = "P3";
    } else if (arg == "--only=P4") {
      config.only = "P4";
    } else {
      return false;
    }
  }
  return !config.check || !config.out.empty();
}

}  // namespace
}  // namespace modelstate::bench

int main(int argc, char** argv) {
  namespace bench = modelstate::bench;
  signal(SIGPIPE, SIG_IGN);
  if (argc >= 3 && std::string(argv[1]) == "serve-tcp")
    bench::ServeTcp(argv[2]);
  if (argc >= 3 && std::string(argv[1]) == "serve-naive")
    return bench::ServeNaive(argv[2]);
  if (argc >= 6 && std::string(argv[1]) == "fetch-loop")
    return bench::FetchLoop(argv[2], argv[3], std::atoi(argv[4]), argv[5]);
  bench::Config config;
  config.self = bench::SelfPath();
  config.daemon = MODELSTATED_PATH;
  config.ctl = MODELSTATECTL_PATH;
  if (!bench::ParseFlags(argc, argv, config)) {
    std::fputs(bench::kUsage, stderr);
    return 2;
  }
  if (config.only == "P9") return bench::RunSharedMemoryOnly(config);
  if (config.only == "P1") return bench::RunFreshFetchOnly(config);
  if (config.only == "P3") return bench::RunPullToFileOnly(config);
  if (config.only == "P4") return bench::RunPushOnly(config);
  return bench::RunSuite(config);
}

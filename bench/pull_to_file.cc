#include "bench/pull_to_file.h"

#include <dirent.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "bench/common.h"
#include "bench/counters.h"
#include "bench/fresh_fetch.h"
#include "bench/nginx.h"
#include "client/client.h"
#include "model/safetensors.h"
#include "model/tensor.h"
#include "tests/subprocess.h"

namespace modelstate::bench {
namespace {

// Runs `modelstatectl pull` to `path`; dies unless it exits with 0.
void Pull(const Config& config, int daemon_port, const std::string& model,
          const std::string& path) {
  SubprocessOptions options;
  options.stdout_to = OutputTarget::Pipe();
  options.stderr_to = OutputTarget::SameAsStdout();
  std::unique_ptr<Subprocess> pull =
      Check(Subprocess::Spawn(
                {config.ctl, absl::StrCat("--server=127.0.0.1:", daemon_port),
                 "fetch", model, path},
                options),
            "start modelstatectl");
  const int status = Check(pull->Wait(absl::Minutes(10)), "modelstatectl");
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    (void)pull->WaitForEndOfOutput(absl::Seconds(10));
    Die("modelstatectl pull failed: " +
        pull->Output(Subprocess::Stream::kStdout));
  }
}

// Dies unless the files at `path` and `reference` hold the same bytes.
void CheckSameBytes(const std::string& path, const std::string& reference) {
  std::unique_ptr<FILE, int (*)(FILE*)> a(std::fopen(path.c_str(), "rb"),
                                          &std::fclose);
  std::unique_ptr<FILE, int (*)(FILE*)> b(std::fopen(reference.c_str(), "rb"),
                                          &std::fclose);
  if (a == nullptr || b == nullptr) Die("cannot open " + path);
  std::vector<char> x(8 * kMiB), y(8 * kMiB);
  while (true) {
    const size_t got = std::fread(x.data(), 1, x.size(), a.get());
    if (std::fread(y.data(), 1, y.size(), b.get()) != got ||
        !std::equal(x.begin(), x.begin() + got, y.begin())) {
      Die(path + " differs from " + reference);
    }
    if (got < x.size()) return;
  }
}

// P3's directory, one per process.
const std::string& TmpfsPath() {
  static const std::string* const path =
      new std::string(absl::StrCat("/dev/shm/modelstate-bench.", getpid()));
  return *path;
}

// Removes P3's directory and everything in it (an atexit handler).
void RemoveTmpfsDir() {
  const std::string& dir = TmpfsPath();
  if (DIR* entries = opendir(dir.c_str())) {
    while (const dirent* entry = readdir(entries)) {
      const std::string name = entry->d_name;
      if (name != "." && name != "..") unlink((dir + "/" + name).c_str());
    }
    closedir(entries);
  }
  rmdir(dir.c_str());
}

// A pull's counters: the modelstatectl process's (the only child reaped
// during the sample, after its exit), the daemon's CPU seconds, and what the
// kernel did, reclaim included.
std::string PullDeltas(const Counters& before, const Counters& after) {
  return absl::StrCat(UsageDeltas("ctl_", before.children, after.children),
                      " daemon_cpu_s ",
                      after.server_cpu_seconds - before.server_cpu_seconds, " ",
                      SystemDeltas(before, after, ReclaimVmstat()));
}

// A libcurl fetch's counters: this process's (curl runs in it), nginx's CPU
// seconds, and what the kernel did, as for a pull.
std::string CurlDeltas(const Counters& before, const Counters& after) {
  return absl::StrCat(UsageDeltas("", before.self, after.self), " nginx_cpu_s ",
                      after.server_cpu_seconds - before.server_cpu_seconds, " ",
                      SystemDeltas(before, after, ReclaimVmstat()));
}

}  // namespace

std::string CreateTmpfsDir() {
  const std::string& dir = TmpfsPath();
  if (mkdir(dir.c_str(), 0755) != 0 && errno != EEXIST)
    Die("cannot create " + dir);
  static const bool registered = std::atexit(RemoveTmpfsDir) == 0;
  if (!registered) Die("atexit");
  return dir;
}

PullToFileSamples MeasurePullToFile(const Config& config, const Child& daemon,
                                    const std::string& model,
                                    const Child& nginx,
                                    const std::string& tmpfs_dir, int reps) {
  const std::string served = tmpfs_dir + "/served.safetensors";
  const std::string pulled = tmpfs_dir + "/pulled.safetensors";
  const std::string curled = tmpfs_dir + "/curled.safetensors";
  Pull(config, daemon.port, model, served);  // Also the warm-up.
  // The pull verified every tensor's checksum; the file must also parse.
  Check(ReadSafetensorsFile(served), "read the pulled file");
  const uint64_t bytes = FileSize(served);
  CurlFetcher curl(absl::StrCat("http://127.0.0.1:", nginx.port,
                                "/tmpfs/served.safetensors"));
  const std::function<void()> transfers[2] = {
      [&] { Pull(config, daemon.port, model, pulled); },
      [&] {
        if (curl.FetchToFile(curled) != bytes) Die("curl: short fetch");
      }};
  const std::string outputs[2] = {pulled, curled};
  const char* const ids[2] = {"P3", "P3.c"};
  const DescribeDeltas describe[2] = {PullDeltas, CurlDeltas};
  const pid_t servers[2] = {daemon.pid, nginx.pid};
  transfers[1]();  // Warm-up.
  CheckSameBytes(curled, served);
  std::remove(curled.c_str());
  std::fprintf(stderr, "P3: %d repetitions\n", reps);
  PullToFileSamples samples;
  std::vector<double>* into[2] = {&samples.modelstatectl, &samples.nginx};
  for (int rep = 0; rep < reps; ++rep) {
    for (int i = 0; i < 2; ++i) {
      const int next = (i + rep) % 2;
      into[next]->push_back(SampleWithCounters(
          ids[next], [&] { return TimedGBps(bytes, transfers[next]); },
          describe[next], servers[next]));
      CheckSameBytes(outputs[next], served);
      std::remove(outputs[next].c_str());
    }
  }
  std::remove(served.c_str());
  return samples;
}

void AddPullToFileRows(PullToFileSamples samples, Results& results) {
  results.Add("P3", "modelstatectl pull to a file on tmpfs", "GB/s",
              std::move(samples.modelstatectl));
  results.Add("P3.c", "nginx sendfile -> libcurl to a file on the same tmpfs",
              "GB/s", std::move(samples.nginx));
}

void AddPullToFileRatio(Results& results) {
  results.AddRatio("P3/c", "P3 / nginx to tmpfs", "P3", "P3.c", AtLeast(1.0));
}

int RunPullToFileOnly(const Config& config) {
  mkdir(config.work_dir.c_str(), 0755);
  const Plan plan = MakePlan(config);
  const std::string file = ModelFile(config.work_dir, 16, plan.model_bytes);
  const std::string tmpfs_dir = CreateTmpfsDir();
  Child daemon = StartEmptyDaemon(config);
  Child nginx = StartNginx(config.work_dir, tmpfs_dir);
  {
    auto client = Check(
        Client::Connect(absl::StrCat("127.0.0.1:", daemon.port)), "connect");
    LoadMainAsTrainer(*client, file);
  }
  // The load's tensors went to this process's pool of freed storage, which
  // neither contender uses (a pull is another process, curl writes with
  // stdio): return that memory to the kernel rather than hold it idle.
  Storage::SetPoolLimit(0);
  Storage::SetPoolLimit(Storage::kDefaultPoolLimitBytes);
  Results results;
  AddPullToFileRows(
      MeasurePullToFile(config, daemon, "main", nginx, tmpfs_dir, plan.reps),
      results);
  Stop(nginx);
  Stop(daemon);
  AddPullToFileRatio(results);
  PrintAndWrite(results, config.out);
  return 0;
}

}  // namespace modelstate::bench

#include "bench/shared_memory.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
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

// MADV_POPULATE_READ (Linux 5.14), which older C libraries do not name.
constexpr int kPopulateRead = 22;

// What the zero-copy fetch cannot beat on this host: a sealed memfd holding
// the model's bytes, mapped copy-on-write with every page faulted in for
// reading (what the client does with the daemon's export), and a copy of the
// same bytes into fresh memory (what a fetch that copies must at least do).
class PhysicalFloor {
 public:
  explicit PhysicalFloor(const StateDict& state) : bytes_(state.TotalBytes()) {
    fd_ = memfd_create("p9-floor", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (fd_ < 0 || ftruncate(fd_, static_cast<off_t>(bytes_)) != 0)
      Fail("cannot make the P9 floor's memfd");
    uint64_t at = 0;
    for (const StateDict::Entry& entry : state.entries()) {
      const Tensor& tensor = entry.tensor;
      if (pwrite(fd_, tensor.data(), tensor.num_bytes(),
                 static_cast<off_t>(at)) !=
          static_cast<ssize_t>(tensor.num_bytes()))
        Fail("cannot fill the P9 floor's memfd");
      at += tensor.num_bytes();
    }
    fcntl(fd_, F_ADD_SEALS, F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW);
    source_ = static_cast<uint8_t*>(
        mmap(nullptr, bytes_, PROT_READ, MAP_SHARED | MAP_POPULATE, fd_, 0));
    if (source_ == MAP_FAILED) Fail("cannot map the P9 floor's memfd");
  }
  ~PhysicalFloor() {
    munmap(source_, bytes_);
    close(fd_);
  }
  PhysicalFloor(const PhysicalFloor&) = delete;
  PhysicalFloor& operator=(const PhysicalFloor&) = delete;

  // Maps, populates and unmaps the memfd; GB/s.
  double TimedMapping() const {
    const double start = Seconds();
    void* mapped =
        mmap(nullptr, bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd_, 0);
    if (mapped == MAP_FAILED) Fail("cannot map the P9 floor");
    madvise(mapped, bytes_, kPopulateRead);
    munmap(mapped, bytes_);
    return GBps(bytes_, Seconds() - start);
  }

  // Copies the bytes into fresh anonymous memory, freed inside the timing;
  // GB/s.
  double TimedCopy() const {
    const double start = Seconds();
    void* fresh = mmap(nullptr, bytes_, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (fresh == MAP_FAILED) Fail("cannot allocate the P9 copy");
    std::memcpy(fresh, source_, bytes_);
    munmap(fresh, bytes_);
    return GBps(bytes_, Seconds() - start);
  }

 private:
  static void Fail(const char* what) {
    std::fprintf(stderr, "%s: %s\n", what, std::strerror(errno));
    std::exit(1);
  }

  uint64_t bytes_;
  int fd_ = -1;
  uint8_t* source_ = nullptr;
};

}  // namespace

SharedMemorySamples MeasureSharedMemory(Client& tcp, Client& local,
                                        const std::string& model, int reps) {
  SharedMemorySamples samples;
  const PhysicalFloor floor(Check(tcp.Fetch(model), "P9 floor's bytes").state);
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
      samples.mapping.push_back(floor.TimedMapping());
      samples.shared_memory.push_back(timed(local));
      samples.copy.push_back(floor.TimedCopy());
      samples.tcp.push_back(timed(tcp));
    } else {
      samples.tcp.push_back(timed(tcp));
      samples.copy.push_back(floor.TimedCopy());
      samples.shared_memory.push_back(timed(local));
      samples.mapping.push_back(floor.TimedMapping());
    }
  }
  return samples;
}

void AddSharedMemoryRows(SharedMemorySamples samples, Results& results) {
  results.Add("P9.shm", "same-host shared-memory fetch (Client::StateDict)",
              "GB/s", std::move(samples.shared_memory));
  results.Add("P9.tcp", "TCP fetch of the same model (Client::StateDict)",
              "GB/s", std::move(samples.tcp));
  results.Add("P9.map",
              "map a sealed memfd of the model's bytes copy-on-write and "
              "fault it in (the zero-copy floor)",
              "GB/s", std::move(samples.mapping));
  results.Add("P9.copy",
              "copy the model's bytes into fresh memory (the floor of a "
              "copying fetch)",
              "GB/s", std::move(samples.copy));
  results.AddRatio("P9", "shared-memory fetch / its floor (P9.map)", "P9.shm",
                   "P9.map", AtLeast(0.8));
  results.AddRatio("P9.vs_tcp", "shared-memory fetch / TCP fetch", "P9.shm",
                   "P9.tcp", std::nullopt);
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

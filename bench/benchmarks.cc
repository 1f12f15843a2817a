#include "bench/benchmarks.h"

#include <cstdio>
#include <functional>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "bench/common.h"
#include "bench/pull_to_file.h"
#include "bench/shared_memory.h"

namespace modelstate::bench {
namespace {

// Fetches into fresh tensors; returns their bytes.
uint64_t FetchModelstate(Client& client,
                         const modelstate::FetchRequest& request) {
  FetchedStateDict fetched = Check(client.Fetch(request), "fetch");
  return fetched.state.TotalBytes();
}

std::string FileName(const std::string& path) {
  return path.substr(path.rfind('/') + 1);
}

std::vector<std::string> DaemonArgs(const Config& config,
                                    const ModelFiles& files) {
  std::vector<std::string> args = {config.daemon,
                                   "--listen=127.0.0.1:0",
                                   "--demo_model=",
                                   "--log_rpcs=false",
                                   "--preload=main=" + files.main,
                                   "--preload=many=" + files.many,
                                   "--preload=small=" + files.small};
  args.push_back("--local_socket=" + LocalSocketPath(config.work_dir));  // P9
  return args;
}

// P6 with `fetchers` concurrent fetchers, each on its own connection.
FanOutSamples MeasureFetchers(Bench& bench, int fetchers) {
  std::vector<std::unique_ptr<Client>> clients;
  for (int i = 0; i < fetchers; ++i) {
    ClientOptions own;
    own.own_connection = true;
    clients.push_back(
        Check(Client::Connect(bench.lean_target, own), "connect"));
  }
  std::fprintf(stderr, "P6 with %d fetchers: %d repetitions\n", fetchers,
               bench.plan.reps);
  FanOutSamples samples;
  for (int rep = 0; rep < bench.plan.reps; ++rep) {
    ResetPeakRss(bench.servers.lean.pid);
    samples.aggregate.push_back(TimedGBps(bench.tensor_bytes * fetchers, [&] {
      std::vector<std::thread> threads;
      for (int i = 0; i < fetchers; ++i) {
        threads.emplace_back([&, i] {
          Check(
              clients[i]->FetchStreaming("main", {},
                                         [](const TensorDescription&, Tensor) {
                                           return absl::OkStatus();
                                         }),
              "streaming fetch");
        });
      }
      for (auto& thread : threads) thread.join();
    }));
    samples.peak_rss.push_back(
        static_cast<double>(PeakRssBytes(bench.servers.lean.pid)) /
        bench.tensor_bytes);
  }
  return samples;
}

}  // namespace

ModelFiles PrepareModelFiles(const Plan& plan, const std::string& dir) {
  std::fprintf(stderr, "preparing model files in %s\n", dir.c_str());
  ModelFiles files;
  files.main = ModelFile(dir, 16, plan.model_bytes);
  files.many = ModelFile(dir, plan.many_tensors, plan.model_bytes);
  files.small = ModelFile(dir, 1, 4096);
  for (uint64_t size : plan.sizes)
    files.by_size[size] = ModelFile(dir, 16, size);
  return files;
}

Servers::Servers(const Config& config, const ModelFiles& files)
    : tmpfs_dir(CreateTmpfsDir()) {
  daemon = Spawn(DaemonArgs(config, files), 2, "serving on port ");
  lean = Spawn({config.daemon, "--listen=127.0.0.1:0", "--demo_model=",
                "--log_rpcs=false", "--preload=main=" + files.main},
               2, "serving on port ");
  tcp = Spawn({config.self, "serve-tcp", files.main}, 1, "PORT ");
  naive = Spawn({config.self, "serve-naive", files.main}, 1, "PORT ");
  nginx = StartNginx(config.work_dir, tmpfs_dir);
}

Servers::~Servers() {
  Stop(lean);
  Stop(nginx);
  Stop(tcp);
  Stop(naive);
  Stop(daemon);
}

Bench::Bench(const Config& config, const Plan& plan, const ModelFiles& files)
    : config(config),
      plan(plan),
      servers(config, files),
      lean_target(absl::StrCat("127.0.0.1:", servers.lean.port)),
      client(Check(
          Client::Connect(absl::StrCat("127.0.0.1:", servers.daemon.port)),
          "connect")),
      lean_client(Check(Client::Connect(lean_target), "connect")),
      local_client(SharedMemoryOnlyClient(LocalSocketPath(config.work_dir))),
      tcp(servers.tcp.port),
      naive(servers.naive.port),
      nginx(absl::StrCat("http://127.0.0.1:", servers.nginx.port, "/",
                         FileName(files.main))),
      main_file(files.main),
      main_state(Check(ReadSafetensorsFile(files.main), "read model file")),
      file_bytes(FileSize(files.main)) {
  // Load the weights into the daemon as a trainer would, so the model lives in
  // anonymous memory rather than in the page cache of its preload file, which
  // the kernel's proactive reclaim on this kind of machine evicts between
  // repetitions.
  Check(client->Load("main", main_state.tensors), "load main");
  tensor_bytes = FetchModelstate(*client, "main");
}

FetchSamples MeasureFetches(Bench& bench) {
  struct Contender {
    std::vector<double>* samples;
    uint64_t bytes;
    std::function<void()> fetch;
  };
  FetchSamples samples;
  modelstate::FetchRequest bf16("main");
  bf16.dtype = DType::kBFloat16;
  const uint64_t file_bytes = bench.file_bytes;
  const std::vector<Contender> contenders = {
      {&samples.naive_grpc, file_bytes,
       [&] {
         bench.naive.Fetch(file_bytes);
         ReleaseFreshBuffer();  // Inside the timing, as the others do.
       }},
      {&samples.nginx, file_bytes, [&] { bench.nginx.Fetch(file_bytes); }},
      {&samples.cast_bf16, bench.tensor_bytes,
       [&] { FetchModelstate(*bench.client, bf16); }},
  };
  bench.naive.Fetch(file_bytes);  // warm-ups
  ReleaseFreshBuffer();
  bench.nginx.Fetch(file_bytes);
  std::fprintf(stderr, "P1.b/P1.c/P8: %d repetitions\n", bench.plan.reps);
  for (int rep = 0; rep < bench.plan.reps; ++rep) {
    for (size_t i = 0; i < contenders.size(); ++i) {
      const Contender& next = contenders[(i + rep) % contenders.size()];
      next.samples->push_back(TimedGBps(next.bytes, next.fetch));
    }
  }
  return samples;
}

std::vector<double> MeasureManyTensors(Bench& bench) {
  FetchModelstate(*bench.client, "many");
  std::fprintf(stderr, "P5: %d repetitions\n", bench.plan.reps);
  std::vector<double> samples;
  for (int rep = 0; rep < bench.plan.reps; ++rep) {
    samples.push_back(TimedGBps(
        bench.tensor_bytes, [&] { FetchModelstate(*bench.client, "many"); }));
  }
  return samples;
}

std::vector<FanOutSamples> MeasureFanOut(Bench& bench) {
  FetchModelstate(*bench.lean_client, "main");  // page the model in
  std::vector<FanOutSamples> samples;
  for (int fetchers : bench.plan.fan_out)
    samples.push_back(MeasureFetchers(bench, fetchers));
  return samples;
}

PushSamples MeasurePush(Bench& bench) {
  const std::string push_bytes = ReadWholeFile(bench.main_file);
  const pid_t lean = bench.servers.lean.pid;
  std::fprintf(stderr, "P4: %d repetitions\n", bench.plan.reps);
  PushSamples samples;
  for (int rep = 0; rep < bench.plan.reps; ++rep) {
    ResetPeakRss(lean);
    samples.modelstate.push_back(TimedGBps(bench.tensor_bytes, [&] {
      Check(bench.lean_client->Load("main", bench.main_state.tensors), "push");
    }));
    samples.peak_rss.push_back(static_cast<double>(PeakRssBytes(lean)) /
                               bench.tensor_bytes);
    samples.raw_tcp.push_back(
        TimedGBps(push_bytes.size(), [&] { bench.tcp.Push(push_bytes); }));
  }
  return samples;
}

LatencySamples MeasureLatency(Bench& bench) {
  modelstate::FetchRequest by_key("small");
  by_key.keys = {"layers.0.weight"};
  LatencySamples samples;
  // Blocks of 100 calls of each kind, alternating, so that both see the same
  // conditions.
  for (int block = 0; block < bench.plan.latency_calls / 100; ++block) {
    for (int i = 0; i < 100; ++i) {
      const double start = Seconds();
      FetchModelstate(*bench.client, by_key);
      samples.fetch.push_back((Seconds() - start) * 1e6);
    }
    for (int i = 0; i < 100; ++i) {
      const double start = Seconds();
      Check(bench.client->CheckHealth(), "health");
      samples.empty.push_back((Seconds() - start) * 1e6);
    }
  }
  return samples;
}

}  // namespace modelstate::bench

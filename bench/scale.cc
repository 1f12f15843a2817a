// modelstate_scale_bench: replication on loopback (docs/scale.md). One primary
// and 1, 2 and 4 followers (modelstated --follow), all on 127.0.0.1:
// - S1: propagation delay of an update that changes every tensor, from the
//   primary's commit to the last follower's commit (watch events, one clock);
// - S2: the same for an update that changes one tensor of 16 (delta sync);
// - S3: per-hop delay in a chain primary -> A -> B;
// - S4: aggregate fetch throughput of 16 fetchers spread over the followers,
//   against 16 fetchers on the primary alone (S4.0).
//
//   modelstate_scale_bench [--quick] [--reps=N] [--out=PREFIX]
//
// Every figure is min-median-max of the repetitions; --out writes PREFIX.md and
// PREFIX.json. bench/scale.sh builds and runs it.
#include <signal.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "bench/child_process.h"
#include "bench/common.h"
#include "bench/results.h"
#include "client/client.h"
#include "model/tensor.h"

namespace modelstate::bench {
namespace {

constexpr char kModel[] = "scale";
constexpr int kTensors = 16;
constexpr absl::Duration kSyncTimeout = absl::Seconds(600);

struct ScaleConfig {
  std::string daemon = MODELSTATED_PATH;
  uint64_t model_bytes = kGiB;
  int reps = 5;
  int fetchers = 16;
  std::vector<int> follower_counts = {1, 2, 4};
  std::string out;
};

std::unique_ptr<Client> Connect(int port) {
  ClientOptions options;
  options.own_connection = true;
  options.timeout = kSyncTimeout;
  return Check(Client::Connect(absl::StrCat("127.0.0.1:", port), options),
               "connect");
}

Child StartDaemon(const ScaleConfig& config, const std::string& follow) {
  std::vector<std::string> argv = {config.daemon, "--listen=127.0.0.1:0",
                                   "--demo_model=", "--log_rpcs=false",
                                   "--memory_limit_bytes=0"};
  if (!follow.empty()) argv.push_back("--follow=" + follow);
  return Spawn(std::move(argv), 2, "serving on port ");
}

// The model's tensors; an update replaces the first `changed` of them with new
// random bytes derived from `seed` and keeps the others as they are.
class ModelState {
 public:
  explicit ModelState(uint64_t bytes)
      : elements_(static_cast<int64_t>(bytes / kTensors / 4)),
        tensors_(kTensors) {}

  StateDict Update(int changed, uint64_t seed) {
    for (int i = 0; i < changed; ++i) tensors_[i] = Random(seed, i);
    StateDict state;
    for (int i = 0; i < kTensors; ++i) {
      state.Set(absl::StrCat("layers.", i, ".weight"), tensors_[i]);
    }
    return state;
  }

 private:
  Tensor Random(uint64_t seed, int index) const {
    TensorBuilder builder =
        Check(TensorBuilder::CreateUninitialized(DType::kFloat32, {elements_}),
              "allocate");
    uint64_t x = seed * 0x9E3779B97F4A7C15ull + index + 1;
    auto* words = builder.mutable_data_as<uint64_t>();
    for (size_t w = 0; w < builder.num_bytes() / 8; ++w) {
      x ^= x << 13, x ^= x >> 7, x ^= x << 17;  // xorshift64
      words[w] = x & 0x3FFFFFFF3FFFFFFFull;     // finite floats
    }
    return std::move(builder).Build();
  }

  int64_t elements_;
  std::vector<Tensor> tensors_;
};

// Records when each daemon's watch reports each version of the model, on one
// monotonic clock.
class CommitClock {
 public:
  void Watch(int port) {
    std::shared_ptr<Client> client = Connect(port);
    watchers_.emplace_back([this, client, port] {
      const absl::Status status = client->Watch(
          kModel, [&](const ModelEvent& event) { return Record(port, event); },
          &canceller_);
      if (!status.ok() && !canceller_.cancelled()) {
        Die("watch on port " + std::to_string(port) + ": " + status.ToString());
      }
    });
  }
  // Seconds when `port` reached `version`; waits for it (bounded).
  double WhenReached(int port, int64_t version) {
    absl::MutexLock lock(&mu_);
    const auto reached = [&] { return times_.count({port, version}) > 0; };
    if (!mu_.AwaitWithTimeout(absl::Condition(&reached), kSyncTimeout)) {
      Die(absl::StrCat("port ", port, " never reached version ", version));
    }
    return times_[{port, version}];
  }
  // Ends every watch; call before stopping the daemons watched.
  void Stop() {
    canceller_.Cancel();
    for (std::thread& watcher : watchers_) watcher.join();
    watchers_.clear();
  }
  ~CommitClock() { Stop(); }

 private:
  bool Record(int port, const ModelEvent& event) {
    absl::MutexLock lock(&mu_);
    times_.emplace(std::make_pair(port, event.version), Seconds());
    return true;
  }

  CallCanceller canceller_;
  absl::Mutex mu_;
  std::map<std::pair<int, int64_t>, double> times_ ABSL_GUARDED_BY(mu_);
  std::vector<std::thread> watchers_;
};

// Pushes `state` to the primary and returns, per follower, the seconds from
// the primary's commit to the follower's.
std::vector<double> Propagate(Client& primary, int primary_port,
                              const std::vector<int>& follower_ports,
                              CommitClock& clock, const StateDict& state) {
  LoadRequest request(kModel);
  const LoadOutcome outcome = Check(primary.Load(request, state), "push");
  const double committed = clock.WhenReached(primary_port, outcome.version);
  std::vector<double> delays;
  for (int port : follower_ports) {
    delays.push_back(clock.WhenReached(port, outcome.version) - committed);
  }
  return delays;
}

// One round: `fetchers` clients each fetch the whole model once from the
// daemons at `ports` (client i from ports[i % size]); returns aggregate GB/s.
double FetchRound(const std::vector<std::unique_ptr<Client>>& clients,
                  uint64_t model_bytes) {
  const double start = Seconds();
  std::vector<std::thread> threads;
  for (const std::unique_ptr<Client>& client : clients) {
    threads.emplace_back([&client] {
      Check(client->FetchStreaming(FetchRequest(kModel), {},
                                   [](const TensorDescription&, Tensor) {
                                     return absl::OkStatus();
                                   }),
            "fetch");
    });
  }
  for (std::thread& thread : threads) thread.join();
  return GBps(model_bytes * clients.size(), Seconds() - start);
}

std::vector<double> FanOut(const ScaleConfig& config,
                           const std::vector<int>& ports) {
  std::vector<std::unique_ptr<Client>> clients;
  for (int i = 0; i < config.fetchers; ++i) {
    clients.push_back(Connect(ports[i % ports.size()]));
  }
  std::vector<double> samples;
  for (int rep = 0; rep < config.reps; ++rep) {
    samples.push_back(FetchRound(clients, config.model_bytes));
  }
  return samples;
}

void Collect(const std::string& id, const std::string& figure,
             const std::vector<double>& samples, const char* unit,
             Results& results) {
  results.Add(id, figure, unit, samples);
  const Summary summary = Summarize(samples);
  std::fprintf(stderr, "%-6s %-62s %8.3f [%8.3f .. %8.3f] %s\n", id.c_str(),
               figure.c_str(), summary.median, summary.min, summary.max, unit);
}

// S1, S2 and S4 with `count` followers of the primary.
void MeasureFollowers(const ScaleConfig& config, int count, Child& primary,
                      ModelState& model, uint64_t& seed, Results& results) {
  std::vector<Child> followers;
  std::vector<int> ports;
  for (int i = 0; i < count; ++i) {
    followers.push_back(
        StartDaemon(config, absl::StrCat("127.0.0.1:", primary.port)));
    ports.push_back(followers.back().port);
  }
  std::unique_ptr<Client> client = Connect(primary.port);
  CommitClock clock;
  clock.Watch(primary.port);
  for (int port : ports) clock.Watch(port);
  std::vector<double> full, one;
  for (int rep = 0; rep < config.reps; ++rep) {
    std::vector<double> delays = Propagate(*client, primary.port, ports, clock,
                                           model.Update(kTensors, ++seed));
    full.push_back(*std::max_element(delays.begin(), delays.end()));
    delays =
        Propagate(*client, primary.port, ports, clock, model.Update(1, ++seed));
    one.push_back(*std::max_element(delays.begin(), delays.end()));
  }
  const std::string n = std::to_string(count);
  Collect("S1." + n,
          absl::StrCat("propagation, every tensor changed, ", n,
                       " follower(s), to the last"),
          full, "s", results);
  Collect("S2." + n,
          absl::StrCat("propagation, 1 of 16 tensors changed, ", n,
                       " follower(s), to the last"),
          one, "s", results);
  Collect("S4." + n,
          absl::StrCat(config.fetchers, " fetchers over ", n,
                       " follower(s): aggregate"),
          FanOut(config, ports), "GB/s", results);
  clock.Stop();
  for (Child& follower : followers) Stop(follower);
}

// S3: primary -> A -> B; the delay of each hop for a full update.
void MeasureChain(const ScaleConfig& config, Child& primary, ModelState& model,
                  uint64_t& seed, Results& results) {
  Child a = StartDaemon(config, absl::StrCat("127.0.0.1:", primary.port));
  Child b = StartDaemon(config, absl::StrCat("127.0.0.1:", a.port));
  std::unique_ptr<Client> client = Connect(primary.port);
  CommitClock clock;
  clock.Watch(primary.port);
  clock.Watch(a.port);
  clock.Watch(b.port);
  std::vector<double> first, second;
  for (int rep = 0; rep < config.reps; ++rep) {
    const std::vector<double> delays =
        Propagate(*client, primary.port, {a.port, b.port}, clock,
                  model.Update(kTensors, ++seed));
    first.push_back(delays[0]);
    second.push_back(delays[1] - delays[0]);
  }
  Collect("S3.1", "chain: primary -> A, every tensor changed", first, "s",
          results);
  Collect("S3.2", "chain: A -> B, every tensor changed", second, "s", results);
  clock.Stop();
  Stop(a);
  Stop(b);
}

int Run(const ScaleConfig& config) {
  Child primary = StartDaemon(config, "");
  ModelState model(config.model_bytes);
  uint64_t seed = 1;
  std::unique_ptr<Client> client = Connect(primary.port);
  LoadRequest create(kModel);
  create.create_if_missing = true;
  Check(client->Load(create, model.Update(kTensors, seed)), "create");
  Results results;
  Collect("S4.0",
          absl::StrCat(config.fetchers, " fetchers on the primary alone"),
          FanOut(config, {primary.port}), "GB/s", results);
  for (int count : config.follower_counts) {
    MeasureFollowers(config, count, primary, model, seed, results);
  }
  MeasureChain(config, primary, model, seed, results);
  Stop(primary);
  PrintAndWrite(results, config.out);
  return 0;
}

bool ParseFlags(int argc, char** argv, ScaleConfig& config) {
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--quick") {
      config.model_bytes = 64 * kMiB;
      config.reps = 2;
      config.fetchers = 4;
      config.follower_counts = {1, 2};
    } else if (arg.rfind("--reps=", 0) == 0) {
      config.reps = std::max(1, std::atoi(arg.c_str() + 7));
    } else if (arg.rfind("--out=", 0) == 0) {
      config.out = arg.substr(6);
    } else {
      return false;
    }
  }
  return true;
}

}  // namespace
}  // namespace modelstate::bench

int main(int argc, char** argv) {
  signal(SIGPIPE, SIG_IGN);
  modelstate::bench::ScaleConfig config;
  if (!modelstate::bench::ParseFlags(argc, argv, config)) {
    std::fprintf(stderr,
                 "usage: modelstate_scale_bench [--quick] [--reps=N] "
                 "[--out=PREFIX]\n");
    return 2;
  }
  return modelstate::bench::Run(config);
}

// The benchmarks: the processes under test, connections to them, and one
// function per benchmark that returns its samples (docs/performance.md names
// them P1 to P10).
#ifndef MODELSTATE_BENCH_BENCHMARKS_H_
#define MODELSTATE_BENCH_BENCHMARKS_H_

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "bench/child_process.h"
#include "bench/naive_grpc.h"
#include "bench/nginx.h"
#include "bench/plan.h"
#include "bench/raw_tcp.h"
#include "client/client.h"
#include "model/safetensors.h"

namespace modelstate::bench {

// The model files every server loads (written once into the work directory).
struct ModelFiles {
  std::string main;   // 16 tensors of plan.model_bytes in all
  std::string many;   // the same bytes as plan.many_tensors tensors
  std::string small;  // one 4 KiB tensor
  std::map<uint64_t, std::string> by_size;  // 16 tensors of each plan size
};

ModelFiles PrepareModelFiles(const Plan& plan, const std::string& dir);

// The processes under test, started by the constructor (which dies if one does
// not come up) and stopped by the destructor.
struct Servers {
  Servers(const Config& config, const ModelFiles& files);
  ~Servers();
  Servers(const Servers&) = delete;
  Servers& operator=(const Servers&) = delete;

  Child daemon;  // modelstated with every model
  Child lean;    // modelstated with only the main model, so its RSS is that
                 // model's alone
  Child tcp;     // contender (a): bench/raw_tcp.h
  Child naive;   // contender (b): bench/naive_grpc.h
  Child nginx;   // contender (c): bench/nginx.h, also serving tmpfs_dir
  std::string tmpfs_dir;  // P3's files (bench/pull_to_file.h), on tmpfs
};

// Everything a benchmark needs. The constructor starts the servers, connects to
// them and loads the main model into the daemon; the destructor disconnects,
// then stops the servers.
struct Bench {
  Bench(const Config& config, const Plan& plan, const ModelFiles& files);

  const Config& config;
  const Plan& plan;
  Servers servers;
  std::string lean_target;
  std::unique_ptr<Client> client;       // to servers.daemon
  std::unique_ptr<Client> lean_client;  // to servers.lean
  // to servers.daemon through its local socket only (P9)
  std::unique_ptr<Client> local_client;
  RawTcpClient tcp;
  NaiveGrpcClient naive;
  CurlFetcher nginx;
  std::string main_file;
  SafetensorsFile main_state;  // the main model's file, read
  uint64_t file_bytes = 0;     // its size: what the contenders send
  uint64_t tensor_bytes = 0;   // its tensors' bytes: what modelstate sends
};

// P1.b, P1.c and P8, in GB/s: the main model fetched by the naive gRPC
// contender, by nginx, and by modelstate cast to bfloat16 (counting source
// bytes); the three alternate, each repetition in a rotated order. (P1 and
// P1.a are bench/fresh_fetch.h's.)
struct FetchSamples {
  std::vector<double> naive_grpc, nginx, cast_bf16;
};
FetchSamples MeasureFetches(Bench& bench);

// P5.many, in GB/s: the same bytes as many small tensors.
std::vector<double> MeasureManyTensors(Bench& bench);

// P6, one entry per plan.fan_out: concurrent streaming fetchers of the lean
// daemon's model, aggregate GB/s, and that daemon's peak RSS / model bytes.
struct FanOutSamples {
  std::vector<double> aggregate, peak_rss;
};
std::vector<FanOutSamples> MeasureFanOut(Bench& bench);

// P4 and RSS.load: pushes of the main model to the lean daemon in GB/s with
// its peak RSS / model bytes, alternating with raw TCP pushes in GB/s.
struct PushSamples {
  std::vector<double> modelstate, raw_tcp, peak_rss;
};
PushSamples MeasurePush(Bench& bench);

// P7: the latency of every call, in microseconds, of a fetch of one 4 KiB
// tensor by key and of an empty unary RPC (health Check).
struct LatencySamples {
  std::vector<double> fetch, empty;
};
LatencySamples MeasureLatency(Bench& bench);

}  // namespace modelstate::bench

#endif  // MODELSTATE_BENCH_BENCHMARKS_H_

// Contender (b): the obvious gRPC weight server (bench/naive.proto), a sync
// server stream copying the file into 1 MiB `bytes` messages, and its client.
#ifndef MODELSTATE_BENCH_NAIVE_GRPC_H_
#define MODELSTATE_BENCH_NAIVE_GRPC_H_

#include <cstdint>
#include <memory>
#include <string>

#include "bench/naive.grpc.pb.h"

namespace modelstate::bench {

// Child mode `serve-naive FILE`: serves FILE's bytes, printing "PORT <n>" on
// stdout once it listens. Returns when the server shuts down.
int ServeNaive(const std::string& file);

// A client of a ServeNaive server. Dies on any error. Thread-safe like a gRPC
// stub.
class NaiveGrpcClient {
 public:
  explicit NaiveGrpcClient(int port);

  // Receives the server's stream into fresh memory of `expected` bytes (dies if
  // it is longer); returns the bytes received.
  uint64_t Fetch(uint64_t expected);

 private:
  std::unique_ptr<Naive::Stub> stub_;
};

}  // namespace modelstate::bench

#endif  // MODELSTATE_BENCH_NAIVE_GRPC_H_

// One log line per RPC on stderr: method, model, bytes, duration, status.
#ifndef MODELSTATE_SERVER_RPC_LOG_H_
#define MODELSTATE_SERVER_RPC_LOG_H_

#include <cstdint>
#include <string>

#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "grpcpp/support/status.h"

namespace modelstate {

class Metrics;

// Collects what one RPC did; Log() writes it and counts it in `metrics`. Not
// thread-safe (one per RPC).
class RpcRecord {
 public:
  // `metrics` may be null.
  RpcRecord(const char* method, bool log, Metrics* metrics)
      : method_(method), enabled_(log), metrics_(metrics) {}

  void set_model(std::string model) { model_ = std::move(model); }
  const std::string& model() const { return model_; }
  void add_bytes(uint64_t bytes) { bytes_ += bytes; }

  // Writes "rpc=<method> model=<model> bytes=<n> duration_ms=<ms> status=<CODE>
  // [msg]" when logging is on, and records the RPC in the metrics.
  void Log(const grpc::Status& status) const;

 private:
  const char* method_;
  bool enabled_;
  Metrics* metrics_;
  std::string model_;
  uint64_t bytes_ = 0;
  absl::Time start_ = absl::Now();
};

// The canonical name of a gRPC status code ("NOT_FOUND").
const char* StatusCodeName(grpc::StatusCode code);

}  // namespace modelstate

#endif  // MODELSTATE_SERVER_RPC_LOG_H_

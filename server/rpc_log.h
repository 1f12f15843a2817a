// One log line per RPC on stderr: method, model, bytes, duration, status.
// Strings that come from a request are escaped and cut short on every log
// line (EscapeForLog, common/log_field.h), so that no request can forge a
// line or flood the log.
#ifndef MODELSTATE_SERVER_RPC_LOG_H_
#define MODELSTATE_SERVER_RPC_LOG_H_

#include <cstddef>
#include <cstdint>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/log_field.h"
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
  // [message="<msg>"]" when logging is on (the model as LogField shows it, the
  // message escaped and cut to kMaxLoggedMessageBytes), and records the RPC in
  // the metrics.
  void Log(const grpc::Status& status) const;

 private:
  const char* method_;
  bool enabled_;
  Metrics* metrics_;
  std::string model_;
  uint64_t bytes_ = 0;
  absl::Time start_ = absl::Now();
};

// At most `per_second` events a second pass; the rest are counted, so that a
// flood of refused calls costs the logs a bounded number of lines.
// Thread-safe.
class LogRateLimit {
 public:
  explicit LogRateLimit(int per_second) : per_second_(per_second) {}
  // True when this event may be logged. When a new second begins, sets
  // `*suppressed` to how many were not logged in the seconds before (else 0).
  bool Allow(int64_t* suppressed);

 private:
  const int per_second_;
  absl::Mutex mu_;
  absl::Time window_start_ ABSL_GUARDED_BY(mu_) = absl::InfinitePast();
  int in_window_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t suppressed_ ABSL_GUARDED_BY(mu_) = 0;
};

// The canonical name of a gRPC status code ("NOT_FOUND").
const char* StatusCodeName(grpc::StatusCode code);

}  // namespace modelstate

#endif  // MODELSTATE_SERVER_RPC_LOG_H_

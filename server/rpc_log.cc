#include "server/rpc_log.h"

#include <algorithm>
#include <cstdio>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "server/metrics.h"

namespace modelstate {

const char* StatusCodeName(grpc::StatusCode code) {
  static const char* const kNames[] = {"OK",
                                       "CANCELLED",
                                       "UNKNOWN",
                                       "INVALID_ARGUMENT",
                                       "DEADLINE_EXCEEDED",
                                       "NOT_FOUND",
                                       "ALREADY_EXISTS",
                                       "PERMISSION_DENIED",
                                       "RESOURCE_EXHAUSTED",
                                       "FAILED_PRECONDITION",
                                       "ABORTED",
                                       "OUT_OF_RANGE",
                                       "UNIMPLEMENTED",
                                       "INTERNAL",
                                       "UNAVAILABLE",
                                       "DATA_LOSS",
                                       "UNAUTHENTICATED"};
  const int index = static_cast<int>(code);
  return index >= 0 && index < 17 ? kNames[index] : "UNKNOWN";
}

void RpcRecord::Log(const grpc::Status& status) const {
  const absl::Duration duration = absl::Now() - start_;
  if (metrics_ != nullptr)
    metrics_->RecordRpc(method_, status.error_code(), bytes_, duration);
  if (!enabled_) return;
  std::string line = absl::StrFormat(
      "rpc=%s model=%s bytes=%d duration_ms=%.3f status=%s", method_,
      LogField(model_), bytes_, absl::ToDoubleMilliseconds(duration),
      StatusCodeName(status.error_code()));
  if (!status.ok()) {
    absl::StrAppend(
        &line, " message=\"",
        EscapeForLog(status.error_message(), kMaxLoggedMessageBytes), "\"");
  }
  line += "\n";
  std::fwrite(line.data(), 1, line.size(), stderr);
}

bool LogRateLimit::Allow(int64_t* suppressed) {
  *suppressed = 0;
  const absl::Time now = absl::Now();
  absl::MutexLock lock(&mu_);
  if (now - window_start_ >= absl::Seconds(1)) {
    window_start_ = now;
    in_window_ = 0;
    *suppressed = suppressed_;
    suppressed_ = 0;
  }
  if (in_window_ < per_second_) {
    ++in_window_;
    return true;
  }
  ++suppressed_;
  return false;
}

}  // namespace modelstate

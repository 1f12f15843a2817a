#include "server/rpc_log.h"

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
  std::string line =
      absl::StrFormat("rpc=%s model=%s bytes=%d duration_ms=%.3f status=%s",
                      method_, model_.empty() ? "-" : model_, bytes_,
                      absl::ToDoubleMilliseconds(duration),
                      StatusCodeName(status.error_code()));
  if (!status.ok()) {
    std::string message = status.error_message().substr(0, 200);
    for (char& c : message) {
      if (c == '\n' || c == '\t') c = ' ';
    }
    absl::StrAppend(&line, " message=\"", message, "\"");
  }
  line += "\n";
  std::fwrite(line.data(), 1, line.size(), stderr);
}

}  // namespace modelstate

#include "server/rpc_log.h"

#include <algorithm>
#include <cstdio>

#include "absl/strings/ascii.h"
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

std::string EscapeForLog(absl::string_view text, size_t max_bytes) {
  std::string escaped;
  for (char c : text.substr(0, max_bytes)) {
    const auto byte = static_cast<unsigned char>(c);
    if (c == '"' || c == '\\') {
      escaped.push_back('\\');
      escaped.push_back(c);
    } else if (c == '\n') {
      escaped += "\\n";
    } else if (c == '\r') {
      escaped += "\\r";
    } else if (c == '\t') {
      escaped += "\\t";
    } else if (byte >= 0x20 && byte < 0x7F) {
      escaped.push_back(c);
    } else {
      absl::StrAppend(&escaped, absl::StrFormat("\\x%02x", byte));
    }
  }
  if (text.size() > max_bytes)
    absl::StrAppend(&escaped, "...(", text.size(), " bytes)");
  return escaped;
}

std::string LogField(absl::string_view text) {
  if (text.empty()) return "-";
  const bool plain =
      text.size() <= kMaxLoggedNameBytes &&
      std::all_of(text.begin(), text.end(), [](char c) {
        return absl::ascii_isalnum(static_cast<unsigned char>(c)) ||
               absl::string_view("._-:/[]@+%").find(c) !=
                   absl::string_view::npos;
      });
  if (plain) return std::string(text);
  return absl::StrCat("\"", EscapeForLog(text, kMaxLoggedNameBytes), "\"");
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

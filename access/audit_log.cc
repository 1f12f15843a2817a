#include "access/audit_log.h"

#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "common/log_field.h"

namespace modelstate {

std::string FormatAuditLine(const AuditEntry& entry, absl::Time time) {
  // The model name comes from the request: escaped, cut short and quoted so
  // that no name can forge a line or flood the log.
  return absl::StrFormat(
      "audit: time=%s principal=%s action=%s model=\"%s\" version=%d "
      "bytes=%d status=%s peer=%s\n",
      absl::FormatTime(absl::RFC3339_full, time, absl::UTCTimeZone()),
      LogField(entry.principal), ActionName(entry.action),
      EscapeForLog(entry.model, kMaxLoggedNameBytes), entry.version,
      entry.bytes, absl::StatusCodeToString(entry.code), LogField(entry.peer));
}

absl::StatusOr<std::unique_ptr<AuditLog>> AuditLog::Open(
    const std::string& path) {
  if (path == "-")
    return std::unique_ptr<AuditLog>(new AuditLog(stderr, false));
  std::FILE* file = std::fopen(path.c_str(), "a");
  if (file == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(
        "cannot open audit log ", path, ": ", std::strerror(errno)));
  }
  return std::unique_ptr<AuditLog>(new AuditLog(file, true));
}

AuditLog::~AuditLog() {
  absl::MutexLock lock(&mu_);
  if (owned_) std::fclose(file_);
}

void AuditLog::Record(const AuditEntry& entry) {
  const std::string line = FormatAuditLine(entry, absl::Now());
  absl::MutexLock lock(&mu_);
  std::fwrite(line.data(), 1, line.size(), file_);
  std::fflush(file_);
}

}  // namespace modelstate

// The audit log: one line per write (LoadStateDict, LoadStateDict+create,
// RollbackModel, CreateModel, DeleteModel), refused ones included, apart from
// the RPC log:
//   audit: time=<RFC 3339> principal=<name> action=<RPC> model="<name>"
//   version=<n> bytes=<n> status=<CODE> peer=<address>
// The model name is escaped and cut as EscapeForLog does (common/log_field.h).
//
// Thread-safety: an AuditLog may be written from any thread; FormatAuditLine
// is a pure function.
#ifndef MODELSTATE_ACCESS_AUDIT_LOG_H_
#define MODELSTATE_ACCESS_AUDIT_LOG_H_

#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "access/access_policy.h"

namespace modelstate {

// What one audit line records.
struct AuditEntry {
  std::string principal;  // "-" when the caller was not authenticated.
  Action action = Action::kLoadStateDict;
  std::string model;
  int64_t version = 0;  // The version written (deleted, for a delete).
  uint64_t bytes = 0;   // Tensor bytes of that version (received, loads).
  absl::StatusCode code = absl::StatusCode::kOk;  // How the call ended.
  std::string peer;
};

// The line for `entry` written at `time`, with its newline.
std::string FormatAuditLine(const AuditEntry& entry, absl::Time time);

class AuditLog {
 public:
  // "-" writes to stderr; anything else is a file opened for appending
  // (InvalidArgument naming the file when it cannot be opened).
  static absl::StatusOr<std::unique_ptr<AuditLog>> Open(
      const std::string& path);
  ~AuditLog();
  AuditLog(const AuditLog&) = delete;
  AuditLog& operator=(const AuditLog&) = delete;

  // Writes and flushes the line of `entry`, time-stamped now.
  void Record(const AuditEntry& entry);

 private:
  AuditLog(std::FILE* file, bool owned) : file_(file), owned_(owned) {}
  absl::Mutex mu_;
  std::FILE* file_ ABSL_GUARDED_BY(mu_);
  const bool owned_;
};

}  // namespace modelstate

#endif  // MODELSTATE_ACCESS_AUDIT_LOG_H_

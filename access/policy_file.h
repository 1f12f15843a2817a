// The access policy of a file (--auth_policy), kept current: re-read when
// asked (SIGHUP) and when the file changes (inode, size or modification time,
// polled). A policy that fails to parse leaves the previous one in force.
//
// Thread-safety: every method may be called from any thread. Callers keep the
// principal they were admitted with across a reload.
#ifndef MODELSTATE_ACCESS_POLICY_FILE_H_
#define MODELSTATE_ACCESS_POLICY_FILE_H_

#include <cstdint>
#include <memory>
#include <string>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "access/access_policy.h"

namespace modelstate {

class PolicyFile {
 public:
  // Loads `path` (the error of AccessPolicy::LoadFile if it does not parse)
  // and polls it every `poll_interval` (infinite: never; InvalidArgument when
  // not positive).
  static absl::StatusOr<std::unique_ptr<PolicyFile>> Open(
      const std::string& path, absl::Duration poll_interval);
  ~PolicyFile();
  PolicyFile(const PolicyFile&) = delete;
  PolicyFile& operator=(const PolicyFile&) = delete;

  // Re-reads the file now. On error the previous policy stays; the error is
  // returned and logged, as is a successful reload.
  absl::Status Reload();

  // Who presented `credentials`, under the policy in force (Unauthenticated
  // with the reason in `*failure` otherwise; see AccessPolicy::Authenticate).
  absl::StatusOr<Principal> Authenticate(const CallerCredentials& credentials,
                                         AuthFailure* failure) const;

  const std::string& path() const { return path_; }

 private:
  // What stat says of the file; a change of any field means a new file.
  struct FileStamp {
    uint64_t device = 0, inode = 0;
    int64_t size = -1, mtime_ns = 0, ctime_ns = 0;
    bool operator==(const FileStamp& other) const;
  };
  PolicyFile(std::string path, absl::Duration poll_interval);
  static FileStamp StampOf(const std::string& path);
  void Poll();

  const std::string path_;
  const absl::Duration poll_interval_;
  mutable absl::Mutex mu_;
  std::shared_ptr<const AccessPolicy> policy_ ABSL_GUARDED_BY(mu_);
  FileStamp loaded_ ABSL_GUARDED_BY(mu_);
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::thread poller_;
};

}  // namespace modelstate

#endif  // MODELSTATE_ACCESS_POLICY_FILE_H_

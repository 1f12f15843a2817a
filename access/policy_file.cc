#include "access/policy_file.h"

#include <sys/stat.h>

#include <cstdio>
#include <utility>

namespace modelstate {

bool PolicyFile::FileStamp::operator==(const FileStamp& other) const {
  return device == other.device && inode == other.inode && size == other.size &&
         mtime_ns == other.mtime_ns && ctime_ns == other.ctime_ns;
}

PolicyFile::PolicyFile(std::string path, absl::Duration poll_interval)
    : path_(std::move(path)), poll_interval_(poll_interval) {}

absl::StatusOr<std::unique_ptr<PolicyFile>> PolicyFile::Open(
    const std::string& path, absl::Duration poll_interval) {
  if (poll_interval <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError(
        "the auth policy poll interval must be positive");
  }
  const FileStamp stamp = StampOf(path);
  absl::StatusOr<AccessPolicy> policy = AccessPolicy::LoadFile(path);
  if (!policy.ok()) return policy.status();
  std::unique_ptr<PolicyFile> file(new PolicyFile(path, poll_interval));
  {
    absl::MutexLock lock(&file->mu_);
    file->policy_ = std::make_shared<const AccessPolicy>(*std::move(policy));
    file->loaded_ = stamp;
  }
  if (poll_interval != absl::InfiniteDuration()) {
    PolicyFile* raw = file.get();
    file->poller_ = std::thread([raw] { raw->Poll(); });
  }
  return file;
}

PolicyFile::~PolicyFile() {
  {
    absl::MutexLock lock(&mu_);
    stop_ = true;
  }
  if (poller_.joinable()) poller_.join();
}

PolicyFile::FileStamp PolicyFile::StampOf(const std::string& path) {
  FileStamp stamp;
  struct stat info;
  // stat follows symlinks: a Kubernetes Secret volume swaps a symlink, which
  // changes the inode seen here.
  if (stat(path.c_str(), &info) != 0) return stamp;
  stamp.device = info.st_dev;
  stamp.inode = info.st_ino;
  stamp.size = info.st_size;
  stamp.mtime_ns = info.st_mtim.tv_sec * 1000000000LL + info.st_mtim.tv_nsec;
  stamp.ctime_ns = info.st_ctim.tv_sec * 1000000000LL + info.st_ctim.tv_nsec;
  return stamp;
}

absl::Status PolicyFile::Reload() {
  // Stamp first: a change made while reading is seen by the next poll.
  const FileStamp stamp = StampOf(path_);
  absl::StatusOr<AccessPolicy> policy = AccessPolicy::LoadFile(path_);
  absl::MutexLock lock(&mu_);
  // A failed reload records the stamp too, so that a broken file is reported
  // once, not at every poll; fixing it changes the stamp again.
  loaded_ = stamp;
  if (!policy.ok()) {
    std::fprintf(stderr,
                 "modelstated: auth policy not reloaded, the previous one "
                 "stays in force: %s\n",
                 std::string(policy.status().message()).c_str());
    return policy.status();
  }
  const size_t principals = policy->size();
  policy_ = std::make_shared<const AccessPolicy>(*std::move(policy));
  std::fprintf(stderr,
               "modelstated: auth policy reloaded from %s (%zu principals)\n",
               path_.c_str(), principals);
  return absl::OkStatus();
}

void PolicyFile::Poll() {
  absl::MutexLock lock(&mu_);
  while (!mu_.AwaitWithTimeout(absl::Condition(&stop_), poll_interval_)) {
    const FileStamp loaded = loaded_;
    mu_.Unlock();
    if (!(StampOf(path_) == loaded)) Reload().IgnoreError();  // Logged.
    mu_.Lock();
  }
}

absl::StatusOr<Principal> PolicyFile::Authenticate(
    const CallerCredentials& credentials, AuthFailure* failure) const {
  std::shared_ptr<const AccessPolicy> policy;
  {
    absl::MutexLock lock(&mu_);
    policy = policy_;
  }
  return policy->Authenticate(credentials, failure);
}

}  // namespace modelstate

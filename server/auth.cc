#include "server/auth.h"

#include <sys/stat.h>

#include <cerrno>
#include <cstring>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "grpc/grpc_security_constants.h"
#include "server/rpc_log.h"

namespace modelstate {
namespace {

std::vector<std::string> PropertyValues(const grpc::AuthContext& auth,
                                        const char* name) {
  std::vector<std::string> values;
  for (const grpc::string_ref& value : auth.FindPropertyValues(name))
    values.emplace_back(value.data(), value.size());
  return values;
}

}  // namespace

CertificateNames CertificateNamesOf(const grpc::AuthContext* auth) {
  CertificateNames names;
  // Only a certificate the TLS handshake verified against --tls_client_ca
  // makes the peer authenticated; its names are then the CA's word.
  // The names are taken by type, never from the flattened SAN list, so that
  // a common name that spells a URI cannot pass for a URI name.
  if (auth == nullptr || !auth->IsPeerAuthenticated()) return names;
  names.common_names = PropertyValues(*auth, GRPC_X509_CN_PROPERTY_NAME);
  names.dns = PropertyValues(*auth, GRPC_PEER_DNS_PROPERTY_NAME);
  names.uris = PropertyValues(*auth, GRPC_PEER_URI_PROPERTY_NAME);
  names.emails = PropertyValues(*auth, GRPC_PEER_EMAIL_PROPERTY_NAME);
  names.ips = PropertyValues(*auth, GRPC_PEER_IP_PROPERTY_NAME);
  return names;
}

CallerCredentials CredentialsOf(const grpc::ServerContextBase& context) {
  CallerCredentials credentials;
  const auto& metadata = context.client_metadata();
  const auto range = metadata.equal_range("authorization");
  for (auto it = range.first; it != range.second; ++it)
    credentials.authorization.emplace_back(it->second.data(),
                                           it->second.size());
  credentials.certificate = CertificateNamesOf(context.auth_context().get());
  return credentials;
}

const std::string& Caller::name() const {
  static const std::string* const kAnonymous = new std::string("anonymous");
  return principal_ ? principal_->name() : *kAnonymous;
}

bool Caller::CanRead(absl::string_view model) const {
  return !principal_ || principal_->CanRead(model);
}

absl::Status Caller::Authorize(Action action, absl::string_view model) const {
  if (!principal_) return absl::OkStatus();
  return modelstate::Authorize(*principal_, action, model);
}

bool AccessControl::FileStamp::operator==(const FileStamp& other) const {
  return device == other.device && inode == other.inode && size == other.size &&
         mtime_ns == other.mtime_ns && ctime_ns == other.ctime_ns;
}

AccessControl::AccessControl(std::string path, absl::Duration poll_interval)
    : path_(std::move(path)), poll_interval_(poll_interval) {}

absl::StatusOr<std::unique_ptr<AccessControl>> AccessControl::Open(
    const std::string& path, absl::Duration poll_interval) {
  if (poll_interval <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError(
        "the auth policy poll interval must be positive");
  }
  const FileStamp stamp = StampOf(path);
  absl::StatusOr<AccessPolicy> policy = AccessPolicy::LoadFile(path);
  if (!policy.ok()) return policy.status();
  std::unique_ptr<AccessControl> control(
      new AccessControl(path, poll_interval));
  {
    absl::MutexLock lock(&control->mu_);
    control->policy_ = std::make_shared<const AccessPolicy>(*std::move(policy));
    control->loaded_ = stamp;
  }
  if (poll_interval != absl::InfiniteDuration()) {
    AccessControl* raw = control.get();
    control->poller_ = std::thread([raw] { raw->Poll(); });
  }
  return control;
}

AccessControl::~AccessControl() {
  {
    absl::MutexLock lock(&mu_);
    stop_ = true;
  }
  if (poller_.joinable()) poller_.join();
}

AccessControl::FileStamp AccessControl::StampOf(const std::string& path) {
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

absl::Status AccessControl::Reload() {
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

void AccessControl::Poll() {
  absl::MutexLock lock(&mu_);
  while (!mu_.AwaitWithTimeout(absl::Condition(&stop_), poll_interval_)) {
    const FileStamp loaded = loaded_;
    mu_.Unlock();
    if (!(StampOf(path_) == loaded)) Reload().IgnoreError();  // Logged.
    mu_.Lock();
  }
}

absl::StatusOr<Principal> AccessControl::Authenticate(
    const CallerCredentials& credentials, AuthFailure* failure) const {
  std::shared_ptr<const AccessPolicy> policy;
  {
    absl::MutexLock lock(&mu_);
    policy = policy_;
  }
  return policy->Authenticate(credentials, failure);
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

void AuditLog::Record(const Entry& entry) {
  // The model name comes from the request: escaped, cut short and quoted so
  // that no name can forge a line or flood the log.
  const std::string line = absl::StrFormat(
      "audit: time=%s principal=%s action=%s model=\"%s\" version=%d "
      "bytes=%d status=%s peer=%s\n",
      absl::FormatTime(absl::RFC3339_full, absl::Now(), absl::UTCTimeZone()),
      LogField(entry.principal), ActionName(entry.action),
      EscapeForLog(entry.model, kMaxLoggedNameBytes), entry.version,
      entry.bytes, StatusCodeName(entry.code), LogField(entry.peer));
  absl::MutexLock lock(&mu_);
  std::fwrite(line.data(), 1, line.size(), file_);
  std::fflush(file_);
}

bool IsWrite(Action action) { return RequiredRole(action) >= Role::kWrite; }

bool IsLoopbackListen(const std::string& listen) {
  const size_t colon = listen.rfind(':');
  std::string host =
      listen.substr(0, colon == std::string::npos ? listen.size() : colon);
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']')
    host = host.substr(1, host.size() - 2);
  return host == "localhost" || host == "::1" || absl::StartsWith(host, "127.");
}

}  // namespace modelstate

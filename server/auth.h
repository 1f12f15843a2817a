// Transport glue of authentication and authorization: credentials out of a
// gRPC call, the policy file kept current (SIGHUP and file changes), and the
// audit log of writes. The decisions themselves are access/access_policy's.
#ifndef MODELSTATE_SERVER_AUTH_H_
#define MODELSTATE_SERVER_AUTH_H_

#include <cstdint>
#include <cstdio>
#include <memory>
#include <optional>
#include <string>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "access/access_policy.h"
#include "grpcpp/server_context.h"
#include "grpcpp/support/status.h"

namespace modelstate {

// What the caller of `context` presented: its "authorization" metadata values
// and, when the transport verified a client certificate (mTLS), the
// certificate's common name(s) and its alternative names by type.
CallerCredentials CredentialsOf(const grpc::ServerContextBase& context);

// The names of the client certificate the transport verified, by type; none
// when `auth` is null or the peer presented no verified certificate.
CertificateNames CertificateNamesOf(const grpc::AuthContext* auth);

// Who a call acts for. Without a policy every caller is "anonymous" and may
// do everything (the daemon's behaviour before policies existed).
class Caller {
 public:
  static Caller Anonymous() { return Caller(std::nullopt); }
  static Caller Of(Principal principal) { return Caller(std::move(principal)); }

  // The principal's name, "anonymous" without a policy.
  const std::string& name() const;
  // Whether the caller may read `model`: what ListModels (and any listing or
  // watch over many models) filters by.
  bool CanRead(absl::string_view model) const;
  // OK, or PermissionDenied naming the role `action` needs.
  absl::Status Authorize(Action action, absl::string_view model) const;

 private:
  explicit Caller(std::optional<Principal> principal)
      : principal_(std::move(principal)) {}
  std::optional<Principal> principal_;
};

// The policy of --auth_policy, re-read when asked (SIGHUP) and when its file
// changes (inode, size or modification time, polled). A policy that fails to
// parse leaves the previous one in force. Calls in flight keep the principal
// they were admitted with. Thread-safe.
class AccessControl {
 public:
  // Loads `path` (the error of AccessPolicy::LoadFile if it does not parse)
  // and polls it every `poll_interval` (infinite: never).
  static absl::StatusOr<std::unique_ptr<AccessControl>> Open(
      const std::string& path, absl::Duration poll_interval);
  ~AccessControl();

  // Re-reads the file now. On error the previous policy stays; the error is
  // returned and logged, as is a successful reload.
  absl::Status Reload();

  // Who presented `credentials`, under the policy in force (Unauthenticated
  // with the reason in `*failure` otherwise).
  absl::StatusOr<Principal> Authenticate(const CallerCredentials& credentials,
                                         AuthFailure* failure) const;

  const std::string& path() const { return path_; }

 private:
  struct FileStamp {
    uint64_t device = 0, inode = 0;
    int64_t size = -1, mtime_ns = 0, ctime_ns = 0;
    bool operator==(const FileStamp& other) const;
  };
  AccessControl(std::string path, absl::Duration poll_interval);
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

// One line per write (LoadStateDict, LoadStateDict+create, RollbackModel,
// CreateModel, DeleteModel), refused ones included, apart from the RPC log:
//   audit: time=<RFC 3339> principal=<name> action=<RPC> model="<name>"
//   version=<n> bytes=<n> status=<CODE> peer=<address>
// The model name is escaped and cut as EscapeForLog does (server/rpc_log.h).
// Thread-safe.
class AuditLog {
 public:
  // "-" writes to stderr; anything else is a file opened for appending.
  static absl::StatusOr<std::unique_ptr<AuditLog>> Open(
      const std::string& path);
  ~AuditLog();

  struct Entry {
    std::string principal;
    Action action = Action::kLoadStateDict;
    std::string model;
    int64_t version = 0;  // The version written (deleted, for a delete).
    uint64_t bytes = 0;   // Tensor bytes of that version (received, loads).
    grpc::StatusCode code = grpc::StatusCode::OK;
    std::string peer;
  };
  void Record(const Entry& entry);

 private:
  AuditLog(std::FILE* file, bool owned) : file_(file), owned_(owned) {}
  absl::Mutex mu_;
  std::FILE* file_ ABSL_GUARDED_BY(mu_);
  const bool owned_;
};

// True for the writes the audit log records.
bool IsWrite(Action action);

// True when `listen` ("host:port") only accepts connections from this host.
bool IsLoopbackListen(const std::string& listen);

}  // namespace modelstate

#endif  // MODELSTATE_SERVER_AUTH_H_

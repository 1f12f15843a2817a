// Who may do what to which model: an access policy maps principals (bearer
// tokens, stored as SHA-256 hashes, and client-certificate names) to roles per
// model-name glob. The server extracts a caller's credentials from its call and
// asks this policy; the decisions live here so they can be tested without a
// network.
//
// Roles are ordered: read (ListModels, GetModel, StateDict, WatchModel) <
// write (+ LoadStateDict, RollbackModel) < admin (+ CreateModel, DeleteModel,
// and a LoadStateDict that creates its model).
// The file format is documented in docs/operations.md ("Authentication and
// authorization").
//
// Thread-safety: an AccessPolicy and a Principal are immutable after
// construction; every const method may be called from any thread.
#ifndef MODELSTATE_ACCESS_ACCESS_POLICY_H_
#define MODELSTATE_ACCESS_ACCESS_POLICY_H_

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "access/credentials.h"

namespace modelstate {

enum class Role { kNone = 0, kRead = 1, kWrite = 2, kAdmin = 3 };

// "none", "read", "write", "admin".
const char* RoleName(Role role);

// What a call does; each needs a role on its model (ListModels none: it only
// needs an authenticated caller and shows the models the caller may read).
enum class Action {
  kListModels,
  kGetModel,
  kStateDict,
  kWatchModel,
  kLoadStateDict,
  kRollbackModel,
  kCreateModel,
  kDeleteModel,
  // A LoadStateDict with create_if_missing whose model does not exist: it
  // creates the model, so it needs what CreateModel needs.
  kLoadStateDictCreate,
};

// The RPC's name ("LoadStateDict"); "LoadStateDict+create" for a load that
// creates its model.
const char* ActionName(Action action);

// The least role that allows `action`.
Role RequiredRole(Action action);

// What a certificate name in a policy is, by how it is written: an IP address
// ("10.0.0.7", "fd00::7") is kIp; a name with a URI scheme ("spiffe://ml/x",
// "urn:x") kUri; one with '@' kEmail; any other (a DNS-like name) kDns.
enum class CertificateNameKind { kDns, kUri, kEmail, kIp };
CertificateNameKind CertificateNameKindOf(absl::string_view name);

// True when `certificate` carries the policy name `name`: an IP, URI or email
// name only as a subject alternative name of that type (IPs compared as
// addresses), a DNS-like name as a DNS subject alternative name or, only for
// such a name, as the common name.
bool CertificateHolds(const CertificateNames& certificate,
                      absl::string_view name);

// Why a caller was refused, for metrics.
enum class AuthFailure {
  kNone,
  kMissingCredentials,    // No token and no client certificate.
  kMalformedCredentials,  // An authorization value that is not "Bearer <t>".
  kUnknownToken,          // A well-formed token no principal holds.
  kUnknownCertificate,    // A certificate whose names no principal holds.
  kPermissionDenied,      // Authenticated, but the role is too low.
};

// "missing_credentials", "malformed_credentials", ... ("none" for kNone).
const char* AuthFailureName(AuthFailure failure);

// One grant: `role` on every model whose name matches `model_glob`.
struct RoleGrant {
  std::string model_glob;
  Role role = Role::kNone;
};

// An authenticated caller: its name (safe to log) and its grants, copied out
// of the policy so that a stream keeps the rights it started with.
class Principal {
 public:
  Principal(std::string name, std::vector<RoleGrant> grants);

  const std::string& name() const { return name_; }

  // The highest role any grant whose glob matches `model` gives; kNone if
  // none matches.
  Role RoleOn(absl::string_view model) const;

  // True when the principal may read `model` (what ListModels and a watch
  // over all models filter by).
  bool CanRead(absl::string_view model) const {
    return RoleOn(model) >= Role::kRead;
  }

 private:
  std::string name_;
  std::vector<RoleGrant> grants_;
};

// True when `name` matches `glob`: '*' matches any run of characters
// (including none, '/' and '.'), '?' exactly one; every other character
// matches itself.
bool GlobMatches(absl::string_view glob, absl::string_view name);

// The SHA-256 of `data` as 64 lowercase hex digits (what the policy stores
// for a token: `printf %s "$TOKEN" | sha256sum`).
std::string Sha256Hex(absl::string_view data);

class AccessPolicy {
 public:
  // Parses a policy document. Returns InvalidArgument naming the offending
  // place for malformed JSON, unknown keys, a bad hash, role or glob, a
  // principal without credentials, or a token hash or certificate name given
  // to two principals.
  static absl::StatusOr<AccessPolicy> Parse(absl::string_view json);

  // Reads and parses `path`; the file's read error (NotFound, ...) or Parse's,
  // prefixed with the path.
  static absl::StatusOr<AccessPolicy> LoadFile(const std::string& path);

  // Who presented `credentials`. A bearer token, when present, decides;
  // otherwise the client certificate's names. Returns Unauthenticated for
  // missing, malformed or unknown credentials (the message never contains the
  // token) and sets `*failure` (when given) to the reason. Every token hash is
  // compared in constant time, and all of them are compared.
  absl::StatusOr<Principal> Authenticate(const CallerCredentials& credentials,
                                         AuthFailure* failure = nullptr) const;

  // Number of principals, for the reload log line.
  size_t size() const { return entries_.size(); }

 private:
  struct Entry {
    std::string name;
    std::vector<std::array<uint8_t, 32>> token_hashes;
    std::vector<std::string> certificate_names;
    std::vector<RoleGrant> grants;
  };
  explicit AccessPolicy(std::vector<Entry> entries)
      : entries_(std::move(entries)) {}

  absl::StatusOr<Principal> AuthenticateToken(absl::string_view header,
                                              AuthFailure* failure) const;
  absl::StatusOr<Principal> AuthenticateCertificate(
      const CallerCredentials& credentials, AuthFailure* failure) const;

  std::vector<Entry> entries_;
};

// OK when `principal` may perform `action` on `model`; otherwise
// PermissionDenied naming the principal, its role on the model and the role
// the action needs.
absl::Status Authorize(const Principal& principal, Action action,
                       absl::string_view model);

}  // namespace modelstate

#endif  // MODELSTATE_ACCESS_ACCESS_POLICY_H_

// The one gate every call passes, whatever transport brought it: from the
// credentials a caller presented, the action it asks for and the model it
// names to the principal it acts as, or the status to answer with
// (Unauthenticated, PermissionDenied); and the audit line of every write.
// Transports only extract credentials (server/grpc_credentials.h) and
// translate the statuses returned here.
//
// Thread-safety: an AccessGate and a Caller may be used from any thread.
#ifndef MODELSTATE_ACCESS_ACCESS_GATE_H_
#define MODELSTATE_ACCESS_ACCESS_GATE_H_

#include <cstdint>
#include <functional>
#include <optional>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "access/access_policy.h"
#include "access/audit_log.h"
#include "access/credentials.h"
#include "access/policy_file.h"

namespace modelstate {

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

// True for the writes the audit log records.
bool IsWrite(Action action);

// The action of a ModelState method ("/modelstate.v1.ModelState/GetModel"),
// if it is one.
std::optional<Action> ActionOfMethod(absl::string_view method);

// True for the methods anyone may call without credentials: health checks and
// reflection ("/grpc.health.v1.Health/...", "/grpc.reflection...."), which
// stay open as the health port is.
bool IsOpenMethod(absl::string_view method);

class AccessGate {
 public:
  // Told why a call was refused (for metrics), each time one is.
  using RefusalCounter = std::function<void(AuthFailure)>;

  // `policy` null: no policy, every caller is anonymous and may do
  // everything. `audit` null: no audit lines. Both must outlive the gate.
  // `count_refusal` may be empty.
  AccessGate(PolicyFile* policy, AuditLog* audit,
             RefusalCounter count_refusal = {});

  // Whether a policy is in force (callers must present credentials).
  bool enforcing() const { return policy_ != nullptr; }

  // Who presented `credentials`: anonymous without a policy, otherwise its
  // principal, or Unauthenticated (counted, by reason).
  absl::StatusOr<Caller> Authenticate(
      const CallerCredentials& credentials) const;
  // OK when `caller` may do `action` on `model`, otherwise PermissionDenied
  // naming the role needed (counted).
  absl::Status Authorize(const Caller& caller, Action action,
                         absl::string_view model) const;
  // Both, for a call whose model is known at its start; the caller on
  // success.
  absl::StatusOr<Caller> Admit(const CallerCredentials& credentials,
                               Action action, absl::string_view model) const;

  // A call judged from its headers alone, before its request is read: OK for
  // an open method (IsOpenMethod), otherwise what Authenticate says.
  absl::Status CheckHeaders(absl::string_view method,
                            const CallerCredentials& credentials) const;

  // Admit, for a caller that presents a bare bearer token (the same-host
  // socket's requests); an empty `token` is no credentials at all.
  absl::Status AdmitToken(absl::string_view token, Action action,
                          absl::string_view model) const;

  // A load that asks to create its missing model is a create, which needs
  // the admin role. True when `caller` may create `model` that way; whoever
  // may not loads with creation off, so that the load never creates a model.
  bool MayCreateOnLoad(const Caller& caller, absl::string_view model) const;
  // For such a load that found no model: the PermissionDenied of the create
  // (counted) instead of the store's NotFound.
  absl::Status RefuseCreateOnLoad(const Caller& caller,
                                  absl::string_view model) const;

  // Writes the audit line of a write (IsWrite; other actions are not
  // audited) that ended with `code`. `caller` is null when the caller was not
  // authenticated; `version` is recorded only for a call that succeeded.
  void Audit(const Caller* caller, Action action, absl::string_view model,
             int64_t version, uint64_t bytes, absl::StatusCode code,
             absl::string_view peer) const;

 private:
  void CountRefusal(AuthFailure failure) const;

  PolicyFile* const policy_;
  AuditLog* const audit_;
  const RefusalCounter count_refusal_;
};

}  // namespace modelstate

#endif  // MODELSTATE_ACCESS_ACCESS_GATE_H_

#include "access/access_gate.h"

#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/strip.h"
#include "common/status_macros.h"

namespace modelstate {

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

bool IsWrite(Action action) { return RequiredRole(action) >= Role::kWrite; }

std::optional<Action> ActionOfMethod(absl::string_view method) {
  if (!absl::ConsumePrefix(&method, "/modelstate.v1.ModelState/"))
    return std::nullopt;
  for (Action action :
       {Action::kListModels, Action::kGetModel, Action::kStateDict,
        Action::kWatchModel, Action::kLoadStateDict, Action::kRollbackModel,
        Action::kCreateModel, Action::kDeleteModel}) {
    if (method == ActionName(action)) return action;
  }
  return std::nullopt;
}

bool IsOpenMethod(absl::string_view method) {
  return absl::StartsWith(method, "/grpc.health.v1.Health/") ||
         absl::StartsWith(method, "/grpc.reflection.");
}

AccessGate::AccessGate(PolicyFile* policy, AuditLog* audit,
                       RefusalCounter count_refusal)
    : policy_(policy),
      audit_(audit),
      count_refusal_(std::move(count_refusal)) {}

void AccessGate::CountRefusal(AuthFailure failure) const {
  if (count_refusal_) count_refusal_(failure);
}

absl::StatusOr<Caller> AccessGate::Authenticate(
    const CallerCredentials& credentials) const {
  if (policy_ == nullptr) return Caller::Anonymous();
  AuthFailure failure = AuthFailure::kNone;
  absl::StatusOr<Principal> principal =
      policy_->Authenticate(credentials, &failure);
  if (!principal.ok()) {
    CountRefusal(failure);
    return principal.status();
  }
  return Caller::Of(*std::move(principal));
}

absl::Status AccessGate::Authorize(const Caller& caller, Action action,
                                   absl::string_view model) const {
  absl::Status allowed = caller.Authorize(action, model);
  if (!allowed.ok()) CountRefusal(AuthFailure::kPermissionDenied);
  return allowed;
}

absl::StatusOr<Caller> AccessGate::Admit(const CallerCredentials& credentials,
                                         Action action,
                                         absl::string_view model) const {
  ASSIGN_OR_RETURN(Caller caller, Authenticate(credentials));
  RETURN_IF_ERROR(Authorize(caller, action, model));
  return caller;
}

absl::Status AccessGate::CheckHeaders(
    absl::string_view method, const CallerCredentials& credentials) const {
  if (IsOpenMethod(method)) return absl::OkStatus();
  return Authenticate(credentials).status();
}

absl::Status AccessGate::AdmitToken(absl::string_view token, Action action,
                                    absl::string_view model) const {
  CallerCredentials credentials;
  if (!token.empty())
    credentials.authorization.push_back(BearerAuthorization(token));
  return Admit(credentials, action, model).status();
}

bool AccessGate::MayCreateOnLoad(const Caller& caller,
                                 absl::string_view model) const {
  // Not counted as a refusal: the load may still go on, without creating.
  return caller.Authorize(Action::kLoadStateDictCreate, model).ok();
}

absl::Status AccessGate::RefuseCreateOnLoad(const Caller& caller,
                                            absl::string_view model) const {
  return Authorize(caller, Action::kLoadStateDictCreate, model);
}

void AccessGate::Audit(const Caller* caller, Action action,
                       absl::string_view model, int64_t version, uint64_t bytes,
                       absl::StatusCode code, absl::string_view peer) const {
  if (audit_ == nullptr || !IsWrite(action)) return;
  AuditEntry entry;
  entry.principal = caller != nullptr ? caller->name() : "-";
  entry.action = action;
  entry.model = std::string(model);
  entry.version = code == absl::StatusCode::kOk ? version : 0;
  entry.bytes = bytes;
  entry.code = code;
  entry.peer = std::string(peer);
  audit_->Record(entry);
}

}  // namespace modelstate

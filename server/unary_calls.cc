// The unary ModelState calls: ListModels, GetModel, CreateModel, DeleteModel,
// RollbackModel. Each is decode, one store call, encode, inside Unary (drain,
// name bounds, access, audit line, status and log line).
#include <functional>
#include <string>

#include "access/access_gate.h"
#include "common/status_macros.h"
#include "proto/convert.h"
#include "proto/grpc_status.h"
#include "server/call_support.h"
#include "server/model_state_service.h"
#include "server/rpc_log.h"

namespace modelstate {
namespace {

// What a unary call may do, who it acts for once admitted, and for writes
// what it wrote (for the audit line).
struct UnaryAccess {
  explicit UnaryAccess(Action action, absl::string_view module = {})
      : action(action), module(module) {}
  const Action action;
  const absl::string_view module;  // The request's submodule path, if any.
  Caller caller = Caller::Anonymous();
  int64_t version = 0;
  uint64_t bytes = 0;
};

// Sets `access.caller` to who calls and returns OK when the request's names
// are within bounds and that caller may do `access.action` on `model`.
// `*authenticated` tells whether the caller is known.
absl::Status AdmitUnary(ModelStateService* service,
                        const grpc::ServerContextBase& context,
                        absl::string_view model, UnaryAccess& access,
                        bool* authenticated) {
  *authenticated = false;
  RETURN_IF_ERROR(CheckRequestNames(model, access.module));
  ASSIGN_OR_RETURN(access.caller, service->Authenticate(context));
  *authenticated = true;
  return service->gate().Authorize(access.caller, access.action, model);
}

// Runs a unary call's `body` (decode, one core call, encode) unless the server
// drains, a name of the request is too long, or the caller may not do
// `access.action` on the record's model, and finishes the call with its
// status.
grpc::ServerUnaryReactor* Unary(ModelStateService* service,
                                grpc::CallbackServerContext* context,
                                RpcRecord& record, UnaryAccess& access,
                                const std::function<absl::Status()>& body) {
  ModelStateService::ActiveCall active(service);
  if (service->draining()) {
    return FinishUnary(context, record,
                       absl::UnavailableError("server shutting down"));
  }
  bool authenticated = false;
  absl::Status status =
      AdmitUnary(service, *context, record.model(), access, &authenticated);
  if (status.ok()) status = body();
  if (IsWrite(access.action)) {  // Saves reading the peer of the others.
    service->gate().Audit(authenticated ? &access.caller : nullptr,
                          access.action, record.model(), access.version,
                          access.bytes, status.code(), context->peer());
  }
  return FinishUnary(context, record, status);
}

}  // namespace

grpc::ServerUnaryReactor* ModelStateService::ListModels(
    grpc::CallbackServerContext* context, const v1::ListModelsRequest* request,
    v1::ListModelsResponse* response) {
  RpcRecord record("ListModels", options_.log_rpcs, options_.metrics);
  UnaryAccess access(Action::kListModels);
  return Unary(this, context, record, access, [&] {
    for (const ModelSummary& summary : store_->Summaries()) {
      if (access.caller.CanRead(summary.name))
        *response->add_models() = ToProto(summary);
    }
    return absl::OkStatus();
  });
}

namespace {

// GetModel's decode, core call, encode.
absl::Status DescribeModel(ModelStore* store,
                           const v1::GetModelRequest& request,
                           v1::GetModelResponse* response) {
  ASSIGN_OR_RETURN(const ModelManifest manifest,
                   store->Describe(FromProto(request)));
  *response = ToProto(manifest);
  return absl::OkStatus();
}

// A GetModel with min_version: answers once the model has reached it, from the
// waiter's thread, without holding an RPC thread meanwhile.
class DescribeAfterVersion : public grpc::ServerUnaryReactor {
 public:
  DescribeAfterVersion(ModelStateService* service,
                       grpc::CallbackServerContext* context, ModelStore* store,
                       const v1::GetModelRequest* request,
                       v1::GetModelResponse* response)
      : active_(service),
        service_(service),
        record_("GetModel", service->options().log_rpcs,
                service->options().metrics) {
    record_.set_model(request->model());
    absl::Status admitted =
        CheckRequestNames(request->model(), request->module());
    if (admitted.ok()) {
      admitted = service->Admit(*context, Action::kGetModel, request->model())
                     .status();
    }
    if (!admitted.ok()) {
      FinishWith(ToGrpcStatus(admitted));
      return;
    }
    wait_id_ = service_->version_waiter().Wait(
        request->model(), request->min_version(),
        service_->MinVersionDeadline(*context),
        [this, store, request, response](absl::Status reached) {
          if (reached.ok()) reached = DescribeModel(store, *request, response);
          FinishWith(ToGrpcStatus(reached));
        });
  }

  void OnCancel() override {
    if (wait_id_ != 0 && service_->version_waiter().Cancel(wait_id_))
      FinishWith(grpc::Status(grpc::StatusCode::CANCELLED,
                              "cancelled while waiting for min_version"));
  }

  void OnDone() override {
    if (wait_id_ != 0) service_->version_waiter().Cancel(wait_id_);
    delete this;
  }

 private:
  void FinishWith(const grpc::Status& status) {
    record_.Log(status);
    Finish(status);
  }

  ModelStateService::ActiveCall active_;
  ModelStateService* service_;
  RpcRecord record_;
  int64_t wait_id_ = 0;
};

}  // namespace

grpc::ServerUnaryReactor* ModelStateService::GetModel(
    grpc::CallbackServerContext* context, const v1::GetModelRequest* request,
    v1::GetModelResponse* response) {
  if (request->min_version() > 0 && !draining()) {
    return new DescribeAfterVersion(this, context, store_, request, response);
  }
  RpcRecord record("GetModel", options_.log_rpcs, options_.metrics);
  record.set_model(request->model());
  UnaryAccess access(Action::kGetModel, request->module());
  return Unary(this, context, record, access, [&]() -> absl::Status {
    return DescribeModel(store_, *request, response);
  });
}

grpc::ServerUnaryReactor* ModelStateService::CreateModel(
    grpc::CallbackServerContext* context, const v1::CreateModelRequest* request,
    v1::CreateModelResponse* response) {
  RpcRecord record("CreateModel", options_.log_rpcs, options_.metrics);
  record.set_model(request->model());
  UnaryAccess access(Action::kCreateModel);
  return Unary(this, context, record, access, [&]() -> absl::Status {
    ASSIGN_OR_RETURN(
        const Snapshot created,
        store_->CreateFromSpec(request->model(), request->architecture_json(),
                               request->seed()));
    const ModelSummary summary = Summarize(created);
    access.version = summary.version;
    access.bytes = summary.num_bytes;
    *response->mutable_summary() = ToProto(summary);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* ModelStateService::DeleteModel(
    grpc::CallbackServerContext* context, const v1::DeleteModelRequest* request,
    v1::DeleteModelResponse* response) {
  RpcRecord record("DeleteModel", options_.log_rpcs, options_.metrics);
  record.set_model(request->model());
  UnaryAccess access(Action::kDeleteModel);
  return Unary(this, context, record, access, [&] {
    // The audit line names the version deleted.
    Snapshot deleted;
    absl::Status status = store_->Delete(request->model(), &deleted);
    if (deleted.root != nullptr) {
      const ModelSummary summary = Summarize(deleted);
      access.version = summary.version;
      access.bytes = summary.num_bytes;
    }
    return status;
  });
}

grpc::ServerUnaryReactor* ModelStateService::RollbackModel(
    grpc::CallbackServerContext* context,
    const v1::RollbackModelRequest* request,
    v1::RollbackModelResponse* response) {
  RpcRecord record("RollbackModel", options_.log_rpcs, options_.metrics);
  record.set_model(request->model());
  UnaryAccess access(Action::kRollbackModel);
  return Unary(this, context, record, access, [&]() -> absl::Status {
    ASSIGN_OR_RETURN(const Snapshot current,
                     store_->Rollback(request->model(), request->version()));
    const ModelSummary summary = Summarize(current);
    access.version = summary.version;
    access.bytes = summary.num_bytes;
    *response->mutable_summary() = ToProto(summary);
    return absl::OkStatus();
  });
}

}  // namespace modelstate

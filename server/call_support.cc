#include "server/call_support.h"

#include <string>

#include "common/limits.h"
#include "common/status_macros.h"
#include "model/names.h"
#include "proto/grpc_status.h"

namespace modelstate {

absl::Status CheckRequestNames(absl::string_view model,
                               absl::string_view module) {
  RETURN_IF_ERROR(CheckNameSize("model name", model, kMaxModelNameLength));
  return CheckNameSize("module path", module, kMaxKeyLength);
}

absl::Status CheckRequestNames(const v1::StateDictRequest& request) {
  RETURN_IF_ERROR(CheckRequestNames(request.model(), request.module()));
  for (const std::string& key : request.keys())
    RETURN_IF_ERROR(CheckNameSize("key", key, kMaxKeyLength));
  for (const auto& [key, dtype] : request.key_dtypes())
    RETURN_IF_ERROR(CheckNameSize("key", key, kMaxKeyLength));
  return absl::OkStatus();
}

absl::Status CheckRequestNames(const v1::LoadHeader& header) {
  // Tensor keys are the store's to bound (ValidateTensorKey), before any use.
  RETURN_IF_ERROR(CheckRequestNames(header.model(), header.module()));
  for (const auto& [module, class_name] : header.class_names()) {
    RETURN_IF_ERROR(CheckNameSize("module path", module, kMaxKeyLength));
    RETURN_IF_ERROR(CheckNameSize("class name", class_name, kMaxKeyLength));
  }
  return absl::OkStatus();
}

const grpc::Status& ShuttingDown() {
  static const grpc::Status* const kStatus =
      new grpc::Status(grpc::StatusCode::UNAVAILABLE, "server shutting down");
  return *kStatus;
}

grpc::ServerUnaryReactor* FinishUnary(grpc::CallbackServerContext* context,
                                      RpcRecord& record,
                                      const absl::Status& status) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  const grpc::Status grpc_status = ToGrpcStatus(status);
  record.Log(grpc_status);
  reactor->Finish(grpc_status);
  return reactor;
}

}  // namespace modelstate

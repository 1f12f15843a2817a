// Watching models' events: one model's, or every model's.
#include "client/cancel_scope.h"
#include "client/client.h"
#include "proto/convert.h"
#include "proto/grpc_status.h"

namespace modelstate {

absl::Status Client::Watch(
    const std::string& model,
    const std::function<bool(const ModelEvent&)>& on_event,
    CallCanceller* canceller, int64_t min_version) {
  v1::WatchModelRequest request;
  request.set_model(model);
  request.set_min_version(min_version);
  return WatchWith(request, on_event, canceller);
}

absl::Status Client::WatchAll(
    const std::function<bool(const ModelEvent&)>& on_event,
    CallCanceller* canceller) {
  v1::WatchModelRequest request;
  request.set_all_models(true);
  return WatchWith(request, on_event, canceller);
}

absl::Status Client::WatchWith(
    const v1::WatchModelRequest& request,
    const std::function<bool(const ModelEvent&)>& on_event,
    CallCanceller* canceller) {
  grpc::ClientContext context;
  Prepare(&context);
  CancelScope cancel_scope(canceller, &context);
  std::unique_ptr<grpc::ClientReader<v1::WatchModelResponse>> reader =
      stub_->WatchModel(&context, request);
  v1::WatchModelResponse response;
  absl::Status stopped;  // Why we stopped reading early, if we did.
  while (reader->Read(&response)) {
    absl::StatusOr<ModelEvent> event = FromProto(response);
    if (!event.ok()) {
      stopped = absl::DataLossError(event.status().message());
    } else if (on_event(*event)) {
      continue;
    }
    context.TryCancel();
    while (reader->Read(&response)) {
    }
    reader->Finish();
    return stopped;
  }
  return FromGrpcStatus(reader->Finish());
}

}  // namespace modelstate

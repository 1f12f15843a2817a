// What every ModelState handler shares: the size checks of a request's names,
// the answer of a call that arrives while the server drains, and the end of a
// unary call (status conversion and log line).
#ifndef MODELSTATE_SERVER_CALL_SUPPORT_H_
#define MODELSTATE_SERVER_CALL_SUPPORT_H_

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "grpcpp/server_context.h"
#include "grpcpp/support/server_callback.h"
#include "grpcpp/support/status.h"
#include "modelstate/v1/model_state.pb.h"
#include "server/rpc_log.h"

namespace modelstate {

// The size bounds of a request's names, checked before anything logs, looks
// up or echoes them: InvalidArgument naming the name that is too long.
absl::Status CheckRequestNames(absl::string_view model,
                               absl::string_view module = {});
absl::Status CheckRequestNames(const v1::StateDictRequest& request);
absl::Status CheckRequestNames(const v1::LoadHeader& header);

// UNAVAILABLE "server shutting down".
const grpc::Status& ShuttingDown();

// Finishes a unary call: converts the status and writes the log line.
grpc::ServerUnaryReactor* FinishUnary(grpc::CallbackServerContext* context,
                                      RpcRecord& record,
                                      const absl::Status& status);

// A streaming reactor that refuses its call at once with UNAVAILABLE, for
// calls arriving while the server drains.
template <typename Reactor>
class Refused : public Reactor {
 public:
  Refused() { this->Finish(ShuttingDown()); }
  void OnDone() override { delete this; }
};

}  // namespace modelstate

#endif  // MODELSTATE_SERVER_CALL_SUPPORT_H_

// LoadStateDict: receives a load (header, chunks, end marker) and commits it
// atomically, or leaves the model untouched.
#ifndef MODELSTATE_SERVER_LOAD_CALL_H_
#define MODELSTATE_SERVER_LOAD_CALL_H_

#include "grpcpp/server_context.h"
#include "grpcpp/support/byte_buffer.h"
#include "grpcpp/support/server_callback.h"
#include "server/model_state_service.h"
#include "store/model_store.h"

namespace modelstate {

// A reactor that serves the LoadStateDict call on `context`, answering in
// `response`; it deletes itself when the call is done. `service` and `store`
// must outlive it.
grpc::ServerReadReactor<grpc::ByteBuffer>* NewLoadReactor(
    ModelStateService* service, grpc::CallbackServerContext* context,
    ModelStore* store, grpc::ByteBuffer* response);

}  // namespace modelstate

#endif  // MODELSTATE_SERVER_LOAD_CALL_H_

// StateDict: streams a snapshot (manifest, chunks, end marker) with one write
// in flight.
#ifndef MODELSTATE_SERVER_FETCH_CALL_H_
#define MODELSTATE_SERVER_FETCH_CALL_H_

#include "grpcpp/server_context.h"
#include "grpcpp/support/byte_buffer.h"
#include "grpcpp/support/server_callback.h"
#include "server/model_state_service.h"
#include "store/model_store.h"

namespace modelstate {

// A reactor that serves the StateDict call `raw_request` on `context`; it
// deletes itself when the call is done. `service` and `store` must outlive it.
grpc::ServerWriteReactor<grpc::ByteBuffer>* NewStateDictReactor(
    ModelStateService* service, grpc::CallbackServerContext* context,
    ModelStore* store, const grpc::ByteBuffer& raw_request);

}  // namespace modelstate

#endif  // MODELSTATE_SERVER_FETCH_CALL_H_

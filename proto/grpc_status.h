// The one place where core statuses become gRPC statuses.
#ifndef MODELSTATE_PROTO_GRPC_STATUS_H_
#define MODELSTATE_PROTO_GRPC_STATUS_H_

#include "absl/status/status.h"
#include "grpcpp/support/status.h"

namespace modelstate {

// Maps `status` to the gRPC status with the same code (the numbering is
// shared). Messages longer than 3 KiB are cut, with a note of how much was cut,
// so they fit in HTTP/2 trailers.
grpc::Status ToGrpcStatus(const absl::Status& status);

// The inverse, for clients.
absl::Status FromGrpcStatus(const grpc::Status& status);

}  // namespace modelstate

#endif  // MODELSTATE_PROTO_GRPC_STATUS_H_

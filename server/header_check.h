// Refusing a call from its headers alone. gRPC reads a unary (or
// server-streaming) call's whole request message, up to the largest message
// allowed, before any handler runs; a caller without credentials could make
// the daemon buffer that much per stream. Credentials made here run a check
// on each call's headers in gRPC's own authentication step, which comes
// before the first message is read: a refused call costs no more than its
// headers.
//
// Thread-safety: the check is called from gRPC's threads, concurrently.
#ifndef MODELSTATE_SERVER_HEADER_CHECK_H_
#define MODELSTATE_SERVER_HEADER_CHECK_H_

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "grpcpp/security/auth_context.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/support/status.h"

namespace modelstate {

// Decides whether a call may go on: OK, or the status it ends with. Gets the
// call's method ("/package.Service/Method"), the values of its
// "authorization" metadata and, over TLS, the connection's auth context (null
// over plaintext).
using HeaderCheck = std::function<grpc::Status(
    const std::string& method, const std::vector<std::string>& authorization,
    const grpc::AuthContext* peer)>;

// Credentials for a listening port that run `check` on every call's headers:
// `tls` (SslServerCredentials) when given, plaintext when null.
std::shared_ptr<grpc::ServerCredentials> CheckingHeaders(
    std::shared_ptr<grpc::ServerCredentials> tls, HeaderCheck check);

}  // namespace modelstate

#endif  // MODELSTATE_SERVER_HEADER_CHECK_H_

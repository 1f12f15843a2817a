// What a gRPC caller presented, as the plain credentials the access gate
// (access/access_gate.h) judges: its "authorization" metadata and the names of
// the client certificate its transport verified.
#ifndef MODELSTATE_SERVER_GRPC_CREDENTIALS_H_
#define MODELSTATE_SERVER_GRPC_CREDENTIALS_H_

#include "access/credentials.h"
#include "grpcpp/security/auth_context.h"
#include "grpcpp/server_context.h"

namespace modelstate {

// What the caller of `context` presented: its "authorization" metadata values
// and, when the transport verified a client certificate (mTLS), the
// certificate's common name(s) and its alternative names by type.
CallerCredentials CredentialsOf(const grpc::ServerContextBase& context);

// The names of the client certificate the transport verified, by type; none
// when `auth` is null or the peer presented no verified certificate.
CertificateNames CertificateNamesOf(const grpc::AuthContext* auth);

}  // namespace modelstate

#endif  // MODELSTATE_SERVER_GRPC_CREDENTIALS_H_

#include "server/grpc_credentials.h"

#include <string>
#include <vector>

#include "grpc/grpc_security_constants.h"

namespace modelstate {
namespace {

std::vector<std::string> PropertyValues(const grpc::AuthContext& auth,
                                        const char* name) {
  std::vector<std::string> values;
  for (const grpc::string_ref& value : auth.FindPropertyValues(name))
    values.emplace_back(value.data(), value.size());
  return values;
}

}  // namespace

CertificateNames CertificateNamesOf(const grpc::AuthContext* auth) {
  CertificateNames names;
  // Only a certificate the TLS handshake verified against --tls_client_ca
  // makes the peer authenticated; its names are then the CA's word.
  // The names are taken by type, never from the flattened SAN list, so that
  // a common name that spells a URI cannot pass for a URI name.
  if (auth == nullptr || !auth->IsPeerAuthenticated()) return names;
  names.common_names = PropertyValues(*auth, GRPC_X509_CN_PROPERTY_NAME);
  names.dns = PropertyValues(*auth, GRPC_PEER_DNS_PROPERTY_NAME);
  names.uris = PropertyValues(*auth, GRPC_PEER_URI_PROPERTY_NAME);
  names.emails = PropertyValues(*auth, GRPC_PEER_EMAIL_PROPERTY_NAME);
  names.ips = PropertyValues(*auth, GRPC_PEER_IP_PROPERTY_NAME);
  return names;
}

CallerCredentials CredentialsOf(const grpc::ServerContextBase& context) {
  CallerCredentials credentials;
  const auto& metadata = context.client_metadata();
  const auto range = metadata.equal_range("authorization");
  for (auto it = range.first; it != range.second; ++it)
    credentials.authorization.emplace_back(it->second.data(),
                                           it->second.size());
  credentials.certificate = CertificateNamesOf(context.auth_context().get());
  return credentials;
}

}  // namespace modelstate

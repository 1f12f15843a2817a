// What a caller presents, as plain values a transport fills in: the values of
// its "authorization" metadata, the names of its verified client certificate.
// The "Bearer <token>" form of an authorization value is common/bearer.h's.
//
// Thread-safety: plain values and pure functions.
#ifndef MODELSTATE_ACCESS_CREDENTIALS_H_
#define MODELSTATE_ACCESS_CREDENTIALS_H_

#include <optional>
#include <string>
#include <vector>

#include "absl/strings/string_view.h"
#include "common/bearer.h"

namespace modelstate {

// The names of a client certificate the transport verified (mTLS), each kind
// apart: a policy's name is matched only against the kind it is written as
// (CertificateNameKindOf), so that a common name spelling a URI is never taken
// for a URI subject alternative name.
struct CertificateNames {
  std::vector<std::string> common_names;  // Subject CN(s).
  // Subject alternative names by type.
  std::vector<std::string> dns;
  std::vector<std::string> uris;  // SPIFFE IDs among them.
  std::vector<std::string> emails;
  std::vector<std::string> ips;  // As text ("10.0.0.7", "fd00::7").

  bool empty() const {
    return common_names.empty() && dns.empty() && uris.empty() &&
           emails.empty() && ips.empty();
  }
};

// What a caller presented, as the transport saw it. Secrets in here (the
// authorization values) must never be logged.
struct CallerCredentials {
  // Every value of the call's "authorization" metadata.
  std::vector<std::string> authorization;
  // Of a client certificate the transport verified; empty without one.
  CertificateNames certificate;
};

}  // namespace modelstate

#endif  // MODELSTATE_ACCESS_CREDENTIALS_H_

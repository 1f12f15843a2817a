// The "Bearer <token>" form of an authorization value (RFC 6750), written by
// the client and read by the access gate: here and nowhere else.
//
// Thread-safety: pure functions.
#ifndef MODELSTATE_COMMON_BEARER_H_
#define MODELSTATE_COMMON_BEARER_H_

#include <optional>
#include <string>

#include "absl/strings/string_view.h"

namespace modelstate {

// The authorization value that presents `token`: "Bearer <token>".
std::string BearerAuthorization(absl::string_view token);

// The token of an authorization value "Bearer <token>" (RFC 6750: the scheme
// in any case, one space, then a token of printable ASCII without spaces), or
// nullopt when `authorization` is not of that form. The token is a view into
// `authorization`.
std::optional<absl::string_view> BearerTokenOf(absl::string_view authorization);

}  // namespace modelstate

#endif  // MODELSTATE_COMMON_BEARER_H_

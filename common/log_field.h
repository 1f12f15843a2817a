// Strings that come from a request, made safe for a log line: escaped and cut
// short, so that no request can forge a line or flood the log. Shared by the
// audit log and the server's RPC log.
//
// Thread-safety: pure functions.
#ifndef MODELSTATE_COMMON_LOG_FIELD_H_
#define MODELSTATE_COMMON_LOG_FIELD_H_

#include <cstddef>
#include <string>

#include "absl/strings/string_view.h"
#include "common/limits.h"

namespace modelstate {

// The most bytes of a request's name (a model name: every valid one whole) and
// of a status message that a log line shows.
inline constexpr size_t kMaxLoggedNameBytes = kMaxModelNameLength;
inline constexpr size_t kMaxLoggedMessageBytes = 200;

// `text` made safe for one log line: printable ASCII stays as it is, except
// '"' and '\\' (escaped as \" and \\); newline, carriage return and tab become
// \n, \r and \t, and every other byte \xNN. Only the first `max_bytes` bytes
// are shown, followed by "...(<size> bytes)" when `text` is longer, so a line
// is bounded whatever the request held.
std::string EscapeForLog(absl::string_view text, size_t max_bytes);

// A log field without spaces: `text` itself when it is 1 to
// kMaxLoggedNameBytes bytes of letters, digits and ._-:/[]@+% (every valid
// model name, principal and peer address), "-" when empty, and otherwise
// EscapeForLog(text, kMaxLoggedNameBytes) in double quotes.
std::string LogField(absl::string_view text);

}  // namespace modelstate

#endif  // MODELSTATE_COMMON_LOG_FIELD_H_

// The one rule for names of tensors and modules, on every path that stores
// them: loads, models created from tensors, architecture specs.
//
// A member name (one component of a key) is 1 or more bytes of valid UTF-8
// with no control character (U+0000-U+001F, U+007F) and no '.'. Anything else
// is allowed, as torch allows it: '/', spaces, any Unicode letter. A key is
// member names joined by '.', at most kMaxKeyLength bytes and
// kMaxKeyComponents components (common/limits.h).
#ifndef MODELSTATE_MODEL_NAMES_H_
#define MODELSTATE_MODEL_NAMES_H_

#include <cstddef>
#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"

namespace modelstate {

// Strict UTF-8 (no overlong forms, no surrogates, nothing above U+10FFFF).
bool IsValidUtf8(absl::Span<const uint8_t> s);
bool IsValidUtf8(absl::string_view s);

// The size check of a name that arrives in a request (a model name, module
// path or key), made before the name is logged, looked up or echoed: OK when
// `name` is at most `max_bytes` long, otherwise InvalidArgument naming `what`
// ("model name"), the size and the bound, without the name itself (it may be
// huge or hostile).
absl::Status CheckNameSize(absl::string_view what, absl::string_view name,
                           size_t max_bytes);

// Returns OK if `name` can name a parameter, buffer or child; InvalidArgument
// saying why not otherwise.
absl::Status ValidateMemberName(absl::string_view name);

// `text` in double quotes for an error message, cut after 80 bytes (with its
// length), so that hostile input does not make a huge message.
std::string QuotedForMessage(absl::string_view text);

// InvalidArgument when `key` is longer than kMaxKeyLength or has more than
// kMaxKeyComponents dotted components.
absl::Status CheckKeyLimits(absl::string_view key);

// Returns OK for a dotted state-dict key of valid member names within the
// length and component limits; InvalidArgument naming the rule otherwise.
absl::Status ValidateTensorKey(absl::string_view key);

}  // namespace modelstate

#endif  // MODELSTATE_MODEL_NAMES_H_

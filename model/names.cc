#include "model/names.h"

#include <algorithm>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/limits.h"
#include "common/status_macros.h"

namespace modelstate {
// Long names in messages are cut: a hostile 100,000-byte key does not become a
// 100,000-byte error.
std::string QuotedForMessage(absl::string_view text) {
  constexpr size_t kShown = 80;
  if (text.size() <= kShown) return absl::StrCat("\"", text, "\"");
  return absl::StrCat("\"", text.substr(0, kShown), "...\" (", text.size(),
                      " bytes)");
}

// Strict UTF-8 (no overlong forms, no surrogates, nothing above U+10FFFF).
bool IsValidUtf8(absl::Span<const uint8_t> s) {
  size_t i = 0;
  while (i < s.size()) {
    const uint8_t c = s[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    int extra;
    uint32_t min;
    uint32_t cp;
    if ((c & 0xE0) == 0xC0) {
      extra = 1, min = 0x80, cp = c & 0x1F;
    } else if ((c & 0xF0) == 0xE0) {
      extra = 2, min = 0x800, cp = c & 0x0F;
    } else if ((c & 0xF8) == 0xF0) {
      extra = 3, min = 0x10000, cp = c & 0x07;
    } else {
      return false;
    }
    if (s.size() - i <= static_cast<size_t>(extra)) return false;
    for (int k = 1; k <= extra; ++k) {
      if ((s[i + k] & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (s[i + k] & 0x3F);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
      return false;
    i += extra + 1;
  }
  return true;
}

bool IsValidUtf8(absl::string_view s) {
  return IsValidUtf8(absl::MakeConstSpan(
      reinterpret_cast<const uint8_t*>(s.data()), s.size()));
}

absl::Status CheckNameSize(absl::string_view what, absl::string_view name,
                           size_t max_bytes) {
  if (name.size() <= max_bytes) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(what, " of ", name.size(),
                                                 " bytes is longer than the ",
                                                 max_bytes, " allowed"));
}

absl::Status ValidateMemberName(absl::string_view name) {
  if (name.empty()) {
    return absl::InvalidArgumentError(
        "module member name can't be empty string \"\"");
  }
  if (name.find('.') != absl::string_view::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat("module member name can't contain \".\", got: ", name));
  }
  const bool has_control = std::any_of(name.begin(), name.end(), [](char c) {
    const auto byte = static_cast<unsigned char>(c);
    return byte < 0x20 || byte == 0x7F;
  });
  if (has_control) {
    return absl::InvalidArgumentError(absl::StrCat(
        "name ", QuotedForMessage(name), " contains a control character"));
  }
  if (!IsValidUtf8(name)) {
    return absl::InvalidArgumentError(
        absl::StrCat("name ", QuotedForMessage(name), " is not valid UTF-8"));
  }
  return absl::OkStatus();
}

absl::Status CheckKeyLimits(absl::string_view key) {
  if (key.size() > static_cast<size_t>(kMaxKeyLength)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "key ", QuotedForMessage(key), " is longer than kMaxKeyLength (",
        kMaxKeyLength, " bytes)"));
  }
  if (std::count(key.begin(), key.end(), '.') + 1 > kMaxKeyComponents) {
    return absl::InvalidArgumentError(absl::StrCat(
        "key ", QuotedForMessage(key), " has more than kMaxKeyComponents (",
        kMaxKeyComponents, ") components"));
  }
  return absl::OkStatus();
}

absl::Status ValidateTensorKey(absl::string_view key) {
  RETURN_IF_ERROR(CheckKeyLimits(key));
  for (absl::string_view part : absl::StrSplit(key, '.')) {
    if (part.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "key ", QuotedForMessage(key), " has an empty component"));
    }
    absl::Status valid = ValidateMemberName(part);
    if (!valid.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("key ", QuotedForMessage(key), ": ", valid.message()));
    }
  }
  return absl::OkStatus();
}

}  // namespace modelstate

#include "common/log_field.h"

#include <algorithm>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace modelstate {

std::string EscapeForLog(absl::string_view text, size_t max_bytes) {
  std::string escaped;
  for (char c : text.substr(0, max_bytes)) {
    const auto byte = static_cast<unsigned char>(c);
    if (c == '"' || c == '\\') {
      escaped.push_back('\\');
      escaped.push_back(c);
    } else if (c == '\n') {
      escaped += "\\n";
    } else if (c == '\r') {
      escaped += "\\r";
    } else if (c == '\t') {
      escaped += "\\t";
    } else if (byte >= 0x20 && byte < 0x7F) {
      escaped.push_back(c);
    } else {
      absl::StrAppend(&escaped, absl::StrFormat("\\x%02x", byte));
    }
  }
  if (text.size() > max_bytes)
    absl::StrAppend(&escaped, "...(", text.size(), " bytes)");
  return escaped;
}

std::string LogField(absl::string_view text) {
  if (text.empty()) return "-";
  const bool plain =
      text.size() <= kMaxLoggedNameBytes &&
      std::all_of(text.begin(), text.end(), [](char c) {
        return absl::ascii_isalnum(static_cast<unsigned char>(c)) ||
               absl::string_view("._-:/[]@+%").find(c) !=
                   absl::string_view::npos;
      });
  if (plain) return std::string(text);
  return absl::StrCat("\"", EscapeForLog(text, kMaxLoggedNameBytes), "\"");
}

}  // namespace modelstate

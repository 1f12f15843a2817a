#include "common/bearer.h"

#include <algorithm>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace modelstate {
namespace {

constexpr absl::string_view kBearerScheme = "Bearer ";

}  // namespace

std::string BearerAuthorization(absl::string_view token) {
  return absl::StrCat(kBearerScheme, token);
}

std::optional<absl::string_view> BearerTokenOf(
    absl::string_view authorization) {
  if (authorization.size() <= kBearerScheme.size() ||
      !absl::StartsWithIgnoreCase(authorization, kBearerScheme)) {
    return std::nullopt;
  }
  const absl::string_view token = authorization.substr(kBearerScheme.size());
  const bool printable = std::all_of(token.begin(), token.end(), [](char c) {
    return absl::ascii_isgraph(static_cast<unsigned char>(c));
  });
  if (!printable) return std::nullopt;
  return token;
}

}  // namespace modelstate

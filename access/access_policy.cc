#include "access/access_policy.h"

#include <arpa/inet.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>

#include <algorithm>
#include <map>
#include <optional>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/file_util.h"
#include "common/limits.h"
#include "common/status_macros.h"
#include "nlohmann/json.hpp"

namespace modelstate {
namespace {

using Json = nlohmann::json;
using Hash = std::array<uint8_t, 32>;

Hash Sha256(absl::string_view data) {
  Hash hash{};
  unsigned int length = 0;
  EVP_Digest(data.data(), data.size(), hash.data(), &length, EVP_sha256(),
             nullptr);
  return hash;
}

absl::Status Invalid(const std::string& where, absl::string_view problem) {
  return absl::InvalidArgumentError(absl::StrCat(where, ": ", problem));
}

// Fails for a key of `object` outside `allowed`: a misspelt key in a security
// policy must not be silently ignored.
absl::Status CheckKeys(const Json& object, const std::string& where,
                       const std::vector<std::string>& allowed) {
  for (const auto& item : object.items()) {
    if (std::find(allowed.begin(), allowed.end(), item.key()) ==
        allowed.end()) {
      return Invalid(where,
                     absl::StrCat("unknown key \"", item.key(), "\" (allowed: ",
                                  absl::StrJoin(allowed, ", "), ")"));
    }
  }
  return absl::OkStatus();
}

// The strings of an optional array member `key` of `object`.
absl::StatusOr<std::vector<std::string>> StringArray(const Json& object,
                                                     const std::string& where,
                                                     const char* key) {
  std::vector<std::string> out;
  if (!object.contains(key)) return out;
  const Json& array = object.at(key);
  if (!array.is_array())
    return Invalid(absl::StrCat(where, ".", key), "must be an array");
  for (size_t i = 0; i < array.size(); ++i) {
    if (!array[i].is_string() || array[i].get<std::string>().empty()) {
      return Invalid(absl::StrCat(where, ".", key, "[", i, "]"),
                     "must be a non-empty string");
    }
    out.push_back(array[i].get<std::string>());
  }
  return out;
}

absl::StatusOr<Hash> ParseHash(const std::string& hex,
                               const std::string& where) {
  if (hex.size() != 64) {
    return Invalid(where,
                   "must be the 64 hex digits of the token's SHA-256 "
                   "(printf %s \"$TOKEN\" | sha256sum)");
  }
  Hash hash{};
  for (size_t i = 0; i < 64; ++i) {
    const char c = absl::ascii_tolower(hex[i]);
    int digit;
    if (c >= '0' && c <= '9') {
      digit = c - '0';
    } else if (c >= 'a' && c <= 'f') {
      digit = c - 'a' + 10;
    } else {
      return Invalid(where, "is not hexadecimal");
    }
    hash[i / 2] = static_cast<uint8_t>(hash[i / 2] << 4 | digit);
  }
  return hash;
}

absl::StatusOr<Role> ParseRole(const Json& value, const std::string& where) {
  if (value.is_string()) {
    const std::string role = value.get<std::string>();
    if (role == "read") return Role::kRead;
    if (role == "write") return Role::kWrite;
    if (role == "admin") return Role::kAdmin;
  }
  return Invalid(where, "must be \"read\", \"write\" or \"admin\"");
}

absl::Status ValidateGlob(const std::string& glob, const std::string& where) {
  if (glob.empty() || glob.size() > kMaxGlobLength)
    return Invalid(where, "must be 1 to 256 characters");
  for (char c : glob) {
    if (!absl::ascii_isgraph(static_cast<unsigned char>(c)))
      return Invalid(where, "must be printable ASCII without spaces");
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<RoleGrant>> ParseGrants(const Json& principal,
                                                   const std::string& where) {
  std::vector<RoleGrant> grants;
  if (!principal.contains("roles")) return grants;
  const Json& roles = principal.at("roles");
  if (!roles.is_array()) return Invalid(where + ".roles", "must be an array");
  for (size_t i = 0; i < roles.size(); ++i) {
    const std::string at = absl::StrCat(where, ".roles[", i, "]");
    const Json& grant = roles[i];
    if (!grant.is_object() || !grant.contains("models") ||
        !grant.contains("role")) {
      return Invalid(at, "must be an object with \"models\" and \"role\"");
    }
    RETURN_IF_ERROR(CheckKeys(grant, at, {"models", "role"}));
    if (!grant.at("models").is_string())
      return Invalid(at + ".models", "must be a string");
    RoleGrant parsed;
    parsed.model_glob = grant.at("models").get<std::string>();
    RETURN_IF_ERROR(ValidateGlob(parsed.model_glob, at + ".models"));
    ASSIGN_OR_RETURN(parsed.role, ParseRole(grant.at("role"), at + ".role"));
    grants.push_back(std::move(parsed));
  }
  return grants;
}

// Who holds each principal name, token hash and certificate name of a
// policy: none of them may be given twice.
class Owners {
 public:
  // Records `owner` as the holder of `what`; InvalidArgument at `where` when
  // another principal already holds it.
  absl::Status Claim(const std::string& what, const std::string& owner,
                     const std::string& where) {
    auto [it, inserted] = owners_.emplace(what, owner);
    if (!inserted) {
      return Invalid(where, absl::StrCat("is also given to principal \"",
                                         it->second, "\""));
    }
    return absl::OkStatus();
  }

 private:
  std::map<std::string, std::string> owners_;
};

absl::StatusOr<std::vector<Hash>> ParseTokenHashes(const Json& principal,
                                                   const std::string& where,
                                                   const std::string& name,
                                                   Owners& owners) {
  ASSIGN_OR_RETURN(std::vector<std::string> hexes,
                   StringArray(principal, where, "token_sha256"));
  std::vector<Hash> hashes;
  for (size_t h = 0; h < hexes.size(); ++h) {
    const std::string at = absl::StrCat(where, ".token_sha256[", h, "]");
    ASSIGN_OR_RETURN(const Hash hash, ParseHash(hexes[h], at));
    RETURN_IF_ERROR(owners.Claim(
        "token:" + std::string(hash.begin(), hash.end()), name, at));
    hashes.push_back(hash);
  }
  return hashes;
}

absl::StatusOr<std::vector<std::string>> ParseCertificateNames(
    const Json& principal, const std::string& where, const std::string& name,
    Owners& owners) {
  ASSIGN_OR_RETURN(std::vector<std::string> names,
                   StringArray(principal, where, "certificate_names"));
  for (size_t c = 0; c < names.size(); ++c) {
    const std::string at = absl::StrCat(where, ".certificate_names[", c, "]");
    if (names[c].size() > kMaxCertificateNameLength)
      return Invalid(at, "is longer than 1024 characters");
    RETURN_IF_ERROR(owners.Claim("cert:" + names[c], name, at));
  }
  return names;
}

absl::Status ValidatePrincipalName(const Json& principal,
                                   const std::string& where) {
  if (!principal.contains("name") || !principal.at("name").is_string())
    return Invalid(where, "needs a \"name\" string");
  const std::string name = principal.at("name").get<std::string>();
  if (name.empty() || name.size() > kMaxPrincipalNameLength)
    return Invalid(where + ".name", "must be 1 to 128 characters");
  for (char c : name) {
    if (!absl::ascii_isgraph(static_cast<unsigned char>(c)) || c == '"')
      return Invalid(where + ".name",
                     "must be printable ASCII without spaces or quotes");
  }
  return absl::OkStatus();
}

// An IPv4 or IPv6 address as its bytes (4 or 16), or nullopt for text that is
// not one: addresses are compared as numbers, "fd00::7" equal to "FD00:0::7".
std::optional<std::string> IpAddressBytes(absl::string_view text) {
  if (absl::StrContains(text, '\0')) return std::nullopt;
  const std::string copy(text);
  unsigned char bytes[16];
  if (inet_pton(AF_INET, copy.c_str(), bytes) == 1)
    return std::string(reinterpret_cast<char*>(bytes), 4);
  if (inet_pton(AF_INET6, copy.c_str(), bytes) == 1)
    return std::string(reinterpret_cast<char*>(bytes), 16);
  return std::nullopt;
}

// RFC 3986: scheme = ALPHA *( ALPHA / DIGIT / "+" / "-" / "." ), then ':'.
bool HasUriScheme(absl::string_view name) {
  const size_t colon = name.find(':');
  if (colon == 0 || colon == absl::string_view::npos) return false;
  if (!absl::ascii_isalpha(static_cast<unsigned char>(name[0]))) return false;
  for (char c : name.substr(0, colon)) {
    if (!absl::ascii_isalnum(static_cast<unsigned char>(c)) && c != '+' &&
        c != '-' && c != '.') {
      return false;
    }
  }
  return true;
}

bool Contains(const std::vector<std::string>& values, absl::string_view name) {
  return std::find(values.begin(), values.end(), name) != values.end();
}

bool ContainsAddress(const std::vector<std::string>& values,
                     absl::string_view name) {
  const std::optional<std::string> wanted = IpAddressBytes(name);
  return wanted.has_value() &&
         std::any_of(values.begin(), values.end(),
                     [&wanted](const std::string& value) {
                       return IpAddressBytes(value) == wanted;
                     });
}

// The certificate's names for a message: typed, escaped, the first few and
// each cut short (a certificate may carry many, and long ones).
std::string ShownNames(const CertificateNames& certificate) {
  constexpr size_t kShown = 256;
  constexpr size_t kMaxNames = 8;
  std::vector<std::string> shown;
  auto add = [&shown](const char* type, const std::vector<std::string>& names) {
    for (const std::string& name : names) {
      if (shown.size() == kMaxNames) return;
      shown.push_back(absl::StrCat(
          type, " \"", absl::CEscape(absl::string_view(name).substr(0, kShown)),
          name.size() > kShown ? "..." : "", "\""));
    }
  };
  add("CN", certificate.common_names);
  add("DNS", certificate.dns);
  add("URI", certificate.uris);
  add("email", certificate.emails);
  add("IP", certificate.ips);
  return absl::StrJoin(shown, ", ");
}

}  // namespace

CertificateNameKind CertificateNameKindOf(absl::string_view name) {
  if (IpAddressBytes(name).has_value()) return CertificateNameKind::kIp;
  if (HasUriScheme(name)) return CertificateNameKind::kUri;
  if (absl::StrContains(name, '@')) return CertificateNameKind::kEmail;
  return CertificateNameKind::kDns;
}

bool CertificateHolds(const CertificateNames& certificate,
                      absl::string_view name) {
  switch (CertificateNameKindOf(name)) {
    case CertificateNameKind::kIp:
      return ContainsAddress(certificate.ips, name);
    case CertificateNameKind::kUri:
      return Contains(certificate.uris, name);
    case CertificateNameKind::kEmail:
      return Contains(certificate.emails, name);
    case CertificateNameKind::kDns:
      return Contains(certificate.dns, name) ||
             Contains(certificate.common_names, name);
  }
  return false;
}

const char* RoleName(Role role) {
  switch (role) {
    case Role::kRead:
      return "read";
    case Role::kWrite:
      return "write";
    case Role::kAdmin:
      return "admin";
    case Role::kNone:
      break;
  }
  return "none";
}

const char* ActionName(Action action) {
  switch (action) {
    case Action::kListModels:
      return "ListModels";
    case Action::kGetModel:
      return "GetModel";
    case Action::kStateDict:
      return "StateDict";
    case Action::kWatchModel:
      return "WatchModel";
    case Action::kLoadStateDict:
      return "LoadStateDict";
    case Action::kRollbackModel:
      return "RollbackModel";
    case Action::kCreateModel:
      return "CreateModel";
    case Action::kDeleteModel:
      return "DeleteModel";
    case Action::kLoadStateDictCreate:
      return "LoadStateDict+create";
  }
  return "unknown";
}

Role RequiredRole(Action action) {
  switch (action) {
    case Action::kListModels:
      return Role::kNone;
    case Action::kGetModel:
    case Action::kStateDict:
    case Action::kWatchModel:
      return Role::kRead;
    case Action::kLoadStateDict:
    case Action::kRollbackModel:
      return Role::kWrite;
    case Action::kCreateModel:
    case Action::kDeleteModel:
    case Action::kLoadStateDictCreate:
      return Role::kAdmin;
  }
  return Role::kAdmin;
}

const char* AuthFailureName(AuthFailure failure) {
  switch (failure) {
    case AuthFailure::kNone:
      return "none";
    case AuthFailure::kMissingCredentials:
      return "missing_credentials";
    case AuthFailure::kMalformedCredentials:
      return "malformed_credentials";
    case AuthFailure::kUnknownToken:
      return "unknown_token";
    case AuthFailure::kUnknownCertificate:
      return "unknown_certificate";
    case AuthFailure::kPermissionDenied:
      return "permission_denied";
  }
  return "none";
}

Principal::Principal(std::string name, std::vector<RoleGrant> grants)
    : name_(std::move(name)), grants_(std::move(grants)) {}

Role Principal::RoleOn(absl::string_view model) const {
  Role best = Role::kNone;
  for (const RoleGrant& grant : grants_) {
    if (grant.role > best && GlobMatches(grant.model_glob, model))
      best = grant.role;
  }
  return best;
}

bool GlobMatches(absl::string_view glob, absl::string_view name) {
  // Iterative matching with one backtrack point (the last '*'): linear in
  // practice and never recursive, whatever the glob.
  size_t g = 0, n = 0;
  size_t star = absl::string_view::npos, resume = 0;
  while (n < name.size()) {
    if (g < glob.size() && (glob[g] == '?' || glob[g] == name[n])) {
      ++g;
      ++n;
    } else if (g < glob.size() && glob[g] == '*') {
      star = g++;
      resume = n;
    } else if (star != absl::string_view::npos) {
      g = star + 1;
      n = ++resume;
    } else {
      return false;
    }
  }
  while (g < glob.size() && glob[g] == '*') ++g;
  return g == glob.size();
}

std::string Sha256Hex(absl::string_view data) {
  static const char kDigits[] = "0123456789abcdef";
  const Hash hash = Sha256(data);
  std::string hex;
  for (uint8_t byte : hash) {
    hex.push_back(kDigits[byte >> 4]);
    hex.push_back(kDigits[byte & 15]);
  }
  return hex;
}

absl::StatusOr<AccessPolicy> AccessPolicy::Parse(absl::string_view json) {
  const Json document = Json::parse(json, nullptr, /*allow_exceptions=*/false);
  if (document.is_discarded())
    return absl::InvalidArgumentError("auth policy: not valid JSON");
  if (!document.is_object() || !document.contains("principals"))
    return Invalid("auth policy", "must be an object with \"principals\"");
  RETURN_IF_ERROR(
      CheckKeys(document, "auth policy", {"version", "principals"}));
  if (document.contains("version") && document.at("version") != 1)
    return Invalid("auth policy: version", "must be 1");
  const Json& principals = document.at("principals");
  if (!principals.is_array())
    return Invalid("auth policy: principals", "must be an array");
  std::vector<Entry> entries;
  Owners owners;
  for (size_t i = 0; i < principals.size(); ++i) {
    const std::string where = absl::StrCat("auth policy: principals[", i, "]");
    const Json& principal = principals[i];
    if (!principal.is_object()) return Invalid(where, "must be an object");
    RETURN_IF_ERROR(CheckKeys(
        principal, where,
        {"name", "description", "token_sha256", "certificate_names", "roles"}));
    RETURN_IF_ERROR(ValidatePrincipalName(principal, where));
    Entry entry;
    entry.name = principal.at("name").get<std::string>();
    RETURN_IF_ERROR(
        owners.Claim("name:" + entry.name, entry.name, where + ".name"));
    ASSIGN_OR_RETURN(entry.token_hashes,
                     ParseTokenHashes(principal, where, entry.name, owners));
    ASSIGN_OR_RETURN(
        entry.certificate_names,
        ParseCertificateNames(principal, where, entry.name, owners));
    if (entry.token_hashes.empty() && entry.certificate_names.empty()) {
      return Invalid(where,
                     "needs at least one of \"token_sha256\" or "
                     "\"certificate_names\"");
    }
    if (principal.contains("description") &&
        !principal.at("description").is_string()) {
      return Invalid(where + ".description", "must be a string");
    }
    ASSIGN_OR_RETURN(entry.grants, ParseGrants(principal, where));
    entries.push_back(std::move(entry));
  }
  return AccessPolicy(std::move(entries));
}

absl::StatusOr<AccessPolicy> AccessPolicy::LoadFile(const std::string& path) {
  absl::StatusOr<std::string> text = ReadFileToString(path);
  if (!text.ok()) return text.status();
  absl::StatusOr<AccessPolicy> policy = Parse(*text);
  if (!policy.ok()) {
    return absl::Status(policy.status().code(),
                        absl::StrCat(path, ": ", policy.status().message()));
  }
  return policy;
}

absl::StatusOr<Principal> AccessPolicy::Authenticate(
    const CallerCredentials& credentials, AuthFailure* failure) const {
  AuthFailure ignored;
  if (failure == nullptr) failure = &ignored;
  *failure = AuthFailure::kNone;
  if (credentials.authorization.size() > 1) {
    *failure = AuthFailure::kMalformedCredentials;
    return absl::UnauthenticatedError(
        "more than one authorization metadata value");
  }
  if (credentials.authorization.size() == 1)
    return AuthenticateToken(credentials.authorization[0], failure);
  if (!credentials.certificate.empty())
    return AuthenticateCertificate(credentials, failure);
  *failure = AuthFailure::kMissingCredentials;
  return absl::UnauthenticatedError(
      "no credentials: send \"authorization: Bearer <token>\" metadata or a "
      "client certificate");
}

absl::StatusOr<Principal> AccessPolicy::AuthenticateToken(
    absl::string_view header, AuthFailure* failure) const {
  const std::optional<absl::string_view> token = BearerTokenOf(header);
  if (!token.has_value()) {
    *failure = AuthFailure::kMalformedCredentials;
    return absl::UnauthenticatedError(
        "malformed authorization metadata: want \"Bearer <token>\"");
  }
  const Hash presented = Sha256(*token);
  // Compare against every stored hash, without stopping at a match, so that
  // timing says nothing about which (or whether any) hash matched early.
  const Entry* owner = nullptr;
  for (const Entry& entry : entries_) {
    for (const Hash& stored : entry.token_hashes) {
      const bool equal =
          CRYPTO_memcmp(stored.data(), presented.data(), stored.size()) == 0;
      if (equal) owner = &entry;
    }
  }
  if (owner == nullptr) {
    *failure = AuthFailure::kUnknownToken;
    return absl::UnauthenticatedError("unknown bearer token");
  }
  return Principal(owner->name, owner->grants);
}

absl::StatusOr<Principal> AccessPolicy::AuthenticateCertificate(
    const CallerCredentials& credentials, AuthFailure* failure) const {
  std::vector<const Entry*> owners;
  auto holds = [&credentials](const std::string& name) {
    return CertificateHolds(credentials.certificate, name);
  };
  for (const Entry& entry : entries_) {
    if (std::any_of(entry.certificate_names.begin(),
                    entry.certificate_names.end(), holds)) {
      owners.push_back(&entry);
    }
  }
  if (owners.size() != 1) {
    const std::string shown = ShownNames(credentials.certificate);
    *failure = AuthFailure::kUnknownCertificate;
    if (owners.empty()) {
      return absl::UnauthenticatedError(absl::StrCat(
          "client certificate (", shown, ") names no principal of the policy"));
    }
    return absl::UnauthenticatedError(
        absl::StrCat("client certificate (", shown,
                     ") names more than one principal of the policy"));
  }
  return Principal(owners[0]->name, owners[0]->grants);
}

absl::Status Authorize(const Principal& principal, Action action,
                       absl::string_view model) {
  const Role needed = RequiredRole(action);
  if (needed == Role::kNone) return absl::OkStatus();
  const Role held = principal.RoleOn(model);
  if (held >= needed) return absl::OkStatus();
  const std::string has = held == Role::kNone
                              ? "has no role"
                              : absl::StrCat("has role ", RoleName(held));
  return absl::PermissionDeniedError(absl::StrCat(
      "principal \"", principal.name(), "\" ", has, " on model \"", model,
      "\"; ", ActionName(action), " needs role ", RoleName(needed)));
}

}  // namespace modelstate

#include "access/access_policy.h"

#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace modelstate {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

// Tokens of the test policy and their hashes, computed here independently of
// Sha256Hex (sha256sum of each string).
constexpr char kTrainerToken[] = "trainer-secret-1";
constexpr char kWorkerToken[] = "worker-secret-2";
constexpr char kAdminToken[] = "admin-secret-3";

std::string Policy() {
  return absl::StrCat(R"({
    "version": 1,
    "principals": [
      {"name": "trainer", "description": "writes the policy net",
       "token_sha256": [")",
                      Sha256Hex(kTrainerToken), R"("],
       "roles": [{"models": "policy-*", "role": "write"},
                 {"models": "demo", "role": "read"}]},
      {"name": "worker", "token_sha256": [")",
                      Sha256Hex(kWorkerToken), R"("],
       "certificate_names": ["worker", "spiffe://ml/worker"],
       "roles": [{"models": "policy-*", "role": "read"}]},
      {"name": "ops", "token_sha256": [")",
                      Sha256Hex(kAdminToken), R"("],
       "roles": [{"models": "*", "role": "admin"},
                 {"models": "policy-v?", "role": "read"}]}
    ]})");
}

AccessPolicy TestPolicy() {
  absl::StatusOr<AccessPolicy> policy = AccessPolicy::Parse(Policy());
  EXPECT_TRUE(policy.ok()) << policy.status();
  return *std::move(policy);
}

CallerCredentials Bearer(const std::string& token) {
  CallerCredentials credentials;
  credentials.authorization.push_back("Bearer " + token);
  return credentials;
}

TEST(Sha256HexTest, MatchesKnownVectors) {
  EXPECT_EQ(Sha256Hex(""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(Sha256Hex("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
}

TEST(GlobMatchesTest, Table) {
  struct Case {
    const char* glob;
    const char* name;
    bool matches;
  };
  const Case cases[] = {
      {"*", "", true},
      {"*", "anything/at.all", true},
      {"demo", "demo", true},
      {"demo", "demo2", false},
      {"demo", "dem", false},
      {"policy-*", "policy-", true},
      {"policy-*", "policy-v1", true},
      {"policy-*", "policy", false},
      {"policy-*", "xpolicy-v1", false},
      {"*-v1", "policy-v1", true},
      {"*-v1", "policy-v12", false},
      {"p?licy", "policy", true},
      {"p?licy", "plicy", false},
      {"a*b*c", "aXbYc", true},
      {"a*b*c", "abcbc", true},
      {"a*b*c", "acb", false},
      {"team/*", "team/a/b", true},
      {"**", "x", true},
      {"*a", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaab", false},
  };
  for (const Case& c : cases) {
    EXPECT_EQ(GlobMatches(c.glob, c.name), c.matches)
        << c.glob << " vs " << c.name;
  }
}

// Every action, as every role, granted on a glob that matches the model and on
// one that does not.
TEST(AccessPolicyTest, EveryActionRoleAndGlob) {
  struct Case {
    Action action;
    const char* name;
    Role needed;
  };
  const Case cases[] = {
      {Action::kListModels, "ListModels", Role::kNone},
      {Action::kGetModel, "GetModel", Role::kRead},
      {Action::kStateDict, "StateDict", Role::kRead},
      {Action::kWatchModel, "WatchModel", Role::kRead},
      {Action::kLoadStateDict, "LoadStateDict", Role::kWrite},
      {Action::kRollbackModel, "RollbackModel", Role::kWrite},
      {Action::kCreateModel, "CreateModel", Role::kAdmin},
      {Action::kDeleteModel, "DeleteModel", Role::kAdmin},
      {Action::kLoadStateDictCreate, "LoadStateDict+create", Role::kAdmin},
  };
  struct Grant {
    const char* glob;
    bool matches;  // Of the model "policy-b".
  };
  const Grant grants[] = {{"policy-*", true}, {"other-*", false}};
  for (const Case& c : cases) {
    EXPECT_EQ(std::string(ActionName(c.action)), c.name);
    EXPECT_EQ(RequiredRole(c.action), c.needed) << c.name;
    for (Role held : {Role::kNone, Role::kRead, Role::kWrite, Role::kAdmin}) {
      for (const Grant& grant : grants) {
        const Principal principal("p", {{grant.glob, held}});
        const absl::Status status = Authorize(principal, c.action, "policy-b");
        const Role effective = grant.matches ? held : Role::kNone;
        const std::string label =
            absl::StrCat(c.name, " as ", RoleName(held), " on ", grant.glob);
        EXPECT_EQ(status.ok(), effective >= c.needed) << label;
        if (status.ok()) continue;
        EXPECT_EQ(status.code(), absl::StatusCode::kPermissionDenied) << label;
        const std::string has =
            effective == Role::kNone
                ? "has no role"
                : absl::StrCat("has role ", RoleName(effective));
        EXPECT_EQ(
            status.message(),
            absl::StrCat("principal \"p\" ", has, " on model \"policy-b\"; ",
                         c.name, " needs role ", RoleName(c.needed)))
            << label;
      }
    }
  }
}

TEST(AccessPolicyTest, TokensAuthenticateTheirPrincipal) {
  const AccessPolicy policy = TestPolicy();
  EXPECT_EQ(policy.size(), 3u);
  EXPECT_EQ(policy.Authenticate(Bearer(kTrainerToken))->name(), "trainer");
  EXPECT_EQ(policy.Authenticate(Bearer(kWorkerToken))->name(), "worker");
  EXPECT_EQ(policy.Authenticate(Bearer(kAdminToken))->name(), "ops");
  // RFC 6750: the scheme is case-insensitive.
  CallerCredentials lower;
  lower.authorization.push_back(std::string("bearer ") + kTrainerToken);
  EXPECT_EQ(policy.Authenticate(lower)->name(), "trainer");
}

TEST(AccessPolicyTest, GrantsAreUnionedAndGlobbed) {
  const AccessPolicy policy = TestPolicy();
  const Principal trainer = *policy.Authenticate(Bearer(kTrainerToken));
  EXPECT_EQ(trainer.RoleOn("policy-v1"), Role::kWrite);
  EXPECT_EQ(trainer.RoleOn("demo"), Role::kRead);
  EXPECT_EQ(trainer.RoleOn("other"), Role::kNone);
  EXPECT_TRUE(trainer.CanRead("policy-v1"));
  EXPECT_FALSE(trainer.CanRead("other"));
  // The highest matching grant wins, whatever the order.
  const Principal ops = *policy.Authenticate(Bearer(kAdminToken));
  EXPECT_EQ(ops.RoleOn("policy-v1"), Role::kAdmin);

  const absl::Status miss = Authorize(trainer, Action::kGetModel, "other");
  EXPECT_EQ(miss.code(), absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(miss.message(),
            "principal \"trainer\" has no role on model \"other\"; GetModel "
            "needs role read");
  const absl::Status low = Authorize(trainer, Action::kDeleteModel, "policy-1");
  EXPECT_EQ(low.message(),
            "principal \"trainer\" has role write on model \"policy-1\"; "
            "DeleteModel needs role admin");
  EXPECT_TRUE(Authorize(trainer, Action::kListModels, "").ok());
}

TEST(AccessPolicyTest, RefusesMissingMalformedAndUnknownCredentials) {
  const AccessPolicy policy = TestPolicy();
  struct Case {
    std::vector<std::string> authorization;
    AuthFailure failure;
    const char* message;
  };
  const Case cases[] = {
      {{}, AuthFailure::kMissingCredentials, "no credentials"},
      {{"Bearer"}, AuthFailure::kMalformedCredentials, "malformed"},
      {{"Bearer "}, AuthFailure::kMalformedCredentials, "malformed"},
      {{"Basic dXNlcjpwYXNz"}, AuthFailure::kMalformedCredentials, "malformed"},
      {{std::string(kTrainerToken)},
       AuthFailure::kMalformedCredentials,
       "malformed"},
      {{"Bearer  two-spaces"}, AuthFailure::kMalformedCredentials, "malformed"},
      {{"Bearer has space"}, AuthFailure::kMalformedCredentials, "malformed"},
      {{"Bearer " + std::string(kTrainerToken), "Bearer x"},
       AuthFailure::kMalformedCredentials,
       "more than one"},
      {{"Bearer not-a-known-token"},
       AuthFailure::kUnknownToken,
       "unknown bearer token"},
      // One character off the real token.
      {{"Bearer trainer-secret-2"},
       AuthFailure::kUnknownToken,
       "unknown bearer token"},
  };
  for (const Case& c : cases) {
    CallerCredentials credentials;
    credentials.authorization = c.authorization;
    AuthFailure failure = AuthFailure::kNone;
    absl::StatusOr<Principal> principal =
        policy.Authenticate(credentials, &failure);
    const std::string label =
        c.authorization.empty() ? "(none)" : c.authorization[0];
    ASSERT_FALSE(principal.ok()) << label;
    EXPECT_EQ(principal.status().code(), absl::StatusCode::kUnauthenticated);
    EXPECT_EQ(failure, c.failure) << label;
    EXPECT_THAT(principal.status().message(), HasSubstr(c.message)) << label;
    // Whatever secret was sent, the message never echoes it.
    for (const std::string& value : c.authorization) {
      const std::string secret = value.substr(value.find(' ') + 1);
      if (secret.size() >= 4 && secret != "Bearer") {
        EXPECT_THAT(principal.status().message(), Not(HasSubstr(secret)));
      }
    }
  }
}

TEST(AccessPolicyTest, EveryStoredHashIsComparedInFull) {
  // Many principals: the right one is found wherever it sits, and a hash that
  // differs from a stored one in its last byte only is refused (the compare
  // covers all 32 bytes).
  std::string principals;
  for (int i = 0; i < 50; ++i) {
    absl::StrAppend(&principals, i ? "," : "", R"({"name": "p)", i,
                    R"(", "token_sha256": [")", Sha256Hex(absl::StrCat("t", i)),
                    R"("]})");
  }
  const AccessPolicy policy = *AccessPolicy::Parse(
      absl::StrCat(R"({"principals": [)", principals, "]}"));
  EXPECT_EQ(policy.Authenticate(Bearer("t0"))->name(), "p0");
  EXPECT_EQ(policy.Authenticate(Bearer("t49"))->name(), "p49");
  EXPECT_FALSE(policy.Authenticate(Bearer("t50")).ok());

  // Upper-case hex in the file is the same hash.
  std::string upper = Sha256Hex("tok");
  for (char& c : upper) c = static_cast<char>(toupper(c));
  const AccessPolicy upper_policy = *AccessPolicy::Parse(
      absl::StrCat(R"({"principals": [{"name": "u", "token_sha256": [")", upper,
                   R"("]}]})"));
  EXPECT_EQ(upper_policy.Authenticate(Bearer("tok"))->name(), "u");
  std::string last_byte_off = Sha256Hex("tok");
  last_byte_off.back() = last_byte_off.back() == '0' ? '1' : '0';
  const AccessPolicy off_policy = *AccessPolicy::Parse(
      absl::StrCat(R"({"principals": [{"name": "u", "token_sha256": [")",
                   last_byte_off, R"("]}]})"));
  EXPECT_FALSE(off_policy.Authenticate(Bearer("tok")).ok());
}

TEST(AccessPolicyTest, CertificatesAuthenticateByCommonOrAltName) {
  const AccessPolicy policy = TestPolicy();
  CallerCredentials by_cn;
  by_cn.certificate.common_names = {"worker"};
  EXPECT_EQ(policy.Authenticate(by_cn)->name(), "worker");
  CallerCredentials by_san;
  by_san.certificate.common_names = {"pod-1234"};
  by_san.certificate.dns = {"pod-1234.ml.svc"};
  by_san.certificate.uris = {"spiffe://ml/worker"};
  EXPECT_EQ(policy.Authenticate(by_san)->name(), "worker");

  CallerCredentials stranger;
  stranger.certificate.common_names = {"rogue"};
  AuthFailure failure;
  absl::StatusOr<Principal> refused = policy.Authenticate(stranger, &failure);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kUnauthenticated);
  EXPECT_EQ(failure, AuthFailure::kUnknownCertificate);
  EXPECT_THAT(refused.status().message(), HasSubstr("CN \"rogue\""));

  // A token, when sent, decides over the certificate.
  CallerCredentials both = by_cn;
  both.authorization.push_back(std::string("Bearer ") + kTrainerToken);
  EXPECT_EQ(policy.Authenticate(both)->name(), "trainer");
  both.authorization[0] = "Bearer unknown";
  EXPECT_FALSE(policy.Authenticate(both).ok());
}

// A policy's certificate name matches only the certificate names of the type
// it is written as; only a DNS-like name may match the common name.
TEST(AccessPolicyTest, CertificateNamesMatchOnlyTheirOwnType) {
  using Names = std::vector<std::string> CertificateNames::*;
  const Names kCn = &CertificateNames::common_names;
  const Names kDns = &CertificateNames::dns;
  const Names kUri = &CertificateNames::uris;
  const Names kEmail = &CertificateNames::emails;
  const Names kIp = &CertificateNames::ips;
  struct Case {
    const char* policy_name;
    CertificateNameKind kind;
    Names type;  // Where the certificate carries `value`.
    const char* value;
    bool holds;
  };
  const std::string spiffe = "spiffe://example.org/worker";
  const CertificateNameKind kUriKind = CertificateNameKind::kUri;
  const Case cases[] = {
      {spiffe.c_str(), kUriKind, kUri, spiffe.c_str(), true},
      {spiffe.c_str(), kUriKind, kCn, spiffe.c_str(), false},
      {spiffe.c_str(), kUriKind, kDns, spiffe.c_str(), false},
      {spiffe.c_str(), kUriKind, kEmail, spiffe.c_str(), false},
      {spiffe.c_str(), kUriKind, kUri, "spiffe://example.org/other", false},
      {"urn:example:worker", kUriKind, kUri, "urn:example:worker", true},
      {"urn:example:worker", kUriKind, kCn, "urn:example:worker", false},
      {"worker@example.org", CertificateNameKind::kEmail, kEmail,
       "worker@example.org", true},
      {"worker@example.org", CertificateNameKind::kEmail, kCn,
       "worker@example.org", false},
      {"worker@example.org", CertificateNameKind::kEmail, kDns,
       "worker@example.org", false},
      {"10.0.0.7", CertificateNameKind::kIp, kIp, "10.0.0.7", true},
      {"10.0.0.7", CertificateNameKind::kIp, kCn, "10.0.0.7", false},
      {"10.0.0.7", CertificateNameKind::kIp, kDns, "10.0.0.7", false},
      {"10.0.0.7", CertificateNameKind::kIp, kIp, "10.0.0.8", false},
      {"fd00::7", CertificateNameKind::kIp, kIp, "fd00:0:0:0:0:0:0:7", true},
      {"fd00::7", CertificateNameKind::kIp, kCn, "fd00::7", false},
      {"worker.ml.svc", CertificateNameKind::kDns, kDns, "worker.ml.svc", true},
      {"worker.ml.svc", CertificateNameKind::kDns, kCn, "worker.ml.svc", true},
      {"worker.ml.svc", CertificateNameKind::kDns, kUri, "worker.ml.svc",
       false},
      {"worker.ml.svc", CertificateNameKind::kDns, kEmail, "worker.ml.svc",
       false},
      {"worker", CertificateNameKind::kDns, kCn, "worker", true},
  };
  for (const Case& c : cases) {
    CertificateNames certificate;
    (certificate.*c.type).push_back(c.value);
    EXPECT_EQ(CertificateNameKindOf(c.policy_name), c.kind) << c.policy_name;
    EXPECT_EQ(CertificateHolds(certificate, c.policy_name), c.holds)
        << c.policy_name << " vs " << c.value;
  }

  // Through a policy: a common name spelling a SPIFFE ID is no SPIFFE ID.
  const AccessPolicy policy = TestPolicy();
  CallerCredentials forged;
  forged.certificate.common_names = {"spiffe://ml/worker"};
  AuthFailure failure;
  absl::StatusOr<Principal> refused = policy.Authenticate(forged, &failure);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kUnauthenticated);
  EXPECT_EQ(failure, AuthFailure::kUnknownCertificate);
  EXPECT_THAT(refused.status().message(),
              HasSubstr("CN \"spiffe://ml/worker\""));
}

TEST(AccessPolicyTest, CertificateNamingTwoPrincipalsIsRefused) {
  const AccessPolicy policy = *AccessPolicy::Parse(R"({"principals": [
      {"name": "a", "certificate_names": ["a.svc"]},
      {"name": "b", "certificate_names": ["b.svc"]}]})");
  CallerCredentials both;
  both.certificate.common_names = {"a.svc"};
  both.certificate.dns = {"b.svc"};
  absl::StatusOr<Principal> refused = policy.Authenticate(both);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kUnauthenticated);
  EXPECT_THAT(refused.status().message(), HasSubstr("more than one"));
}

TEST(AccessPolicyTest, MalformedPoliciesAreRefusedWithTheirPlace) {
  const std::string hash = Sha256Hex("x");
  auto one = [&hash](const std::string& fields) {
    return absl::StrCat(R"({"principals": [{"name": "p", "token_sha256": [")",
                        hash, R"("])", fields, "}]}");
  };
  struct Case {
    std::string json;
    const char* message;
  };
  const Case cases[] = {
      {"", "not valid JSON"},
      {"{\"principals\": [", "not valid JSON"},
      {"[]", "must be an object with \"principals\""},
      {"{}", "must be an object with \"principals\""},
      {R"({"principals": {}})", "principals: must be an array"},
      {R"({"principals": [], "users": []})", "unknown key \"users\""},
      {R"({"principals": [], "version": 2})", "version: must be 1"},
      {R"({"principals": [7]})", "principals[0]: must be an object"},
      {R"({"principals": [{"token_sha256": []}]})", "needs a \"name\""},
      {R"({"principals": [{"name": "has space", "token_sha256": []}]})",
       "principals[0].name: must be printable"},
      {R"({"principals": [{"name": "p"}]})", "needs at least one of"},
      {R"({"principals": [{"name": "p", "token_sha256": ["abc"]}]})",
       "token_sha256[0]: must be the 64 hex digits"},
      {absl::StrCat(R"({"principals": [{"name": "p", "token_sha256": [")",
                    std::string(64, 'g'), R"("]}]})"),
       "token_sha256[0]: is not hexadecimal"},
      {R"({"principals": [{"name": "p", "token_sha256": "abc"}]})",
       "token_sha256: must be an array"},
      {R"({"principals": [{"name": "p", "certificate_names": [""]}]})",
       "certificate_names[0]: must be a non-empty string"},
      {one(R"(, "tokens": [])"), "principals[0]: unknown key \"tokens\""},
      {one(R"(, "roles": {"m": "read"})"), "roles: must be an array"},
      {one(R"(, "roles": [{"models": "m"}])"),
       "roles[0]: must be an object with \"models\" and \"role\""},
      {one(R"(, "roles": [{"models": "m", "role": "owner"}])"),
       "roles[0].role: must be \"read\", \"write\" or \"admin\""},
      {one(R"(, "roles": [{"models": "", "role": "read"}])"),
       "roles[0].models: must be 1 to 256"},
      {one(R"(, "roles": [{"models": "m", "role": "read", "x": 1}])"),
       "roles[0]: unknown key \"x\""},
      {one(R"(, "description": 5)"), "description: must be a string"},
      {absl::StrCat(R"({"principals": [{"name": "a", "token_sha256": [")", hash,
                    R"("]}, {"name": "b", "token_sha256": [")", hash,
                    R"("]}]})"),
       "principals[1].token_sha256[0]: is also given to principal \"a\""},
      {R"({"principals": [{"name": "a", "certificate_names": ["c"]},
                          {"name": "a", "certificate_names": ["d"]}]})",
       "principals[1].name: is also given to principal \"a\""},
      {R"({"principals": [{"name": "a", "certificate_names": ["c"]},
                          {"name": "b", "certificate_names": ["c"]}]})",
       "principals[1].certificate_names[0]: is also given"},
  };
  for (const Case& c : cases) {
    absl::StatusOr<AccessPolicy> policy = AccessPolicy::Parse(c.json);
    ASSERT_FALSE(policy.ok()) << c.json;
    EXPECT_EQ(policy.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(policy.status().message(), HasSubstr(c.message)) << c.json;
  }
  // The well-formed one in the same shape parses.
  EXPECT_TRUE(AccessPolicy::Parse(one("")).ok());
  EXPECT_TRUE(AccessPolicy::Parse(R"({"principals": []})").ok());
}

TEST(AccessPolicyTest, LoadFileNamesThePath) {
  absl::StatusOr<AccessPolicy> missing =
      AccessPolicy::LoadFile("/nonexistent/policy.json");
  EXPECT_FALSE(missing.ok());
  EXPECT_THAT(missing.status().message(),
              HasSubstr("/nonexistent/policy.json"));
}

}  // namespace
}  // namespace modelstate

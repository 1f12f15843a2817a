// The access gate without a network: credentials in, the principal or the
// status to answer with out; the bearer form; the create-on-load rule; the
// audit line's exact text.
#include "access/access_gate.h"

#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "common/file_util.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace modelstate {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;
using ::testing::Not;

constexpr char kReaderToken[] = "reader-secret";
constexpr char kWriterToken[] = "writer-secret";
constexpr char kAdminToken[] = "admin-secret";

std::string TempPath(const std::string& name) {
  const char* dir = std::getenv("TEST_TMPDIR");
  return absl::StrCat(dir != nullptr ? dir : "/tmp", "/access_gate_test_",
                      getpid(), "_", name);
}

std::string WriteFile(const std::string& name, const std::string& text) {
  const std::string path = TempPath(name);
  std::ofstream(path) << text;
  return path;
}

std::string Policy() {
  auto principal = [](const char* name, const char* token, const char* role) {
    return absl::StrCat(R"({"name": ")", name, R"(", "token_sha256": [")",
                        Sha256Hex(token), R"("], "roles": [{"models": "m*", )",
                        R"("role": ")", role, R"("}]})");
  };
  return absl::StrCat(R"({"principals": [)",
                      principal("reader", kReaderToken, "read"), ",",
                      principal("writer", kWriterToken, "write"), ",",
                      principal("admin", kAdminToken, "admin"), "]}");
}

CallerCredentials Bearer(const std::string& token) {
  CallerCredentials credentials;
  credentials.authorization.push_back(BearerAuthorization(token));
  return credentials;
}

// A gate over the test policy that records every refusal's reason.
class AccessGateTest : public ::testing::Test {
 protected:
  void SetUp() override {
    path_ = WriteFile("policy.json", Policy());
    absl::StatusOr<std::unique_ptr<PolicyFile>> file =
        PolicyFile::Open(path_, absl::InfiniteDuration());
    ASSERT_TRUE(file.ok()) << file.status();
    file_ = *std::move(file);
    gate_ = std::make_unique<AccessGate>(
        file_.get(), nullptr,
        [this](AuthFailure failure) { refusals_.push_back(failure); });
  }
  void TearDown() override { std::remove(path_.c_str()); }

  std::string path_;
  std::unique_ptr<PolicyFile> file_;
  std::unique_ptr<AccessGate> gate_;
  std::vector<AuthFailure> refusals_;
};

TEST(BearerTest, BuildsAndParsesTheOneForm) {
  EXPECT_EQ(BearerAuthorization("t0k"), "Bearer t0k");
  EXPECT_EQ(BearerTokenOf("Bearer t0k"), "t0k");
  EXPECT_EQ(BearerTokenOf("bEARER t0k"), "t0k");
  EXPECT_EQ(BearerTokenOf("Bearer "), std::nullopt);
  EXPECT_EQ(BearerTokenOf("Bearer a b"), std::nullopt);
  EXPECT_EQ(BearerTokenOf("Basic dXNlcg=="), std::nullopt);
  EXPECT_EQ(BearerTokenOf("t0k"), std::nullopt);
}

TEST(MethodTest, ActionsWritesAndOpenMethods) {
  EXPECT_EQ(ActionOfMethod("/modelstate.v1.ModelState/LoadStateDict"),
            Action::kLoadStateDict);
  EXPECT_EQ(ActionOfMethod("/modelstate.v1.ModelState/Nope"), std::nullopt);
  EXPECT_EQ(ActionOfMethod("/other.Service/GetModel"), std::nullopt);
  EXPECT_TRUE(IsWrite(Action::kLoadStateDictCreate));
  EXPECT_TRUE(IsWrite(Action::kRollbackModel));
  EXPECT_FALSE(IsWrite(Action::kStateDict));
  EXPECT_TRUE(IsOpenMethod("/grpc.health.v1.Health/Check"));
  EXPECT_TRUE(IsOpenMethod(
      "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"));
  EXPECT_FALSE(IsOpenMethod("/modelstate.v1.ModelState/ListModels"));
}

TEST(AccessGateWithoutPolicyTest, EveryCallerIsAnonymousAndMayDoAll) {
  const AccessGate gate(nullptr, nullptr);
  EXPECT_FALSE(gate.enforcing());
  absl::StatusOr<Caller> caller = gate.Admit({}, Action::kDeleteModel, "m");
  ASSERT_TRUE(caller.ok()) << caller.status();
  EXPECT_EQ(caller->name(), "anonymous");
  EXPECT_TRUE(caller->CanRead("anything"));
  EXPECT_TRUE(gate.MayCreateOnLoad(*caller, "m"));
  EXPECT_TRUE(gate.CheckHeaders("/modelstate.v1.ModelState/GetModel", {}).ok());
}

TEST_F(AccessGateTest, AdmitsKnownTokensByRole) {
  absl::StatusOr<Caller> writer =
      gate_->Admit(Bearer(kWriterToken), Action::kLoadStateDict, "m1");
  ASSERT_TRUE(writer.ok()) << writer.status();
  EXPECT_EQ(writer->name(), "writer");
  EXPECT_TRUE(writer->CanRead("m2"));
  EXPECT_FALSE(writer->CanRead("other"));

  const absl::Status denied =
      gate_->Admit(Bearer(kReaderToken), Action::kLoadStateDict, "m1").status();
  EXPECT_EQ(denied.code(), absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(denied.message(),
            "principal \"reader\" has role read on model \"m1\"; "
            "LoadStateDict needs role write");
  EXPECT_THAT(refusals_, ElementsAre(AuthFailure::kPermissionDenied));
}

TEST_F(AccessGateTest, RefusesUnknownMissingAndMalformedCredentials) {
  const absl::Status unknown = gate_->Authenticate(Bearer("guess")).status();
  EXPECT_EQ(unknown.code(), absl::StatusCode::kUnauthenticated);
  EXPECT_EQ(unknown.message(), "unknown bearer token");
  const absl::Status missing = gate_->Authenticate({}).status();
  EXPECT_EQ(missing.code(), absl::StatusCode::kUnauthenticated);
  EXPECT_THAT(missing.message(), HasSubstr("no credentials"));
  CallerCredentials basic;
  basic.authorization.push_back("Basic dXNlcg==");
  EXPECT_EQ(gate_->Authenticate(basic).status().message(),
            "malformed authorization metadata: want \"Bearer <token>\"");
  EXPECT_THAT(refusals_, ElementsAre(AuthFailure::kUnknownToken,
                                     AuthFailure::kMissingCredentials,
                                     AuthFailure::kMalformedCredentials));
}

TEST_F(AccessGateTest, HeadersOfOpenMethodsNeedNoCredentials) {
  EXPECT_TRUE(gate_->CheckHeaders("/grpc.health.v1.Health/Check", {}).ok());
  EXPECT_THAT(refusals_, IsEmpty());
  EXPECT_EQ(
      gate_->CheckHeaders("/modelstate.v1.ModelState/ListModels", {}).code(),
      absl::StatusCode::kUnauthenticated);
  EXPECT_TRUE(gate_
                  ->CheckHeaders("/modelstate.v1.ModelState/ListModels",
                                 Bearer(kReaderToken))
                  .ok());
}

TEST_F(AccessGateTest, BareTokensAnswerToTheSamePolicy) {
  EXPECT_TRUE(gate_->AdmitToken(kReaderToken, Action::kStateDict, "m1").ok());
  EXPECT_EQ(gate_->AdmitToken("", Action::kStateDict, "m1").code(),
            absl::StatusCode::kUnauthenticated);
  EXPECT_EQ(gate_->AdmitToken(kReaderToken, Action::kStateDict, "x").code(),
            absl::StatusCode::kPermissionDenied);
}

TEST_F(AccessGateTest, OnlyAdminsCreateOnLoad) {
  absl::StatusOr<Caller> writer = gate_->Authenticate(Bearer(kWriterToken));
  absl::StatusOr<Caller> admin = gate_->Authenticate(Bearer(kAdminToken));
  ASSERT_TRUE(writer.ok() && admin.ok());
  EXPECT_TRUE(gate_->MayCreateOnLoad(*admin, "m9"));
  EXPECT_FALSE(gate_->MayCreateOnLoad(*writer, "m9"));
  EXPECT_THAT(refusals_, IsEmpty());  // The load may still go on.
  const absl::Status refused = gate_->RefuseCreateOnLoad(*writer, "m9");
  EXPECT_EQ(refused.code(), absl::StatusCode::kPermissionDenied);
  EXPECT_THAT(refused.message(),
              HasSubstr("LoadStateDict+create needs role admin"));
  EXPECT_THAT(refusals_, ElementsAre(AuthFailure::kPermissionDenied));
}

TEST(AuditLineTest, ExactText) {
  AuditEntry entry;
  entry.principal = "writer";
  entry.action = Action::kLoadStateDictCreate;
  entry.model = "m\"1\n";
  entry.version = 3;
  entry.bytes = 4096;
  entry.code = absl::StatusCode::kPermissionDenied;
  entry.peer = "ipv4:127.0.0.1:5000";
  EXPECT_EQ(FormatAuditLine(entry, absl::FromUnixSeconds(0)),
            "audit: time=1970-01-01T00:00:00+00:00 principal=writer "
            "action=LoadStateDict+create model=\"m\\\"1\\n\" version=3 "
            "bytes=4096 status=PERMISSION_DENIED peer=ipv4:127.0.0.1:5000\n");
}

TEST(AuditLineTest, GateAuditsWritesOnlyAndVersionsOfSuccessesOnly) {
  const std::string path = TempPath("audit.log");
  std::remove(path.c_str());
  {
    absl::StatusOr<std::unique_ptr<AuditLog>> log = AuditLog::Open(path);
    ASSERT_TRUE(log.ok()) << log.status();
    const AccessGate gate(nullptr, log->get());
    const Caller anonymous = Caller::Anonymous();
    gate.Audit(&anonymous, Action::kStateDict, "m", 1, 2, absl::StatusCode::kOk,
               "p");
    gate.Audit(&anonymous, Action::kRollbackModel, "m", 7, 2,
               absl::StatusCode::kOk, "p");
    gate.Audit(nullptr, Action::kDeleteModel, "m", 7, 0,
               absl::StatusCode::kUnauthenticated, "");
  }
  absl::StatusOr<std::string> text = ReadFileToString(path);
  std::remove(path.c_str());
  ASSERT_TRUE(text.ok()) << text.status();
  EXPECT_THAT(*text, HasSubstr("principal=anonymous action=RollbackModel "
                               "model=\"m\" version=7 bytes=2 status=OK "
                               "peer=p\n"));
  EXPECT_THAT(*text, HasSubstr("principal=- action=DeleteModel model=\"m\" "
                               "version=0 bytes=0 status=UNAUTHENTICATED "
                               "peer=-\n"));
  EXPECT_THAT(*text, Not(HasSubstr("StateDict")));
}

}  // namespace
}  // namespace modelstate

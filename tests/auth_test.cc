// Authentication and per-model authorization over the wire: every role and
// credential case against an in-process server on 127.0.0.1:0 (tokens and
// mTLS certificates), policy reloads (file change, SIGHUP) with streams in
// flight, the audit log, the auth-failure metrics, reflection off, and the
// clients' token options (modelstatectl --token_file and $MODELSTATE_TOKEN).
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <fstream>
#include <functional>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "access/access_policy.h"
#include "gmock/gmock.h"
#include "grpc/reflection/v1alpha/reflection.grpc.pb.h"
#include "grpcpp/client_context.h"
#include "grpcpp/create_channel.h"
#include "gtest/gtest.h"
#include "modelstate/v1/model_state.grpc.pb.h"
#include "server/server.h"
#include "tests/test_support.h"

namespace modelstate {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;
using testing_support::CommandResult;
using testing_support::CoreState;
using testing_support::CtlPath;
using testing_support::Daemon;
using testing_support::DaemonPath;
using testing_support::FilledLike;
using testing_support::ReadSourceFile;
using testing_support::RunCommand;
using testing_support::ScratchDir;
using testing_support::StartServer;

constexpr char kReaderToken[] = "reader-token-0f3a9c";
constexpr char kWriterToken[] = "writer-token-77b1e2";
constexpr char kAdminToken[] = "admin-token-c4d5e6";
constexpr char kLateToken[] = "late-token-9a8b7c";

// Bound of every wait for something asynchronous (a reload, a log line).
constexpr absl::Duration kWait = absl::Seconds(20);

// reader: read on team-*; writer: write on team-*; ops: admin everywhere;
// worker (by certificate CN): read on team-a; trainer (by certificate SAN):
// write on team-*.
std::string PolicyJson(bool with_reader = true) {
  std::string principals = absl::StrCat(
      R"({"name": "writer", "token_sha256": [")", Sha256Hex(kWriterToken),
      R"("], "roles": [{"models": "team-*", "role": "write"}]},
      {"name": "ops", "token_sha256": [")",
      Sha256Hex(kAdminToken),
      R"("], "roles": [{"models": "*", "role": "admin"}]},
      {"name": "worker", "certificate_names": ["worker"],
       "roles": [{"models": "team-a", "role": "read"}]},
      {"name": "trainer", "certificate_names": ["spiffe://ml/trainer"],
       "roles": [{"models": "team-*", "role": "write"}]})");
  if (with_reader) {
    absl::StrAppend(&principals, R"(, {"name": "reader", "token_sha256": [")",
                    Sha256Hex(kReaderToken),
                    R"("], "roles": [{"models": "team-*", "role": "read"}]})");
  }
  return absl::StrCat(R"({"version": 1, "principals": [)", principals, "]}");
}

void WriteFile(const std::string& path, const std::string& text) {
  // Write then rename, as an operator's tool (or a Secret update) would, so a
  // poll never reads half a file.
  const std::string temp = path + ".tmp";
  std::ofstream(temp) << text;
  ASSERT_EQ(std::rename(temp.c_str(), path.c_str()), 0);
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

// Waits up to kWait for `done`, polling.
bool Eventually(const std::function<bool()>& done) {
  const absl::Time deadline = absl::Now() + kWait;
  while (absl::Now() < deadline) {
    if (done()) return true;
    absl::SleepFor(absl::Milliseconds(20));
  }
  return done();
}

// An in-process server with the test policy and three models: team-a, team-b
// (readable by the team) and other.
class AuthTest : public ::testing::Test {
 protected:
  void SetUp() override {
    policy_path_ = dir_.file("policy.json");
    WriteFile(policy_path_, PolicyJson());
  }

  ServerOptions Options() {
    ServerOptions options;
    options.auth_policy_file = policy_path_;
    options.auth_policy_poll_interval = absl::Milliseconds(20);
    options.retain_versions = 4;
    options.audit_log = dir_.file("audit.log");
    return options;
  }

  void Start(ServerOptions options) {
    server_ = StartServer(options);
    ASSERT_NE(server_, nullptr);
    for (const char* model : {"team-a", "team-b", "other"}) {
      ASSERT_TRUE(
          server_->store()
              .CreateFromSpec(model, ReadSourceFile("tests/models/mlp.json"), 0)
              .ok());
    }
  }

  std::string Target() const {
    return "127.0.0.1:" + std::to_string(server_->port());
  }

  std::unique_ptr<Client> As(const std::string& token) {
    ClientOptions options;
    options.timeout = testing_support::kCallTimeout;
    options.token = token;
    return Client::Connect(Target(), options).value();
  }

  // A call with raw "authorization" metadata values.
  grpc::Status GetWithMetadata(const std::vector<std::string>& values) {
    auto stub = v1::ModelState::NewStub(As("")->channel());
    grpc::ClientContext context;
    context.set_deadline(absl::ToChronoTime(absl::Now() + kWait));
    for (const std::string& value : values)
      context.AddMetadata("authorization", value);
    v1::GetModelRequest request;
    request.set_model("team-a");
    v1::GetModelResponse response;
    return stub->GetModel(&context, request, &response);
  }

  StateDict NewState(const std::string& model, float value) {
    return FilledLike(CoreState(*server_, model), value);
  }

  int64_t VersionOf(const std::string& model) {
    return server_->store().GetSnapshot(model).value().version;
  }

  ScratchDir dir_;
  std::string policy_path_;
  std::unique_ptr<Server> server_;
};

// Every model call, with what it needs.
struct Call {
  const char* name;
  std::function<absl::Status(Client&, const std::string& model)> run;
};

std::vector<Call> EveryCall() {
  return {
      {"GetModel",
       [](Client& c, const std::string& m) { return c.GetModel(m).status(); }},
      {"StateDict",
       [](Client& c, const std::string& m) {
         return c.StateDict(FetchRequest(m)).status();
       }},
      {"WatchModel",
       [](Client& c, const std::string& m) {
         return c.Watch(m, [](const ModelEvent&) { return false; });
       }},
      {"LoadStateDict",
       [](Client& c, const std::string& m) {
         return c.LoadStateDict(LoadRequest(m), StateDict()).status();
       }},
      {"RollbackModel",
       [](Client& c, const std::string& m) {
         return c.RollbackModel(m, 1).status();
       }},
      {"CreateModel",
       [](Client& c, const std::string& m) {
         return c.CreateModel(m, R"({"type": "ReLU"})").status();
       }},
      {"DeleteModel",
       [](Client& c, const std::string& m) { return c.DeleteModel(m); }},
  };
}

TEST_F(AuthTest, MissingUnknownAndMalformedCredentialsAreUnauthenticated) {
  Start(Options());
  for (const std::string& token : {std::string(), std::string("not-a-token")}) {
    auto client = As(token);
    EXPECT_EQ(client->ListModels().status().code(),
              absl::StatusCode::kUnauthenticated);
    for (const Call& call : EveryCall()) {
      const absl::Status status = call.run(*client, "team-a");
      EXPECT_EQ(status.code(), absl::StatusCode::kUnauthenticated)
          << call.name << " with token \"" << token << "\": " << status;
    }
  }
  EXPECT_THAT(As("")->ListModels().status().message(),
              HasSubstr("no credentials"));
  EXPECT_THAT(As("not-a-token")->ListModels().status().message(),
              HasSubstr("unknown bearer token"));
  for (const std::vector<std::string>& values :
       std::vector<std::vector<std::string>>{
           {"Basic d3JpdGVyOnB3"},
           {"Bearer"},
           {kReaderToken},
           {std::string("Bearer ") + kReaderToken,
            std::string("Bearer ") + kWriterToken}}) {
    const grpc::Status status = GetWithMetadata(values);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAUTHENTICATED)
        << values[0];
    EXPECT_THAT(status.error_message(), Not(HasSubstr(kReaderToken)));
  }
  EXPECT_THAT(GetWithMetadata({"Basic d3JpdGVyOnB3"}).error_message(),
              HasSubstr("malformed"));
  EXPECT_TRUE(GetWithMetadata({std::string("bearer ") + kReaderToken}).ok());
  // Nothing changed.
  EXPECT_EQ(server_->store().Summaries().size(), 3u);
  EXPECT_EQ(VersionOf("team-a"), 1);
  // A client refuses to send a token that would make a malformed header.
  ClientOptions spaced;
  spaced.token = "has space";
  EXPECT_EQ(Client::Connect(Target(), spaced).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(AuthTest, ReadRoleReadsAndCannotWrite) {
  Start(Options());
  auto reader = As(kReaderToken);
  EXPECT_TRUE(reader->GetModel("team-a").ok());
  EXPECT_TRUE(reader->StateDict(FetchRequest("team-b")).ok());
  std::vector<ModelEvent> events;
  EXPECT_TRUE(reader
                  ->Watch("team-a",
                          [&events](const ModelEvent& event) {
                            events.push_back(event);
                            return false;
                          })
                  .ok());
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].type, ModelEvent::Type::kCurrent);

  const absl::Status load =
      reader->LoadStateDict("team-a", NewState("team-a", 2)).status();
  EXPECT_EQ(load.code(), absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(load.message(),
            "principal \"reader\" has role read on model \"team-a\"; "
            "LoadStateDict needs role write");
  const absl::Status rollback = reader->RollbackModel("team-a", 1).status();
  EXPECT_EQ(rollback.code(), absl::StatusCode::kPermissionDenied);
  EXPECT_THAT(rollback.message(), HasSubstr("needs role write"));
  for (const char* model : {"team-new"}) {
    const absl::Status create =
        reader->CreateModel(model, R"({"type": "ReLU"})").status();
    EXPECT_EQ(create.code(), absl::StatusCode::kPermissionDenied);
    EXPECT_THAT(create.message(), HasSubstr("CreateModel needs role admin"));
  }
  const absl::Status deleted = reader->DeleteModel("team-a");
  EXPECT_EQ(deleted.code(), absl::StatusCode::kPermissionDenied);
  EXPECT_THAT(deleted.message(), HasSubstr("DeleteModel needs role admin"));
  EXPECT_EQ(VersionOf("team-a"), 1);
  EXPECT_FALSE(server_->store().GetSnapshot("team-new").ok());
}

TEST_F(AuthTest, WriteRoleWritesAndCannotCreateOrDelete) {
  Start(Options());
  auto writer = As(kWriterToken);
  absl::StatusOr<LoadOutcome> loaded =
      writer->LoadStateDict("team-a", NewState("team-a", 3));
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_EQ(loaded->version, 2);
  ASSERT_TRUE(writer->RollbackModel("team-a", 1).ok());
  EXPECT_EQ(VersionOf("team-a"), 3);
  const absl::Status create =
      writer->CreateModel("team-c", R"({"type": "ReLU"})").status();
  EXPECT_EQ(create.code(), absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(create.message(),
            "principal \"writer\" has role write on model \"team-c\"; "
            "CreateModel needs role admin");
  EXPECT_EQ(writer->DeleteModel("team-b").code(),
            absl::StatusCode::kPermissionDenied);
  EXPECT_TRUE(server_->store().GetSnapshot("team-b").ok());
}

// A load that would create its model is a create: the writer's is refused
// (and creates nothing), a load into an existing model with the same option is
// a plain write, and an admin's creates. The audit log tells them apart.
TEST_F(AuthTest, CreatingThroughALoadNeedsAdmin) {
  Start(Options());
  const StateDict state = NewState("team-a", 2);
  LoadRequest create_new("team-new");
  create_new.create_if_missing = true;
  const absl::Status refused =
      As(kWriterToken)->LoadStateDict(create_new, state).status();
  EXPECT_EQ(refused.code(), absl::StatusCode::kPermissionDenied) << refused;
  EXPECT_EQ(refused.message(),
            "principal \"writer\" has role write on model \"team-new\"; "
            "LoadStateDict+create needs role admin");
  EXPECT_FALSE(server_->store().GetSnapshot("team-new").ok());
  EXPECT_EQ(server_->store().Summaries().size(), 3u);

  LoadRequest into_existing("team-a");
  into_existing.create_if_missing = true;
  absl::StatusOr<LoadOutcome> written =
      As(kWriterToken)->LoadStateDict(into_existing, state);
  ASSERT_TRUE(written.ok()) << written.status();
  EXPECT_FALSE(written->created);
  EXPECT_EQ(written->version, 2);

  absl::StatusOr<LoadOutcome> created =
      As(kAdminToken)->LoadStateDict(create_new, state);
  ASSERT_TRUE(created.ok()) << created.status();
  EXPECT_TRUE(created->created);
  EXPECT_EQ(VersionOf("team-new"), 1);

  const std::vector<std::string> lines =
      absl::StrSplit(ReadFile(dir_.file("audit.log")), '\n', absl::SkipEmpty());
  ASSERT_EQ(lines.size(), 3u) << ReadFile(dir_.file("audit.log"));
  EXPECT_THAT(lines[0],
              HasSubstr("principal=writer action=LoadStateDict+create "
                        "model=\"team-new\" version=0 bytes=0 "
                        "status=PERMISSION_DENIED"));
  EXPECT_THAT(lines[1], HasSubstr("principal=writer action=LoadStateDict "
                                  "model=\"team-a\" version=2"));
  EXPECT_THAT(lines[1], HasSubstr("status=OK"));
  EXPECT_THAT(lines[2], HasSubstr("principal=ops action=LoadStateDict+create "
                                  "model=\"team-new\" version=1"));
  EXPECT_THAT(lines[2], HasSubstr("status=OK"));
}

TEST_F(AuthTest, PrincipalOfAnotherModelIsDeniedEverything) {
  Start(Options());
  auto writer = As(kWriterToken);
  for (const Call& call : EveryCall()) {
    const absl::Status status = call.run(*writer, "other");
    EXPECT_EQ(status.code(), absl::StatusCode::kPermissionDenied)
        << call.name << ": " << status;
    EXPECT_THAT(status.message(),
                HasSubstr("principal \"writer\" has no role on model "
                          "\"other\""));
  }
  EXPECT_EQ(VersionOf("other"), 1);
}

TEST_F(AuthTest, AdminMayDoEverything) {
  Start(Options());
  auto ops = As(kAdminToken);
  ASSERT_TRUE(
      ops->CreateModel("fresh", R"({"type": "Linear", "args": [2, 2]})").ok());
  ASSERT_TRUE(ops->LoadStateDict("fresh", NewState("fresh", 1)).ok());
  ASSERT_TRUE(ops->RollbackModel("fresh", 1).ok());
  EXPECT_TRUE(ops->StateDict(FetchRequest("other")).ok());
  ASSERT_TRUE(ops->DeleteModel("fresh").ok());
  ASSERT_TRUE(ops->DeleteModel("other").ok());
  EXPECT_EQ(server_->store().Summaries().size(), 2u);
}

std::vector<std::string> Names(const std::vector<ModelSummary>& models) {
  std::vector<std::string> names;
  for (const ModelSummary& model : models) names.push_back(model.name);
  return names;
}

TEST_F(AuthTest, ListModelsShowsOnlyReadableModels) {
  Start(Options());
  EXPECT_THAT(Names(As(kReaderToken)->ListModels().value()),
              ::testing::ElementsAre("team-a", "team-b"));
  EXPECT_THAT(Names(As(kAdminToken)->ListModels().value()),
              ::testing::ElementsAre("other", "team-a", "team-b"));
}

// The status of a reflection call listing the services of `channel`'s server.
grpc::StatusCode ReflectionCode(const std::shared_ptr<grpc::Channel>& channel) {
  auto reflection =
      grpc::reflection::v1alpha::ServerReflection::NewStub(channel);
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(absl::Now() + kWait));
  auto stream = reflection->ServerReflectionInfo(&context);
  grpc::reflection::v1alpha::ServerReflectionRequest request;
  request.set_list_services("*");
  stream->Write(request);
  stream->WritesDone();
  grpc::reflection::v1alpha::ServerReflectionResponse response;
  while (stream->Read(&response)) {
  }
  return stream->Finish().error_code();
}

TEST_F(AuthTest, HealthStaysOpenAndReflectionCanBeTurnedOff) {
  ServerOptions options = Options();
  options.health_listen = "127.0.0.1:0";
  options.reflection = false;
  Start(options);
  EXPECT_TRUE(As("")->CheckHealth().value());
  EXPECT_TRUE(As("")->CheckHealth("modelstate.v1.ModelState").value());
  EXPECT_TRUE(
      Client::Connect("127.0.0.1:" + std::to_string(server_->health_port()))
          .value()
          ->CheckHealth()
          .value());

  EXPECT_EQ(ReflectionCode(As(kAdminToken)->channel()),
            grpc::StatusCode::UNIMPLEMENTED);
  EXPECT_EQ(ReflectionCode(grpc::CreateChannel(
                "127.0.0.1:" + std::to_string(server_->health_port()),
                grpc::InsecureChannelCredentials())),
            grpc::StatusCode::UNIMPLEMENTED);
}

TEST_F(AuthTest, ReflectionIsOnByDefault) {
  Start(Options());
  EXPECT_EQ(ReflectionCode(As("")->channel()), grpc::StatusCode::OK);
}

// Keeps a watch of `model` open as `client` on a thread of its own, recording
// its events, until destroyed.
class WatchInFlight {
 public:
  WatchInFlight(Client* client, const std::string& model) {
    thread_ = std::thread([this, client, model] {
      status_ = client->Watch(
          model,
          [this](const ModelEvent& event) {
            absl::MutexLock lock(&mu_);
            versions_.push_back(event.version);
            return true;
          },
          &canceller_);
      ended_.Notify();
    });
  }
  ~WatchInFlight() {
    canceller_.Cancel();
    thread_.join();
  }
  bool Saw(int64_t version) {
    absl::MutexLock lock(&mu_);
    return std::find(versions_.begin(), versions_.end(), version) !=
           versions_.end();
  }
  bool ended() const { return ended_.HasBeenNotified(); }

 private:
  CallCanceller canceller_;
  absl::Mutex mu_;
  std::vector<int64_t> versions_ ABSL_GUARDED_BY(mu_);
  absl::Status status_;
  absl::Notification ended_;
  std::thread thread_;
};

TEST_F(AuthTest, FileChangeReloadsThePolicyAndStreamsSurvive) {
  Start(Options());
  auto reader = As(kReaderToken);
  WatchInFlight watch(reader.get(), "team-a");
  ASSERT_TRUE(Eventually([&] { return watch.Saw(1); }));

  // The reader loses its token; new calls are refused, the open watch goes on.
  WriteFile(policy_path_, PolicyJson(/*with_reader=*/false));
  ASSERT_TRUE(Eventually([&] {
    return reader->GetModel("team-a").status().code() ==
           absl::StatusCode::kUnauthenticated;
  }));
  ASSERT_TRUE(
      As(kWriterToken)->LoadStateDict("team-a", NewState("team-a", 5)).ok());
  EXPECT_TRUE(Eventually([&] { return watch.Saw(2); }));
  EXPECT_FALSE(watch.ended());

  // And gets it back.
  WriteFile(policy_path_, PolicyJson());
  EXPECT_TRUE(
      Eventually([&] { return reader->GetModel("team-a").status().ok(); }));
}

TEST_F(AuthTest, BadPolicyOnReloadKeepsTheOldOne) {
  Start(Options());
  auto reader = As(kReaderToken);
  // A broken file seen by the poller, then asked for explicitly (SIGHUP).
  WriteFile(policy_path_, R"({"principals": [{"name": "x"}]})");
  absl::SleepFor(absl::Milliseconds(200));  // Ten poll intervals.
  EXPECT_TRUE(reader->GetModel("team-a").ok());
  const absl::Status reloaded = server_->ReloadAuthPolicy();
  EXPECT_EQ(reloaded.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(reloaded.message(), HasSubstr("needs at least one of"));
  EXPECT_TRUE(reader->GetModel("team-a").ok());
  EXPECT_EQ(As("")->GetModel("team-a").status().code(),
            absl::StatusCode::kUnauthenticated);
  // Fixed: the next poll takes it.
  WriteFile(policy_path_, PolicyJson(/*with_reader=*/false));
  EXPECT_TRUE(Eventually([&] {
    return reader->GetModel("team-a").status().code() ==
           absl::StatusCode::kUnauthenticated;
  }));
}

TEST_F(AuthTest, AuditLogHasOneLinePerWrite) {
  Start(Options());
  auto writer = As(kWriterToken);
  auto reader = As(kReaderToken);
  const StateDict state = NewState("team-a", 4);
  const uint64_t bytes = state.TotalBytes();
  ASSERT_TRUE(writer->LoadStateDict("team-a", state).ok());
  ASSERT_TRUE(writer->RollbackModel("team-a", 1).ok());
  EXPECT_FALSE(reader->LoadStateDict("team-b", state).ok());
  EXPECT_FALSE(writer->CreateModel("team-x", R"({"type": "ReLU"})").ok());
  EXPECT_FALSE(As("")->DeleteModel("team-b").ok());
  ASSERT_TRUE(As(kAdminToken)->DeleteModel("other").ok());
  // Reads are not audited.
  ASSERT_TRUE(reader->GetModel("team-a").ok());
  ASSERT_TRUE(reader->StateDict(FetchRequest("team-a")).ok());

  const std::vector<std::string> lines =
      absl::StrSplit(ReadFile(dir_.file("audit.log")), '\n', absl::SkipEmpty());
  ASSERT_EQ(lines.size(), 6u) << ReadFile(dir_.file("audit.log"));
  for (const std::string& line : lines)
    EXPECT_THAT(line, ::testing::StartsWith("audit: time=20"));
  for (int i : {0, 1, 2, 3, 5})
    EXPECT_THAT(lines[i], HasSubstr(" peer=ipv4:127.0.0.1:"));
  EXPECT_THAT(lines[0],
              HasSubstr(absl::StrCat(
                  "principal=writer action=LoadStateDict model=\"team-a\" "
                  "version=2 bytes=",
                  bytes, " status=OK")));
  EXPECT_THAT(lines[1],
              HasSubstr(absl::StrCat("principal=writer action=RollbackModel "
                                     "model=\"team-a\" version=3 bytes=",
                                     bytes, " status=OK")));
  EXPECT_THAT(lines[2], HasSubstr("principal=reader action=LoadStateDict "
                                  "model=\"team-b\" version=0 bytes=0 "
                                  "status=PERMISSION_DENIED"));
  EXPECT_THAT(lines[3], HasSubstr("principal=writer action=CreateModel "
                                  "model=\"team-x\" version=0 bytes=0 "
                                  "status=PERMISSION_DENIED"));
  // Refused from its headers, before its request was read: no model, and
  // no peer at that step.
  EXPECT_THAT(lines[4], HasSubstr("principal=- action=DeleteModel model=\"\" "
                                  "version=0 bytes=0 status=UNAUTHENTICATED "
                                  "peer=-"));
  EXPECT_THAT(lines[5], HasSubstr(absl::StrCat(
                            "principal=ops action=DeleteModel model=\"other\" "
                            "version=1 bytes=",
                            bytes, " status=OK")));
}

TEST_F(AuthTest, AuthFailuresAreCountedByReason) {
  ServerOptions options = Options();
  options.metrics_listen = "127.0.0.1:0";
  Start(options);
  EXPECT_FALSE(As("")->GetModel("team-a").ok());
  EXPECT_FALSE(As("nope")->GetModel("team-a").ok());
  EXPECT_FALSE(As("nope")->ListModels().ok());
  EXPECT_FALSE(GetWithMetadata({"Basic x"}).ok());
  EXPECT_FALSE(As(kReaderToken)->DeleteModel("team-a").ok());
  const std::vector<std::string> expected = {
      R"(modelstate_auth_failures_total{reason="missing_credentials"} 1)",
      R"(modelstate_auth_failures_total{reason="unknown_token"} 2)",
      R"(modelstate_auth_failures_total{reason="malformed_credentials"} 1)",
      R"(modelstate_auth_failures_total{reason="permission_denied"} 1)",
  };
  const std::string curl = absl::StrCat(
      "curl -s --max-time 10 http://127.0.0.1:", server_->metrics_port(),
      "/metrics");
  std::string page;
  Eventually([&] {
    page = RunCommand(curl, kWait).output;
    for (const std::string& line : expected) {
      if (page.find(line) == std::string::npos) return false;
    }
    return true;
  });
  for (const std::string& line : expected) EXPECT_THAT(page, HasSubstr(line));
}

// Makes a client certificate signed by the test CA: CN `cn` (a '/' in it
// written "\\/", as openssl's -subj wants), and the subjectAltName `san` when
// not empty ("URI:spiffe://...").
void MakeClientCertificate(const testing_support::Certificates& pki,
                           const std::string& name, const std::string& cn,
                           const std::string& san) {
  const std::string d = pki.dir;
  std::string script = absl::StrCat(
      "set -e; cd ", d, "; openssl req -newkey rsa:2048 -nodes -subj '/CN=", cn,
      "' -keyout ", name, ".key -out ", name, ".csr 2>/dev/null; ");
  std::string ext;
  if (!san.empty()) {
    absl::StrAppend(&script, "printf 'subjectAltName=", san, "\\n' > ", name,
                    ".ext; ");
    ext = absl::StrCat(" -extfile ", name, ".ext");
  }
  absl::StrAppend(&script, "openssl x509 -req -in ", name,
                  ".csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2", ext,
                  " -out ", name, ".pem 2>/dev/null");
  const CommandResult made = RunCommand(script);
  ASSERT_EQ(made.exit_code, 0) << made.output;
}

// The shared-memory side channel answers to the same policy, through the
// token its request carries. The client's gRPC target is a port where nothing
// listens, so every answer below came through the local socket.
TEST_F(AuthTest, SharedMemoryFetchAnswersToThePolicy) {
  ServerOptions options = Options();
  options.local_socket = dir_.file("modelstated.local");
  Start(options);
  const auto local_client = [&](const std::string& token) {
    ClientOptions client_options;
    client_options.timeout = testing_support::kCallTimeout;
    client_options.token = token;
    client_options.local_socket = options.local_socket;
    return Client::Connect("127.0.0.1:1", client_options).value();
  };
  absl::StatusOr<FetchedStateDict> fetched =
      local_client(kReaderToken)->StateDict(FetchRequest("team-a"));
  ASSERT_TRUE(fetched.ok()) << fetched.status();
  const StateDict stored = CoreState(*server_, "team-a");
  ASSERT_EQ(fetched->state.Keys(), stored.Keys());
  for (size_t i = 0; i < stored.size(); ++i) {
    EXPECT_EQ(fetched->state.entries()[i].tensor.bytes(),
              stored.entries()[i].tensor.bytes());
  }
  EXPECT_EQ(local_client("")->StateDict(FetchRequest("team-a")).status().code(),
            absl::StatusCode::kUnauthenticated);
  EXPECT_EQ(local_client("wrong-token")
                ->StateDict(FetchRequest("team-a"))
                .status()
                .code(),
            absl::StatusCode::kUnauthenticated);
  EXPECT_EQ(local_client(kReaderToken)
                ->StateDict(FetchRequest("other"))
                .status()
                .code(),
            absl::StatusCode::kPermissionDenied);
}

TEST_F(AuthTest, MutualTlsPrincipalsByCertificateName) {
  const testing_support::Certificates pki = testing_support::MakeCertificates();
  MakeClientCertificate(pki, "trainer", "pod-1234", "URI:spiffe://ml/trainer");
  MakeClientCertificate(pki, "stranger", "stranger", "");
  // The SPIFFE ID of trainer spelt as a common name, not a URI name.
  MakeClientCertificate(pki, "forged", "spiffe:\\/\\/ml\\/trainer", "");
  MakeClientCertificate(pki, "worker-dns", "pod-7", "DNS:worker");
  ServerOptions options = Options();
  options.tls_cert_file = pki.server_cert;
  options.tls_key_file = pki.server_key;
  options.tls_client_ca_file = pki.ca;
  Start(options);
  auto connect = [&](const std::string& cert, const std::string& token) {
    ClientOptions client;
    client.timeout = testing_support::kCallTimeout;
    client.tls_ca_file = pki.ca;
    client.tls_cert_file = pki.dir + "/" + cert + ".pem";
    client.tls_key_file = pki.dir + "/" + cert + ".key";
    client.token = token;
    return Client::Connect("localhost:" + std::to_string(server_->port()),
                           client)
        .value();
  };
  // CN=worker: read on team-a only.
  auto worker = connect("client", "");
  EXPECT_THAT(Names(worker->ListModels().value()),
              ::testing::ElementsAre("team-a"));
  EXPECT_TRUE(worker->StateDict(FetchRequest("team-a")).ok());
  EXPECT_EQ(worker->GetModel("team-b").status().code(),
            absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(
      worker->LoadStateDict("team-a", NewState("team-a", 1)).status().code(),
      absl::StatusCode::kPermissionDenied);
  // By SAN (a SPIFFE ID): write on team-*.
  auto trainer = connect("trainer", "");
  EXPECT_TRUE(trainer->LoadStateDict("team-b", NewState("team-b", 1)).ok());
  EXPECT_EQ(trainer->DeleteModel("team-b").code(),
            absl::StatusCode::kPermissionDenied);
  // A certificate the CA signed but the policy does not name.
  auto stranger = connect("stranger", "");
  const absl::Status refused = stranger->GetModel("team-a").status();
  EXPECT_EQ(refused.code(), absl::StatusCode::kUnauthenticated);
  EXPECT_THAT(refused.message(), HasSubstr("\"stranger\""));
  // A token sent over mTLS decides.
  EXPECT_TRUE(connect("stranger", kAdminToken)->GetModel("other").ok());
  // A name is matched against its own type only: a common name that spells
  // a URI is not the URI name, and a DNS name stands for a plain name.
  const absl::Status forged =
      connect("forged", "")->GetModel("team-a").status();
  EXPECT_EQ(forged.code(), absl::StatusCode::kUnauthenticated) << forged;
  EXPECT_THAT(forged.message(), HasSubstr("CN \"spiffe://ml/trainer\""));
  EXPECT_THAT(Names(connect("worker-dns", "")->ListModels().value()),
              ::testing::ElementsAre("team-a"));
}

TEST(AuthOptionsTest, LoopbackListenAddresses) {
  EXPECT_TRUE(IsLoopbackListen("127.0.0.1:50551"));
  EXPECT_TRUE(IsLoopbackListen("127.0.0.2:0"));
  EXPECT_TRUE(IsLoopbackListen("localhost:50551"));
  EXPECT_TRUE(IsLoopbackListen("[::1]:50551"));
  EXPECT_FALSE(IsLoopbackListen("0.0.0.0:50551"));
  EXPECT_FALSE(IsLoopbackListen("[::]:50551"));
  EXPECT_FALSE(IsLoopbackListen("10.1.2.3:50551"));
  EXPECT_FALSE(IsLoopbackListen(":50551"));
}

TEST(AuthOptionsTest, MalformedPolicyAtStartIsRefused) {
  ScratchDir dir;
  const std::string path = dir.file("policy.json");
  WriteFile(path, R"({"principals": [{"name": "x", "token_sha256": ["12"]}]})");
  ServerOptions options;
  options.listen = "127.0.0.1:0";
  options.auth_policy_file = path;
  absl::StatusOr<std::unique_ptr<Server>> server =
      Server::BuildAndStart(options);
  EXPECT_EQ(server.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(server.status().message(),
              HasSubstr("principals[0].token_sha256[0]: must be the 64 hex"));

  const CommandResult daemon = RunCommand(
      DaemonPath() + " --listen=127.0.0.1:0 --auth_policy=" + path, kWait);
  EXPECT_EQ(daemon.exit_code, 1);
  EXPECT_THAT(daemon.output, HasSubstr("token_sha256[0]: must be the 64 hex"));
  const CommandResult missing = RunCommand(
      DaemonPath() + " --listen=127.0.0.1:0 --auth_policy=" + path + ".nope",
      kWait);
  EXPECT_EQ(missing.exit_code, 1);
  EXPECT_THAT(missing.output, HasSubstr("policy.json.nope"));
}

// The daemon: SIGHUP reloads (only: polling is off), the audit log goes to
// stderr, and no token ever reaches the log. modelstatectl takes its token
// from --token_file or $MODELSTATE_TOKEN.
TEST(AuthDaemonTest, SighupReloadsAndTokensStayOutOfTheLog) {
  ScratchDir dir;
  const std::string policy = dir.file("policy.json");
  WriteFile(policy, PolicyJson());
  Daemon daemon({"--auth_policy=" + policy, "--auth_policy_poll=inf",
                 "--demo_model=team-a", "--log_rpcs=true"});
  ASSERT_NE(daemon.port(), 0);
  const std::string ctl =
      absl::StrCat(CtlPath(), " --server=", daemon.address(), " ");
  const std::string token_file = dir.file("token");
  std::ofstream(token_file) << kReaderToken << "\n";
  ASSERT_EQ(chmod(token_file.c_str(), 0600), 0);
  const std::string late_file = dir.file("late");
  std::ofstream(late_file) << kLateToken;
  ASSERT_EQ(chmod(late_file.c_str(), 0600), 0);

  CommandResult listed =
      RunCommand(ctl + "--token_file=" + token_file + " models");
  EXPECT_EQ(listed.exit_code, 0) << listed.output;
  EXPECT_THAT(listed.output, HasSubstr("team-a"));
  listed = RunCommand(std::string("MODELSTATE_TOKEN=") + kReaderToken + " " +
                      ctl + "models");
  EXPECT_EQ(listed.exit_code, 0) << listed.output;
  EXPECT_THAT(listed.output, HasSubstr("team-a"));
  // --token_file wins over the environment.
  listed = RunCommand(std::string("MODELSTATE_TOKEN=wrong ") + ctl +
                      "--token_file=" + token_file + " models");
  EXPECT_EQ(listed.exit_code, 0) << listed.output;
  const CommandResult anonymous = RunCommand(ctl + "models");
  EXPECT_EQ(anonymous.exit_code, 1);
  EXPECT_THAT(anonymous.output, HasSubstr("UNAUTHENTICATED"));
  const CommandResult denied =
      RunCommand(ctl + "--token_file=" + token_file + " delete team-a");
  EXPECT_EQ(denied.exit_code, 1);
  EXPECT_THAT(denied.output, HasSubstr("PERMISSION_DENIED"));
  EXPECT_THAT(denied.output, Not(HasSubstr(kReaderToken)));
  const CommandResult empty_file =
      RunCommand(ctl + "--token_file=/dev/null models");
  EXPECT_EQ(empty_file.exit_code, 1);
  EXPECT_THAT(empty_file.output, HasSubstr("holds no token"));

  // A token the policy does not hold yet; the file changes, but with polling
  // off only SIGHUP makes the daemon read it.
  EXPECT_EQ(RunCommand(ctl + "--token_file=" + late_file + " models").exit_code,
            1);
  const std::string with_late =
      absl::StrCat(R"({"principals": [{"name": "late", "token_sha256": [")",
                   Sha256Hex(kLateToken),
                   R"("], "roles": [{"models": "*", "role": "admin"}]}]})");
  WriteFile(policy, with_late);
  absl::SleepFor(absl::Milliseconds(200));
  EXPECT_EQ(RunCommand(ctl + "--token_file=" + late_file + " models").exit_code,
            1);
  ASSERT_TRUE(daemon.Signal(SIGHUP));
  ASSERT_TRUE(daemon.WaitForLog("auth policy reloaded", kWait));
  listed = RunCommand(ctl + "--token_file=" + late_file + " models");
  EXPECT_EQ(listed.exit_code, 0) << listed.output;
  // A broken policy on SIGHUP: logged, the old one stays.
  WriteFile(policy, "{not json");
  ASSERT_TRUE(daemon.Signal(SIGHUP));
  ASSERT_TRUE(daemon.WaitForLog("auth policy not reloaded", kWait));
  const CommandResult pushed =
      RunCommand(ctl + "--token_file=" + late_file + " create team-z --arch=" +
                 std::string(MODELSTATE_SOURCE_DIR) + "/tests/models/mlp.json");
  EXPECT_EQ(pushed.exit_code, 0) << pushed.output;

  ASSERT_TRUE(daemon.WaitForLog("action=CreateModel model=\"team-z\"", kWait));
  const std::string log = daemon.Log();
  EXPECT_THAT(log, HasSubstr("audit: time="));
  EXPECT_THAT(log, HasSubstr("principal=late action=CreateModel"));
  EXPECT_THAT(log, HasSubstr("principal=reader action=DeleteModel "
                             "model=\"team-a\" version=0 bytes=0 "
                             "status=PERMISSION_DENIED"));
  EXPECT_THAT(log, HasSubstr("status=UNAUTHENTICATED"));
  for (const char* token :
       {kReaderToken, kWriterToken, kAdminToken, kLateToken}) {
    EXPECT_THAT(log, Not(HasSubstr(token)));
  }
  EXPECT_EQ(daemon.Stop(SIGTERM, 30), 0);
}

// Lines of `log` that start with `prefix`.
std::vector<std::string> LinesStartingWith(const std::string& log,
                                           const std::string& prefix) {
  std::vector<std::string> found;
  for (absl::string_view line : absl::StrSplit(log, '\n')) {
    if (absl::StartsWith(line, prefix)) found.emplace_back(line);
  }
  return found;
}

// Model names go into the RPC log and the audit log, which share stderr by
// default: a name cannot forge a line there, and a huge one is refused at the
// edge and costs the log a bounded line.
TEST(AuthDaemonTest, RequestNamesCannotForgeOrFloodTheLog) {
  ScratchDir dir;
  const std::string policy = dir.file("policy.json");
  WriteFile(policy, PolicyJson());
  Daemon daemon({"--auth_policy=" + policy, "--auth_policy_poll=inf",
                 "--demo_model=team-a", "--log_rpcs=true"});
  ASSERT_NE(daemon.port(), 0);
  ClientOptions options;
  options.timeout = testing_support::kCallTimeout;
  options.token = kWriterToken;
  auto writer = Client::Connect(daemon.address(), options).value();
  auto anonymous = testing_support::ConnectTo(daemon.address());

  const std::string forged =
      "team-x\naudit: time=2030-01-01T00:00:00Z principal=admin "
      "action=DeleteModel model=\"team-a\" version=1 bytes=0 status=OK\r";
  EXPECT_EQ(writer->DeleteModel(forged).code(),
            absl::StatusCode::kPermissionDenied);
  EXPECT_FALSE(anonymous->GetModel(forged).ok());
  ASSERT_TRUE(daemon.WaitForLog("rpc=GetModel", kWait));
  std::string log = daemon.Log();
  const std::vector<std::string> audits = LinesStartingWith(log, "audit:");
  ASSERT_EQ(audits.size(), 1u) << log;
  EXPECT_THAT(audits[0], HasSubstr("principal=writer action=DeleteModel "
                                   "model=\"team-x\\naudit: time="));
  EXPECT_THAT(log, Not(HasSubstr("principal=admin action=DeleteModel "
                                 "model=\"team-a\" version=1 bytes=0 "
                                 "status=OK\r")));
  EXPECT_THAT(log, Not(HasSubstr("\r")));
  const std::vector<std::string> rpcs = LinesStartingWith(log, "rpc=");
  ASSERT_EQ(rpcs.size(), 2u) << log;
  EXPECT_THAT(rpcs[0], HasSubstr("model=\"team-x\\naudit: time="));

  // 1 MiB names, with and without credentials: refused at once, a line each
  // (without credentials before the name is read).
  const size_t before = log.size();
  const std::string huge(1 << 20, 'm');
  for (int i = 0; i < 2; ++i) {
    const absl::Status deleted = writer->DeleteModel(huge);
    EXPECT_EQ(deleted.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(deleted.message(),
                HasSubstr("model name of 1048576 bytes is longer than the "
                          "128 allowed"));
    EXPECT_EQ(anonymous->GetModel(huge).status().code(),
              absl::StatusCode::kUnauthenticated);
  }
  ASSERT_TRUE(Eventually([&] {
    return LinesStartingWith(daemon.Log(), "rpc=").size() == 6;
  })) << daemon.Log();
  log = daemon.Log();
  // Four RPC lines and two audit lines, each well under 2 KiB.
  EXPECT_LT(log.size() - before, 6u * 2048) << log.substr(before, 4096);
  EXPECT_EQ(LinesStartingWith(log, "audit:").size(), 3u);
  EXPECT_THAT(log, HasSubstr("...(1048576 bytes)"));
  EXPECT_EQ(daemon.Stop(SIGTERM, 30), 0);
}

// modelstatectl refuses a token file others may write and warns about one
// they may read, as ssh does for keys.
TEST(AuthDaemonTest, TokenFilesOthersMayWriteAreRefused) {
  ScratchDir dir;
  const std::string policy = dir.file("policy.json");
  WriteFile(policy, PolicyJson());
  Daemon daemon({"--auth_policy=" + policy, "--auth_policy_poll=inf",
                 "--demo_model=team-a"});
  ASSERT_NE(daemon.port(), 0);
  const std::string token_file = dir.file("token");
  std::ofstream(token_file) << kReaderToken << "\n";
  const std::string models =
      absl::StrCat(CtlPath(), " --server=", daemon.address(),
                   " --token_file=", token_file, " models");

  ASSERT_EQ(chmod(token_file.c_str(), 0666), 0);
  CommandResult run = RunCommand(models);
  EXPECT_EQ(run.exit_code, 1) << run.output;
  EXPECT_THAT(run.output, HasSubstr(absl::StrCat("token file ", token_file,
                                                 " has mode 0666: group or "
                                                 "others may write it")));
  EXPECT_THAT(run.output, Not(HasSubstr("team-a")));
  ASSERT_EQ(chmod(token_file.c_str(), 0620), 0);
  run = RunCommand(models);
  EXPECT_EQ(run.exit_code, 1) << run.output;
  EXPECT_THAT(run.output, HasSubstr("has mode 0620"));

  ASSERT_EQ(chmod(token_file.c_str(), 0644), 0);
  run = RunCommand(models);
  EXPECT_EQ(run.exit_code, 0) << run.output;
  EXPECT_THAT(run.output, HasSubstr("team-a"));
  EXPECT_THAT(run.output, HasSubstr(absl::StrCat(
                              "modelstatectl: warning: token file ", token_file,
                              " has mode 0644: group or "
                              "others may read the token")));

  ASSERT_EQ(chmod(token_file.c_str(), 0600), 0);
  run = RunCommand(models);
  EXPECT_EQ(run.exit_code, 0) << run.output;
  EXPECT_THAT(run.output, HasSubstr("team-a"));
  EXPECT_THAT(run.output, Not(HasSubstr("warning")));

  // Another user's file, however tight its mode, could be swapped.
  ASSERT_EQ(chown(token_file.c_str(), 65534, 65534), 0);
  run = RunCommand(models);
  EXPECT_EQ(run.exit_code, 1) << run.output;
  EXPECT_THAT(run.output, HasSubstr("belongs to uid 65534"));
  // A pipe others may write is refused as a file is.
  const std::string fifo = dir.file("token.fifo");
  ASSERT_EQ(mkfifo(fifo.c_str(), 0600), 0);
  ASSERT_EQ(chmod(fifo.c_str(), 0666), 0);
  run = RunCommand(absl::StrCat("(echo ", kReaderToken, " > ", fifo, " &); ",
                                CtlPath(), " --server=", daemon.address(),
                                " --token_file=", fifo, " models"));
  EXPECT_EQ(run.exit_code, 1) << run.output;
  EXPECT_THAT(run.output, HasSubstr("has mode 0666"));
  // Lets the writer go, should it still wait for a reader.
  close(open(fifo.c_str(), O_RDONLY | O_NONBLOCK));
  EXPECT_EQ(daemon.Stop(SIGTERM, 30), 0);
}

// Without a policy: everyone is "anonymous" and may do everything (no warning
// on loopback), SIGHUP changes nothing, and the reflection and audit-log flags
// reach the server.
TEST(AuthDaemonTest, WithoutPolicyFlagsStillApply) {
  ScratchDir dir;
  const std::string audit = dir.file("audit.log");
  Daemon daemon(
      {"--reflection=false", "--audit_log=" + audit, "--demo_model=demo"});
  ASSERT_NE(daemon.port(), 0);
  EXPECT_EQ(ReflectionCode(grpc::CreateChannel(
                daemon.address(), grpc::InsecureChannelCredentials())),
            grpc::StatusCode::UNIMPLEMENTED);
  const std::string ctl =
      absl::StrCat(CtlPath(), " --server=", daemon.address(), " ");
  const CommandResult deleted = RunCommand(ctl + "delete demo");
  EXPECT_EQ(deleted.exit_code, 0) << deleted.output;
  ASSERT_TRUE(daemon.Signal(SIGHUP));
  ASSERT_TRUE(daemon.WaitForLog("SIGHUP ignored: no --auth_policy", kWait));
  EXPECT_EQ(RunCommand(ctl + "models").exit_code, 0);
  EXPECT_THAT(ReadFile(audit),
              HasSubstr("principal=anonymous action=DeleteModel "
                        "model=\"demo\" version=1"));
  EXPECT_THAT(daemon.Log(), Not(HasSubstr("WARNING")));
  EXPECT_THAT(daemon.Log(), Not(HasSubstr("audit:")));
  EXPECT_EQ(daemon.Stop(SIGTERM, 30), 0);
}

}  // namespace
}  // namespace modelstate

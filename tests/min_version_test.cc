// Consistent reads: StateDict, GetModel and Watch with min_version wait for a
// replica to reach the version, then answer; past the deadline (or the
// server's --max_version_wait) they answer UNAVAILABLE so that the client can
// try another replica; a draining server ends its waiters at once.
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "client/client.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/test_support.h"

namespace modelstate {
namespace {

using ::testing::HasSubstr;
using testing_support::ConnectTo;
using testing_support::CtlPath;
using testing_support::RunCommand;
using testing_support::ScratchDir;
using testing_support::StartServer;

constexpr char kNet[] = R"({"type": "Linear", "args": [16, 16]})";

std::unique_ptr<Server> StartWithNet(ServerOptions options = {}) {
  std::unique_ptr<Server> server = StartServer(options);
  EXPECT_TRUE(server->store().CreateFromSpec("net", kNet, 1).ok());
  return server;
}

// Commits one more version of "net".
void LoadOnce(Server& server) {
  const StateDict state = *server.store().Fetch({"net"}).value().state;
  ASSERT_TRUE(server.store().Load({"net"}, state).ok());
}

// A client whose every call has `timeout` as its deadline.
std::unique_ptr<Client> ConnectWithTimeout(const Server& server,
                                           absl::Duration timeout) {
  ClientOptions options;
  options.timeout = timeout;
  return Client::Connect("127.0.0.1:" + std::to_string(server.port()), options)
      .value();
}

// Loads twice from another thread, `delay` apart, once `started` fires.
std::thread LoadTwiceLater(Server& server, absl::Duration delay) {
  return std::thread([&server, delay] {
    absl::SleepFor(delay);
    LoadOnce(server);
    absl::SleepFor(delay);
    LoadOnce(server);
  });
}

TEST(MinVersionTest, AFetchWaitsForTheVersionThenSucceeds) {
  auto server = StartWithNet();
  auto client = ConnectTo(*server);
  FetchRequest request("net");
  request.min_version = 3;
  const absl::Time start = absl::Now();
  std::thread loader = LoadTwiceLater(*server, absl::Milliseconds(150));
  absl::StatusOr<FetchedStateDict> fetched = client->StateDict(request);
  loader.join();
  ASSERT_TRUE(fetched.ok()) << fetched.status();
  EXPECT_EQ(fetched->version, 3);
  EXPECT_GE(absl::Now() - start, absl::Milliseconds(300));
  // A version already reached does not wait.
  request.min_version = 2;
  EXPECT_EQ(client->StateDict(request).value().version, 3);
  // An exact retained version is served as before, once min_version holds.
  request.version = 3;
  EXPECT_EQ(client->StateDict(request).value().version, 3);
}

TEST(MinVersionTest, AFetchPastTheLatestVersionIsUnavailableAtTheDeadline) {
  auto server = StartWithNet();
  auto client = ConnectWithTimeout(*server, absl::Seconds(1));
  FetchRequest request("net");
  request.min_version = 2;
  const absl::Time start = absl::Now();
  absl::StatusOr<FetchedStateDict> fetched = client->StateDict(request);
  const absl::Duration waited = absl::Now() - start;
  ASSERT_FALSE(fetched.ok());
  EXPECT_EQ(fetched.status().code(), absl::StatusCode::kUnavailable)
      << fetched.status();
  EXPECT_THAT(std::string(fetched.status().message()),
              HasSubstr("\"net\" is at version 1, asked for min_version 2"));
  EXPECT_GE(waited, absl::Milliseconds(800));
  EXPECT_LT(waited, absl::Seconds(1));
  EXPECT_EQ(server->service().version_waiter().pending(), 0);
}

TEST(MinVersionTest, GetModelWaitsThenDescribesOrIsUnavailable) {
  auto server = StartWithNet();
  auto client = ConnectTo(*server);
  std::thread loader = LoadTwiceLater(*server, absl::Milliseconds(100));
  absl::StatusOr<ModelManifest> manifest = client->GetModel("net", "", 0, 3);
  loader.join();
  ASSERT_TRUE(manifest.ok()) << manifest.status();
  EXPECT_EQ(manifest->version, 3);

  auto impatient = ConnectWithTimeout(*server, absl::Milliseconds(500));
  const absl::Time start = absl::Now();
  absl::StatusOr<ModelManifest> missing = impatient->GetModel("net", "", 0, 4);
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kUnavailable)
      << missing.status();
  EXPECT_THAT(std::string(missing.status().message()),
              HasSubstr("is at version 3, asked for min_version 4"));
  EXPECT_LT(absl::Now() - start, absl::Milliseconds(500));
  // A model that does not exist yet: the wait also covers its creation.
  absl::StatusOr<ModelManifest> absent = impatient->GetModel("later", "", 0, 1);
  EXPECT_THAT(std::string(absent.status().message()),
              HasSubstr("\"later\" does not exist here"));
}

TEST(MinVersionTest, AWatchStartsAtTheVersionOrIsUnavailable) {
  auto server = StartWithNet();
  auto client = ConnectTo(*server);
  std::thread loader = LoadTwiceLater(*server, absl::Milliseconds(100));
  std::vector<ModelEvent> events;
  absl::Status watched = client->Watch(
      "net",
      [&](const ModelEvent& event) {
        events.push_back(event);
        return false;
      },
      nullptr, /*min_version=*/3);
  loader.join();
  ASSERT_TRUE(watched.ok()) << watched;
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].type, ModelEvent::Type::kCurrent);
  EXPECT_EQ(events[0].version, 3);

  auto impatient = ConnectWithTimeout(*server, absl::Milliseconds(500));
  absl::Status late = impatient->Watch(
      "net", [](const ModelEvent&) { return true; }, nullptr, 4);
  EXPECT_EQ(late.code(), absl::StatusCode::kUnavailable) << late;
  EXPECT_THAT(std::string(late.message()), HasSubstr("min_version 4"));
}

TEST(MinVersionTest, TheServersMaximumBoundsAWaitWithoutDeadline) {
  ServerOptions options;
  options.max_version_wait = absl::Milliseconds(300);
  auto server = StartWithNet(options);
  auto client = ConnectTo(*server);  // Its deadline is far beyond 300 ms.
  FetchRequest request("net");
  request.min_version = 2;
  const absl::Time start = absl::Now();
  EXPECT_EQ(client->StateDict(request).status().code(),
            absl::StatusCode::kUnavailable);
  const absl::Duration waited = absl::Now() - start;
  EXPECT_GE(waited, absl::Milliseconds(300));
  EXPECT_LT(waited, absl::Seconds(10));
}

TEST(MinVersionTest, ShutdownEndsPendingWaitersAtOnce) {
  auto server = StartWithNet();
  auto client = ConnectTo(*server);  // 120 s deadlines.
  absl::Status fetch, get, watch;
  std::vector<std::thread> waiters;
  waiters.emplace_back([&] {
    FetchRequest request("net");
    request.min_version = 9;
    fetch = client->StateDict(request).status();
  });
  waiters.emplace_back(
      [&] { get = client->GetModel("net", "", 0, 9).status(); });
  waiters.emplace_back([&] {
    watch = client->Watch(
        "net", [](const ModelEvent&) { return true; }, nullptr, 9);
  });
  const absl::Time start = absl::Now();
  while (server->service().version_waiter().pending() < 3 &&
         absl::Now() - start < absl::Seconds(30)) {
    absl::SleepFor(absl::Milliseconds(10));
  }
  ASSERT_EQ(server->service().version_waiter().pending(), 3);
  const absl::Time stop = absl::Now();
  server->Shutdown(absl::Seconds(30));
  for (std::thread& waiter : waiters) waiter.join();
  EXPECT_LT(absl::Now() - stop, absl::Seconds(10));
  for (const absl::Status& status : {fetch, get, watch})
    EXPECT_EQ(status.code(), absl::StatusCode::kUnavailable) << status;
}

TEST(MinVersionTest, ModelstatectlPullInfoAndWatchTakeMinVersion) {
  auto server = StartWithNet();
  ScratchDir dir;
  const std::string ctl =
      CtlPath() + " --server=127.0.0.1:" + std::to_string(server->port());
  testing_support::CommandResult late =
      RunCommand(ctl + " --timeout=1s pull net " + dir.file("net.safetensors") +
                 " --min_version=2 2>&1");
  EXPECT_EQ(late.exit_code, 1) << late.output;
  EXPECT_THAT(late.output, HasSubstr("UNAVAILABLE"));
  EXPECT_THAT(late.output, HasSubstr("asked for min_version 2"));
  LoadOnce(*server);
  testing_support::CommandResult pulled =
      RunCommand(ctl + " --timeout=10s pull net " +
                 dir.file("net.safetensors") + " --min_version=2 2>&1");
  EXPECT_EQ(pulled.exit_code, 0) << pulled.output;
  EXPECT_THAT(pulled.output, HasSubstr("pulled net version 2"));
  testing_support::CommandResult info =
      RunCommand(ctl + " --timeout=1s info net --min_version=3 2>&1");
  EXPECT_EQ(info.exit_code, 1) << info.output;
  EXPECT_THAT(info.output, HasSubstr("asked for min_version 3"));
  std::thread loader([&] {
    absl::SleepFor(absl::Milliseconds(200));
    LoadOnce(*server);
  });
  testing_support::CommandResult watched = RunCommand(
      ctl + " --timeout=30s watch net --count=1 --min_version=3 2>&1");
  loader.join();
  EXPECT_EQ(watched.exit_code, 0) << watched.output;
  EXPECT_EQ(watched.output, "CURRENT net 3\n");
}

}  // namespace
}  // namespace modelstate

// What the main port does before a call is admitted. Its accept loop
// (server/connection_gate.h), against an in-process server: connections
// without an admitted call are closed, admitted ones are kept, the cap evicts
// the oldest unadmitted connection, and running out of file descriptors makes
// health NOT_SERVING and heals by itself. And with an auth policy, a call
// without credentials is refused from its headers (server/header_check.h),
// before gRPC buffers its request, against a real daemon whose memory is read.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <fstream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "access/access_policy.h"
#include "client/client.h"
#include "common/sanitizers.h"
#include "gmock/gmock.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpcpp/create_channel.h"
#include "gtest/gtest.h"
#include "modelstate/v1/model_state.grpc.pb.h"
#include "server/server.h"
#include "tests/test_support.h"

namespace modelstate {
namespace {

using testing_support::ConnectTo;
using testing_support::StartServer;
using testing_support::WaitUntil;

// A TCP socket to 127.0.0.1:`port`, not yet connected.
int OpenSocket() { return socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0); }

bool Connect(int fd, int port) {
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_port = htons(static_cast<uint16_t>(port));
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  return connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) ==
         0;
}

// A connected socket that sends nothing.
int IdleConnection(int port) {
  const int fd = OpenSocket();
  EXPECT_TRUE(Connect(fd, port));
  return fd;
}

// True once the server has closed `fd` (end of stream or reset), waiting at
// most `timeout`.
bool ClosedByServer(int fd, absl::Duration timeout) {
  pollfd ready{fd, POLLIN, 0};
  if (poll(&ready, 1, static_cast<int>(absl::ToInt64Milliseconds(timeout))) <=
      0) {
    return false;
  }
  char byte;
  // Whatever the server sent (its SETTINGS) is read past until the end.
  for (int i = 0; i < 64; ++i) {
    const ssize_t got = recv(fd, &byte, 1, MSG_DONTWAIT);
    if (got == 0 || (got < 0 && errno != EAGAIN)) return true;
    if (got < 0) {
      if (poll(&ready, 1,
               static_cast<int>(absl::ToInt64Milliseconds(timeout))) <= 0)
        return false;
    }
  }
  return false;
}

// The health of `channel`'s server for the service "" (the whole server).
grpc::health::v1::HealthCheckResponse::ServingStatus Health(
    const std::shared_ptr<grpc::Channel>& channel) {
  auto stub = grpc::health::v1::Health::NewStub(channel);
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() +
                       std::chrono::seconds(10));
  grpc::health::v1::HealthCheckRequest request;
  grpc::health::v1::HealthCheckResponse response;
  if (!stub->Check(&context, request, &response).ok())
    return grpc::health::v1::HealthCheckResponse::UNKNOWN;
  return response.status();
}

TEST(ConnectionGateTest, ConnectionsWithoutACallAreClosed) {
  ServerOptions options;
  options.unauthenticated_connection_timeout = absl::Milliseconds(500);
  auto server = StartServer(options);
  const int silent = IdleConnection(server->port());
  // A client that speaks HTTP/2 but never makes a call.
  const int talker = IdleConnection(server->port());
  const std::string preface = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
  const char settings[9] = {0, 0, 0, 4, 0, 0, 0, 0, 0};
  ASSERT_EQ(send(talker, preface.data(), preface.size(), 0),
            static_cast<ssize_t>(preface.size()));
  ASSERT_EQ(send(talker, settings, sizeof(settings), 0), 9);
  EXPECT_TRUE(ClosedByServer(silent, absl::Seconds(10)));
  EXPECT_TRUE(ClosedByServer(talker, absl::Seconds(10)));
  EXPECT_EQ(server->connection_counts().expired, 2);
  close(silent);
  close(talker);
}

TEST(ConnectionGateTest, ConnectionsWithAnAdmittedCallStayOpen) {
  ServerOptions options;
  options.unauthenticated_connection_timeout = absl::Milliseconds(300);
  auto server = StartServer(options);
  auto client = ConnectTo(*server);
  ASSERT_TRUE(client->ListModels().ok());
  absl::SleepFor(absl::Seconds(2));
  ASSERT_TRUE(client->ListModels().ok());
  const ConnectionGate::Counts counts = server->connection_counts();
  EXPECT_EQ(counts.expired, 0);
  EXPECT_EQ(counts.accepted, 1);  // The second call reused the connection.
  EXPECT_EQ(counts.open, 1);
}

TEST(ConnectionGateTest, TheCapEvictsTheOldestUnadmittedConnection) {
  ServerOptions options;
  options.max_connections = 4;
  options.unauthenticated_connection_timeout = absl::Minutes(5);
  auto server = StartServer(options);
  std::vector<int> idle;
  for (int i = 0; i < 4; ++i) idle.push_back(IdleConnection(server->port()));
  ASSERT_TRUE(WaitUntil([&] { return server->connection_counts().open == 4; },
                        absl::Seconds(10)));
  // A real client still gets in: the oldest idle connection makes room.
  auto client = ConnectTo(*server);
  ASSERT_TRUE(client->ListModels().ok());
  EXPECT_TRUE(ClosedByServer(idle[0], absl::Seconds(10)));
  EXPECT_EQ(server->connection_counts().evicted, 1);
  EXPECT_EQ(server->connection_counts().open, 4);
  for (int fd : idle) close(fd);
}

TEST(ConnectionGateTest, AtTheCapOfAdmittedConnectionsNewOnesAreRefused) {
  ServerOptions options;
  options.max_connections = 2;
  auto server = StartServer(options);
  ClientOptions own;
  own.own_connection = true;
  own.timeout = absl::Seconds(60);
  const std::string address = "127.0.0.1:" + std::to_string(server->port());
  auto first = Client::Connect(address, own).value();
  auto second = Client::Connect(address, own).value();
  ASSERT_TRUE(first->ListModels().ok());
  ASSERT_TRUE(second->ListModels().ok());
  const int third = IdleConnection(server->port());
  EXPECT_TRUE(ClosedByServer(third, absl::Seconds(10)));
  EXPECT_EQ(server->connection_counts().refused, 1);
  close(third);
  // The admitted ones were left alone.
  EXPECT_TRUE(first->ListModels().ok());
  EXPECT_TRUE(second->ListModels().ok());
  EXPECT_EQ(server->connection_counts().accepted, 2);
}

// Fills every free descriptor of this process; closes them on destruction.
class DescriptorHog {
 public:
  DescriptorHog() {
    for (;;) {
      const int fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
      if (fd < 0) break;
      fds_.push_back(fd);
    }
  }
  ~DescriptorHog() { Release(); }
  void Release() {
    for (int fd : fds_) close(fd);
    fds_.clear();
  }

 private:
  std::vector<int> fds_;
};

TEST(ConnectionGateTest, RunningOutOfDescriptorsIsReportedAndHeals) {
  ServerOptions options;
  options.health_listen = "127.0.0.1:0";
  auto server = StartServer(options);
  // An established health connection needs no new descriptor to ask.
  auto health =
      grpc::CreateChannel("127.0.0.1:" + std::to_string(server->health_port()),
                          grpc::InsecureChannelCredentials());
  ASSERT_EQ(Health(health), grpc::health::v1::HealthCheckResponse::SERVING);

  // A low limit with every descriptor under it taken, as by a flood.
  rlimit original{};
  ASSERT_EQ(getrlimit(RLIMIT_NOFILE, &original), 0);
  const int refused = OpenSocket();
  rlimit low = original;
  low.rlim_cur = static_cast<rlim_t>(refused) + 256;
  ASSERT_EQ(setrlimit(RLIMIT_NOFILE, &low), 0);
  auto hog = std::make_unique<DescriptorHog>();
  ASSERT_TRUE(Connect(refused, server->port()));
  // The peer is closed at once rather than left in the backlog.
  EXPECT_TRUE(ClosedByServer(refused, absl::Seconds(10)));
  EXPECT_TRUE(
      WaitUntil([&] { return !server->accepting(); }, absl::Seconds(10)));
  EXPECT_EQ(Health(health), grpc::health::v1::HealthCheckResponse::NOT_SERVING);

  hog.reset();
  ASSERT_EQ(setrlimit(RLIMIT_NOFILE, &original), 0);
  close(refused);
  // Accepting resumes by itself, before any client knocks: a pod out of its
  // Service gets none.
  EXPECT_TRUE(
      WaitUntil([&] { return server->accepting(); }, absl::Seconds(10)));
  EXPECT_TRUE(WaitUntil(
      [&] {
        return Health(health) == grpc::health::v1::HealthCheckResponse::SERVING;
      },
      absl::Seconds(10)));
  auto client = ConnectTo(*server);
  EXPECT_TRUE(client->ListModels().ok());
  EXPECT_TRUE(server->accepting());
  EXPECT_TRUE(WaitUntil(
      [&] {
        return Health(health) == grpc::health::v1::HealthCheckResponse::SERVING;
      },
      absl::Seconds(10)));
}

TEST(ConnectionGateTest, RaisesTheSoftOpenFileLimitToTheHardOne) {
  rlimit original{};
  ASSERT_EQ(getrlimit(RLIMIT_NOFILE, &original), 0);
  if (original.rlim_max < 2048) GTEST_SKIP() << "hard limit too low to lower";
  rlimit low = original;
  low.rlim_cur = 1024;
  ASSERT_EQ(setrlimit(RLIMIT_NOFILE, &low), 0);
  EXPECT_EQ(RaiseOpenFileLimit(), original.rlim_max);
  rlimit now{};
  ASSERT_EQ(getrlimit(RLIMIT_NOFILE, &now), 0);
  EXPECT_EQ(now.rlim_cur, original.rlim_max);
  setrlimit(RLIMIT_NOFILE, &original);
}

TEST(ConnectionGateTest, TheCapStaysBelowTheOpenFileLimit) {
  rlimit original{};
  ASSERT_EQ(getrlimit(RLIMIT_NOFILE, &original), 0);
  rlimit low = original;
  low.rlim_cur = 400;
  ASSERT_EQ(setrlimit(RLIMIT_NOFILE, &low), 0);
  ConnectionGateOptions options;
  options.listen = "127.0.0.1:0";
  options.max_connections = 100000;
  auto gate = ConnectionGate::Listen(options);
  setrlimit(RLIMIT_NOFILE, &original);
  ASSERT_TRUE(gate.ok()) << gate.status();
  EXPECT_EQ((*gate)->max_connections(), 300);
}

// The daemon's flags reach the gate and gRPC: a short unauthenticated
// connection timeout, a small connection cap and one stream per connection,
// each seen from outside, with the connection metrics counting them.
TEST(ConnectionFlagsTest, TheDaemonTakesItsConnectionLimits) {
  testing_support::Daemon daemon(
      {"--demo_model=demo", "--metrics_listen=127.0.0.1:0",
       "--unauthenticated_connection_timeout=300ms", "--max_connections=3",
       "--max_concurrent_streams=1"});
  ASSERT_NE(daemon.port(), 0);
  const int metrics = testing_support::MetricsPort(daemon);
  ASSERT_NE(metrics, 0);
  const int idle = IdleConnection(daemon.port());
  EXPECT_TRUE(ClosedByServer(idle, absl::Seconds(5)));  // Not the default 10s.
  close(idle);
  EXPECT_TRUE(WaitUntil(
      [&] {
        return testing_support::MetricValue(
                   metrics, "modelstate_connections_expired_total") == 1;
      },
      absl::Seconds(10)));

  // One stream per connection: a second call waits behind an open watch.
  {
    grpc::ChannelArguments arguments;
    arguments.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
    auto channel = grpc::CreateCustomChannel(
        daemon.address(), grpc::InsecureChannelCredentials(), arguments);
    auto stub = v1::ModelState::NewStub(channel);
    grpc::ClientContext watch_context;
    v1::WatchModelRequest watch;
    watch.set_model("demo");
    auto watching = stub->WatchModel(&watch_context, watch);
    v1::WatchModelResponse event;
    ASSERT_TRUE(watching->Read(&event));
    grpc::ClientContext list_context;
    list_context.set_deadline(std::chrono::system_clock::now() +
                              std::chrono::seconds(1));
    v1::ListModelsResponse listed;
    EXPECT_EQ(stub->ListModels(&list_context, v1::ListModelsRequest(), &listed)
                  .error_code(),
              grpc::StatusCode::DEADLINE_EXCEEDED);
    watch_context.TryCancel();
    watching->Finish();
  }  // The contexts, and with them the channel, go here.
  ASSERT_TRUE(WaitUntil(
      [&] {
        return testing_support::MetricValue(metrics,
                                            "modelstate_connections_open") == 0;
      },
      absl::Seconds(10)))
      << testing_support::HttpGet(metrics, "/metrics");

  // Three connections with calls fill the cap: a fourth is refused.
  ClientOptions own;
  own.own_connection = true;
  own.timeout = absl::Seconds(60);
  std::vector<std::unique_ptr<Client>> clients;
  for (int i = 0; i < 3; ++i) {
    clients.push_back(Client::Connect(daemon.address(), own).value());
    ASSERT_TRUE(clients.back()->ListModels().ok());
  }
  const int fourth = IdleConnection(daemon.port());
  EXPECT_TRUE(ClosedByServer(fourth, absl::Seconds(10)));
  close(fourth);
  EXPECT_GE(testing_support::MetricValue(
                metrics, "modelstate_connections_refused_total"),
            1);
  EXPECT_EQ(testing_support::MetricValue(metrics, "modelstate_accepting"), 1);
}

int64_t ResidentBytes(pid_t pid) {
  std::ifstream status("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("VmRSS:", 0) == 0)
      return std::stoll(line.substr(6)) << 10;  // kB.
  }
  return -1;
}

// A policy file in `dir` whose one principal, "admin", holds "admin-token".
std::string AdminOnlyPolicy(const testing_support::ScratchDir& dir) {
  const std::string path = dir.file("policy.json");
  std::ofstream(path)
      << R"({"principals": [{"name": "admin", )"
      << R"("token_sha256": [")" << Sha256Hex("admin-token")
      << R"("], "roles": [{"models": "*", "role": "admin"}]}]})";
  return path;
}

// Calls whose request is one large message, sent without credentials: gRPC
// would read each whole request before a handler could refuse it.
grpc::StatusCode CallWithoutCredentials(v1::ModelState::Stub& stub, int kind,
                                        const std::string& name) {
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() +
                       std::chrono::seconds(60));
  if (kind == 0) {
    v1::CreateModelRequest request;
    request.set_model(name);
    v1::CreateModelResponse response;
    return stub.CreateModel(&context, request, &response).error_code();
  }
  v1::StateDictRequest request;
  request.set_model(name);
  auto reader = stub.StateDict(&context, request);
  v1::StateDictResponse response;
  while (reader->Read(&response)) {
  }
  return reader->Finish().error_code();
}

TEST(UnauthenticatedCallTest, IsRefusedBeforeItsRequestIsRead) {
  testing_support::ScratchDir dir;
  const std::string policy = AdminOnlyPolicy(dir);
  testing_support::Daemon daemon({"--auth_policy=" + policy, "--demo_model=",
                                  "--log_rpcs=false", "--audit_log="});
  ASSERT_NE(daemon.port(), 0);
  grpc::ChannelArguments arguments;
  arguments.SetMaxSendMessageSize(64 << 20);
  auto stub = v1::ModelState::NewStub(grpc::CreateCustomChannel(
      daemon.address(), grpc::InsecureChannelCredentials(), arguments));
  const std::string name(60 << 20, 'm');
  const int64_t before = ResidentBytes(daemon.pid());
  int64_t peak = before;
  std::atomic<int> done{0};
  std::vector<grpc::StatusCode> codes(8);
  std::vector<std::thread> callers;
  for (int i = 0; i < 8; ++i) {
    callers.emplace_back([&, i] {
      codes[i] = CallWithoutCredentials(*stub, i % 2, name);
      ++done;
    });
  }
  while (done.load() < 8) {
    peak = std::max(peak, ResidentBytes(daemon.pid()));
    absl::SleepFor(absl::Milliseconds(5));
  }
  for (std::thread& caller : callers) caller.join();
  for (grpc::StatusCode code : codes)
    EXPECT_EQ(code, grpc::StatusCode::UNAUTHENTICATED);
  // Eight 60 MiB requests read whole would take 480 MiB. (ASan's shadow
  // memory and quarantine make RSS meaningless there.)
  if (!kUnderAsan) {
    EXPECT_LT(peak - before, int64_t{32} << 20)
        << "before " << (before >> 20) << " MiB, peak " << (peak >> 20)
        << " MiB";
  }
}

// Health checks with `bytes` of service name on `port`, `calls` at once;
// the daemon's peak resident growth while they run.
int64_t PeakGrowthOfHugeHealthChecks(const testing_support::Daemon& daemon,
                                     int port, int calls, size_t bytes) {
  auto channel = grpc::CreateChannel("127.0.0.1:" + std::to_string(port),
                                     grpc::InsecureChannelCredentials());
  auto stub = grpc::health::v1::Health::NewStub(channel);
  const std::string service(bytes, 's');
  const int64_t before = ResidentBytes(daemon.pid());
  int64_t peak = before;
  std::atomic<int> done{0};
  std::vector<std::thread> callers;
  for (int i = 0; i < calls; ++i) {
    callers.emplace_back([&] {
      grpc::ClientContext context;
      context.set_deadline(std::chrono::system_clock::now() +
                           std::chrono::seconds(60));
      grpc::health::v1::HealthCheckRequest request;
      request.set_service(service);
      grpc::health::v1::HealthCheckResponse response;
      EXPECT_FALSE(stub->Check(&context, request, &response).ok());
      ++done;
    });
  }
  while (done.load() < calls) {
    peak = std::max(peak, ResidentBytes(daemon.pid()));
    absl::SleepFor(absl::Milliseconds(5));
  }
  for (std::thread& caller : callers) caller.join();
  return peak - before;
}

// Health needs no credentials, so gRPC reads its requests, whole before it
// checks their size: its memory quota is what bounds them, on the health
// port (16 MiB) and on the main port (--grpc_memory_bytes).
TEST(UnauthenticatedCallTest, HugeHealthChecksAreBoundedByTheMemoryQuota) {
  testing_support::ScratchDir dir;
  testing_support::Daemon daemon({"--auth_policy=" + AdminOnlyPolicy(dir),
                                  "--demo_model=", "--log_rpcs=false",
                                  "--health_listen=127.0.0.1:0",
                                  "--grpc_memory_bytes=67108864"});
  ASSERT_NE(daemon.port(), 0);
  ASSERT_TRUE(daemon.WaitForLog("health on port", absl::Seconds(30)));
  const std::string log = daemon.Log();
  const int health_port =
      std::stoi(log.substr(log.find("health on port ") + 15));
  // Read whole, these would take 200 MiB and 2 x 150 MiB. ASan's shadow
  // memory and quarantine make RSS meaningless there: only the calls run.
  const int64_t on_health_port =
      PeakGrowthOfHugeHealthChecks(daemon, health_port, 1, 200 << 20);
  const int64_t on_main_port =
      PeakGrowthOfHugeHealthChecks(daemon, daemon.port(), 2, 150 << 20);
  if (!kUnderAsan) {
    EXPECT_LT(on_health_port, int64_t{64} << 20);
    EXPECT_LT(on_main_port, int64_t{160} << 20);
  }
  // And health still answers.
  EXPECT_EQ(Health(grpc::CreateChannel(daemon.address(),
                                       grpc::InsecureChannelCredentials())),
            grpc::health::v1::HealthCheckResponse::SERVING);
}

// A flood of refused calls: bounded log and audit lines, and a line saying
// how many went unlogged.
TEST(UnauthenticatedCallTest, AFloodOfRefusedCallsCostsTheLogsFewLines) {
  testing_support::ScratchDir dir;
  testing_support::Daemon daemon({"--auth_policy=" + AdminOnlyPolicy(dir),
                                  "--demo_model=", "--log_rpcs=true"});
  ASSERT_NE(daemon.port(), 0);
  auto stub = v1::ModelState::NewStub(grpc::CreateChannel(
      daemon.address(), grpc::InsecureChannelCredentials()));
  auto delete_without_credentials = [&] {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() +
                         std::chrono::seconds(30));
    v1::DeleteModelRequest request;
    request.set_model("demo");
    v1::DeleteModelResponse response;
    return stub->DeleteModel(&context, request, &response).error_code();
  };
  const absl::Time start = absl::Now();
  int calls = 0;
  while (absl::Now() - start < absl::Milliseconds(900) && calls < 2000) {
    ASSERT_EQ(delete_without_credentials(), grpc::StatusCode::UNAUTHENTICATED);
    ++calls;
  }
  ASSERT_GT(calls, 100) << "too slow a machine to flood";
  absl::SleepFor(absl::Milliseconds(1100));
  ASSERT_EQ(delete_without_credentials(), grpc::StatusCode::UNAUTHENTICATED);
  ASSERT_TRUE(daemon.WaitForLog("were not logged", absl::Seconds(10)));
  const std::string log = daemon.Log();
  int audits = 0, rpcs = 0;
  for (absl::string_view line : absl::StrSplit(log, '\n')) {
    audits += absl::StartsWith(line, "audit:");
    rpcs += absl::StartsWith(line, "rpc=DeleteModel");
  }
  // At most two one-second windows of 20, and the call after them.
  EXPECT_LE(audits, 41);
  EXPECT_EQ(audits, rpcs);
  EXPECT_GE(audits, 20);
}

TEST(UnauthenticatedCallTest, HealthStaysOpenOtherCallsNeedCredentials) {
  testing_support::ScratchDir dir;
  const std::string policy = AdminOnlyPolicy(dir);
  testing_support::Daemon daemon({"--auth_policy=" + policy, "--demo_model="});
  ASSERT_NE(daemon.port(), 0);
  auto channel =
      grpc::CreateChannel(daemon.address(), grpc::InsecureChannelCredentials());
  EXPECT_EQ(Health(channel), grpc::health::v1::HealthCheckResponse::SERVING);
  auto client = testing_support::ConnectTo(daemon.address());
  EXPECT_EQ(client->ListModels().status().code(),
            absl::StatusCode::kUnauthenticated);
}

}  // namespace
}  // namespace modelstate

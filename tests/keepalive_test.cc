// HTTP/2 keepalive against peers that go silent without closing (a
// partitioned network, a hung host): a TCP proxy between two parties starts
// dropping every byte both ways while keeping its sockets open. The daemon's
// --keepalive_time/--keepalive_timeout close such a client's connection, a
// client's ClientOptions::keepalive_time/timeout end its calls, and a
// follower's --follow_keepalive_time/--follow_keepalive_timeout drop such an
// upstream, retry, and sync again once the link heals. Each case has a control
// whose larger settings keep the connection, so that a flag that did not reach
// gRPC fails the test.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <functional>
#include <memory>
#include <ostream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "absl/types/optional.h"
#include "client/client.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/proxy.h"
#include "tests/test_support.h"

namespace modelstate {
namespace {

using ::testing::HasSubstr;
using testing_support::ConnectTo;
using testing_support::ConnectToLoopback;
using testing_support::Daemon;
using testing_support::ListenOnLoopback;
using testing_support::MetricsPort;
using testing_support::MetricValue;
using testing_support::SendAll;
using testing_support::WaitUntil;

// Every wait in this file is bounded by this unless it says otherwise.
constexpr absl::Duration kWait = absl::Seconds(60);
// What a loaded 2-core machine may add to a keepalive's own time.
constexpr absl::Duration kSlack = absl::Seconds(3);
// Keepalive settings of 1s and 1s notice a silent peer within this: a ping at
// most 1s after it went silent, unanswered for 1s.
const absl::Duration kWindow = absl::Seconds(1 + 1) + kSlack;

// A TCP proxy on 127.0.0.1:0 in front of 127.0.0.1:`upstream_port`. It
// forwards both ways until BlackHole(); from then on it reads and drops what
// either side sends, on its connections and on new ones (which it does not
// forward upstream), and keeps every socket open, also when the other side of
// its connection closed. It counts the sides that ended (EOF or reset) while
// black-holed. Heal() closes the black-holed connections and forwards again.
// One thread serves every connection.
class BlackHoleProxy {
 public:
  explicit BlackHoleProxy(int upstream_port) : upstream_port_(upstream_port) {
    listener_ = ListenOnLoopback(&port_);
    EXPECT_GE(listener_, 0);
    thread_ = std::thread([this] { Run(); });
  }

  ~BlackHoleProxy() {
    stop_ = true;
    thread_.join();
    for (Pair& pair : pairs_) Close(pair);
    close(listener_);
  }

  std::string address() const { return absl::StrCat("127.0.0.1:", port_); }
  void BlackHole() { black_hole_ = true; }
  void Heal() { heal_ = true; }
  // Connections accepted so far.
  int connections() const { return connections_.load(); }
  // Upstream (daemon) sides that ended while black-holed.
  int upstream_closes() const { return upstream_closes_.load(); }
  // Client sides that ended while black-holed.
  int client_closes() const { return client_closes_.load(); }

 private:
  struct Pair {
    int client = -1;
    int server = -1;
    bool black_holed = false;
  };

  static void CloseSide(int* fd) {
    if (*fd < 0) return;
    close(*fd);
    *fd = -1;
  }

  static void Close(Pair& pair) {
    CloseSide(&pair.client);
    CloseSide(&pair.server);
  }

  void Accept() {
    Pair pair;
    pair.client = accept(listener_, nullptr, nullptr);
    if (pair.client < 0) return;
    ++connections_;
    if (black_hole_) {
      pair.black_holed = true;  // Never reaches the upstream.
      pairs_.push_back(pair);
      return;
    }
    pair.server = ConnectToLoopback(upstream_port_);
    if (pair.server < 0) {
      Close(pair);
      return;
    }
    pairs_.push_back(pair);
  }

  // Handles what `*from` has (data, EOF or an error).
  void Serve(Pair& pair, bool from_client) {
    int* from = from_client ? &pair.client : &pair.server;
    int* to = from_client ? &pair.server : &pair.client;
    char buffer[64 << 10];
    const ssize_t n = recv(*from, buffer, sizeof(buffer), 0);
    if (pair.black_holed) {
      if (n > 0) return;  // Dropped.
      ++(from_client ? client_closes_ : upstream_closes_);
      CloseSide(from);  // The other side stays open.
      return;
    }
    if (n <= 0 || !SendAll(*to, buffer, static_cast<size_t>(n))) Close(pair);
  }

  void Run() {
    while (!stop_) {
      if (heal_.exchange(false)) {
        black_hole_ = false;
        for (Pair& pair : pairs_) {
          if (pair.black_holed) Close(pair);
        }
      }
      if (black_hole_) {
        for (Pair& pair : pairs_) pair.black_holed = true;
      }
      std::vector<pollfd> fds = {{listener_, POLLIN, 0}};
      for (const Pair& pair : pairs_) {
        fds.push_back({pair.client, POLLIN, 0});  // Negative fds: ignored.
        fds.push_back({pair.server, POLLIN, 0});
      }
      if (poll(fds.data(), fds.size(), 20) < 0) return;
      for (size_t i = 0; i < pairs_.size(); ++i) {
        if (fds[1 + 2 * i].revents != 0) Serve(pairs_[i], true);
        if (fds[2 + 2 * i].revents != 0) Serve(pairs_[i], false);
      }
      pairs_.erase(std::remove_if(pairs_.begin(), pairs_.end(),
                                  [](const Pair& pair) {
                                    return pair.client < 0 && pair.server < 0;
                                  }),
                   pairs_.end());
      if (fds[0].revents != 0) Accept();
    }
  }

  const int upstream_port_;
  int listener_ = -1;
  int port_ = 0;
  std::atomic<bool> stop_{false};
  std::atomic<bool> black_hole_{false};
  std::atomic<bool> heal_{false};
  std::atomic<int> connections_{0};
  std::atomic<int> upstream_closes_{0};
  std::atomic<int> client_closes_{0};
  std::vector<Pair> pairs_;  // Only the proxy's thread touches it.
  std::thread thread_;
};

// A watch through `address` (of a client with `options`) on a thread of its
// own, so that the connection carries a call; cancelled and joined on
// destruction.
class WatchInFlight {
 public:
  explicit WatchInFlight(const std::string& address, ClientOptions options = {})
      : client_(Client::Connect(address, options).value()) {
    thread_ = std::thread([this] {
      absl::Status status = client_->Watch(
          "absent",
          [this](const ModelEvent&) {
            started_ = true;
            return true;
          },
          &canceller_);
      absl::MutexLock lock(&mu_);
      ended_ = std::move(status);
    });
  }
  ~WatchInFlight() {
    canceller_.Cancel();
    thread_.join();
  }
  bool started() const { return started_.load(); }
  // How the watch ended, or nothing while it runs.
  absl::optional<absl::Status> ended() const {
    absl::MutexLock lock(&mu_);
    return ended_;
  }

 private:
  std::unique_ptr<Client> client_;
  CallCanceller canceller_;
  std::atomic<bool> started_{false};
  mutable absl::Mutex mu_;
  absl::optional<absl::Status> ended_ ABSL_GUARDED_BY(mu_);
  std::thread thread_;
};

struct ServerKeepalive {
  const char* time;
  const char* timeout;
  bool closes;  // Within kWindow of the black hole.
};

// How CTest lists the cases.
void PrintTo(const ServerKeepalive& c, std::ostream* out) {
  *out << "--keepalive_time=" << c.time << " --keepalive_timeout=" << c.timeout
       << (c.closes ? " closes" : " stays open");
}

class ServerKeepaliveTest : public ::testing::TestWithParam<ServerKeepalive> {};

// The daemon pings each connection every --keepalive_time and closes it when
// no answer comes within --keepalive_timeout; with either one large, a silent
// client keeps its connection over that window.
TEST_P(ServerKeepaliveTest, ClosesTheConnectionOfASilentClientInTime) {
  const ServerKeepalive& keepalive = GetParam();
  Daemon daemon({"--demo_model=", "--log_rpcs=false",
                 absl::StrCat("--keepalive_time=", keepalive.time),
                 absl::StrCat("--keepalive_timeout=", keepalive.timeout)});
  ASSERT_GT(daemon.port(), 0);
  BlackHoleProxy proxy(daemon.port());
  WatchInFlight watch(proxy.address());
  ASSERT_TRUE(WaitUntil([&] { return watch.started(); }));

  proxy.BlackHole();
  const absl::Time start = absl::Now();
  const bool closed =
      WaitUntil([&] { return proxy.upstream_closes() > 0; }, kWindow);
  std::printf("keepalive %s/%s: %s after %s\n", keepalive.time,
              keepalive.timeout, closed ? "closed" : "still open",
              absl::FormatDuration(absl::Now() - start).c_str());
  EXPECT_EQ(closed, keepalive.closes);
  EXPECT_EQ(proxy.client_closes(), 0);
}

INSTANTIATE_TEST_SUITE_P(
    TimeAndTimeout, ServerKeepaliveTest,
    ::testing::Values(ServerKeepalive{"1s", "1s", true},
                      ServerKeepalive{"1s", "1m", false},
                      ServerKeepalive{"1m", "1s", false}),
    [](const ::testing::TestParamInfo<ServerKeepalive>& info) {
      return absl::StrCat("Time", info.param.time, "Timeout",
                          info.param.timeout);
    });

// ClientOptions::keepalive_time/timeout: a call on a connection that went
// silent ends Unavailable within them; the server (whose minimum ping interval
// is below the keepalive time) bears the pings before that.
TEST(ClientKeepaliveTest, ACallOnASilentConnectionEndsUnavailableInTime) {
  ServerOptions server_options;
  server_options.keepalive_min_ping_interval = absl::Milliseconds(500);
  auto server = testing_support::StartServer(server_options);
  ASSERT_NE(server, nullptr);
  BlackHoleProxy proxy(server->port());
  ClientOptions options;
  options.keepalive_time = absl::Seconds(1);
  options.keepalive_timeout = absl::Seconds(1);
  WatchInFlight watch(proxy.address(), options);
  ASSERT_TRUE(WaitUntil([&] { return watch.started(); }));
  absl::SleepFor(absl::Seconds(3));  // Three pings, answered.
  ASSERT_FALSE(watch.ended().has_value()) << *watch.ended();

  proxy.BlackHole();
  const absl::Time start = absl::Now();
  ASSERT_TRUE(WaitUntil([&] { return watch.ended().has_value(); }, kWindow));
  std::printf("call on a silent connection ended after %s: %s\n",
              absl::FormatDuration(absl::Now() - start).c_str(),
              watch.ended()->ToString().c_str());
  EXPECT_EQ(watch.ended()->code(), absl::StatusCode::kUnavailable);
  // The client closed the connection it gave up on.
  EXPECT_TRUE(WaitUntil([&] { return proxy.client_closes() == 1; }, kSlack));
}

TEST(ClientKeepaliveTest, ConnectRefusesNonPositiveKeepaliveSettings) {
  ClientOptions no_time;
  no_time.keepalive_time = absl::ZeroDuration();
  ClientOptions no_timeout;
  no_timeout.keepalive_time = absl::Seconds(30);
  no_timeout.keepalive_timeout = -absl::Seconds(1);
  for (const ClientOptions& options : {no_time, no_timeout}) {
    EXPECT_EQ(Client::Connect("127.0.0.1:1", options).status().code(),
              absl::StatusCode::kInvalidArgument);
  }
}

int64_t VersionOn(const std::string& address, const std::string& model) {
  absl::StatusOr<ModelManifest> manifest = ConnectTo(address)->GetModel(model);
  return manifest.ok() ? manifest->version : 0;
}

constexpr char kNet[] = R"({"type": "Sequential", "modules": [
    {"type": "Linear", "args": [64, 64]}, {"type": "ReLU"}]})";

// A follower whose upstream goes silent notices within its keepalive time and
// timeout (connected drops to 0), retries, and syncs again once the link
// heals; one without keepalive (the control) still believes it is connected.
TEST(FollowerKeepaliveTest, DropsASilentUpstreamRetriesAndResyncsAfterItHeals) {
  // Takes a ping every 500ms, so followers may ping every 1s.
  Daemon primary({"--demo_model=", "--log_rpcs=false",
                  "--keepalive_min_ping_interval=500ms"});
  ASSERT_GT(primary.port(), 0);
  BlackHoleProxy proxy(primary.port());
  const std::vector<std::string> follower_args = {
      "--follow=" + proxy.address(), "--log_rpcs=false",
      "--follow_retry_max=200ms", "--metrics_listen=127.0.0.1:0"};
  std::vector<std::string> pinging = follower_args;
  pinging.push_back("--follow_keepalive_time=1s");
  pinging.push_back("--follow_keepalive_timeout=1s");
  std::vector<std::string> unaware = follower_args;
  unaware.push_back("--follow_keepalive_time=inf");
  Daemon follower(pinging);
  Daemon control(unaware);
  const int metrics = MetricsPort(follower);
  const int control_metrics = MetricsPort(control);
  ASSERT_GT(metrics, 0);
  ASSERT_GT(control_metrics, 0);
  auto to_primary = ConnectTo(primary.address());
  ASSERT_TRUE(to_primary->CreateModel("net", kNet, 1).ok());
  ASSERT_TRUE(WaitUntil([&] {
    return VersionOn(follower.address(), "net") == 1 &&
           VersionOn(control.address(), "net") == 1;
  }));
  // Several pings over an idle watch: the primary accepts them, and gRPC's
  // default of two pings until the client sends data does not stop them.
  absl::SleepFor(absl::Seconds(4));
  EXPECT_EQ(MetricValue(metrics, "modelstate_follower_upstream_failures_total"),
            0);
  const int connections = proxy.connections();

  proxy.BlackHole();
  const absl::Time start = absl::Now();
  ASSERT_TRUE(WaitUntil(
      [&] {
        return MetricValue(metrics, "modelstate_follower_connected") == 0;
      },
      kWindow));
  std::printf("silent upstream dropped after %s\n",
              absl::FormatDuration(absl::Now() - start).c_str());
  EXPECT_EQ(MetricValue(metrics, "modelstate_follower_upstream_failures_total"),
            1);
  EXPECT_TRUE(follower.WaitForLog("retrying in 100ms", kSlack));
  // The retry reaches the (still silent) proxy soon.
  EXPECT_TRUE(
      WaitUntil([&] { return proxy.connections() > connections; }, kSlack));
  absl::SleepFor(start + kWindow - absl::Now());
  EXPECT_EQ(MetricValue(control_metrics, "modelstate_follower_connected"), 1);
  EXPECT_EQ(proxy.upstream_closes(), 0);  // The primary kept its side.

  proxy.Heal();
  const StateDict shape = to_primary->StateDict("net")->state;
  ASSERT_TRUE(
      to_primary->LoadStateDict("net", testing_support::FilledLike(shape, 2))
          .ok());
  EXPECT_TRUE(WaitUntil([&] {
    return VersionOn(follower.address(), "net") == 2 &&
           VersionOn(control.address(), "net") == 2;
  }));
  EXPECT_EQ(MetricValue(metrics, "modelstate_follower_connected"), 1);
}

TEST(FollowerKeepaliveTest, RefusesNonPositiveKeepaliveSettings) {
  const std::string daemon =
      testing_support::DaemonPath() +
      " --listen=127.0.0.1:0 --follow=127.0.0.1:1 --log_rpcs=false ";
  for (const char* flag :
       {"--follow_keepalive_time=0s", "--follow_keepalive_timeout=-1s"}) {
    const testing_support::CommandResult refused =
        testing_support::RunCommand(daemon + flag);
    EXPECT_EQ(refused.exit_code, 2) << flag;
    EXPECT_THAT(refused.output, HasSubstr("must be positive")) << flag;
  }
}

}  // namespace
}  // namespace modelstate

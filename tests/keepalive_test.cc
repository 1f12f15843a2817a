// HTTP/2 keepalive against peers that go silent without closing (a
// partitioned network, a hung host): a TCP proxy between two parties starts
// dropping every byte both ways while keeping its sockets open. The daemon's
// --keepalive_time/--keepalive_timeout close such a client's connection, and a
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
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "client/client.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/test_support.h"

namespace modelstate {
namespace {

using ::testing::HasSubstr;
using testing_support::ConnectTo;
using testing_support::Daemon;

// Every wait in this file is bounded by this unless it says otherwise.
constexpr absl::Duration kWait = absl::Seconds(60);
// What a loaded 2-core machine may add to a keepalive's own time.
constexpr absl::Duration kSlack = absl::Seconds(3);

// Polls `done` every 10 ms until it holds or `timeout` passes.
bool WaitUntil(const std::function<bool()>& done,
               absl::Duration timeout = kWait) {
  const absl::Time deadline = absl::Now() + timeout;
  while (!done()) {
    if (absl::Now() > deadline) return false;
    absl::SleepFor(absl::Milliseconds(10));
  }
  return true;
}

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
    listener_ = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in address = Loopback(0);
    socklen_t length = sizeof(address);
    EXPECT_EQ(bind(listener_, reinterpret_cast<sockaddr*>(&address), length),
              0);
    EXPECT_EQ(listen(listener_, 16), 0);
    getsockname(listener_, reinterpret_cast<sockaddr*>(&address), &length);
    port_ = ntohs(address.sin_port);
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

  static sockaddr_in Loopback(int port) {
    sockaddr_in address{};
    address.sin_family = AF_INET;
    address.sin_port = htons(static_cast<uint16_t>(port));
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    return address;
  }

  static void CloseSide(int* fd) {
    if (*fd < 0) return;
    close(*fd);
    *fd = -1;
  }

  static void Close(Pair& pair) {
    CloseSide(&pair.client);
    CloseSide(&pair.server);
  }

  static bool WriteAll(int fd, const char* data, size_t size) {
    while (size > 0) {
      const ssize_t n = send(fd, data, size, MSG_NOSIGNAL);
      if (n <= 0) return false;
      data += n;
      size -= static_cast<size_t>(n);
    }
    return true;
  }

  void Accept() {
    Pair pair;
    pair.client = accept(listener_, nullptr, nullptr);
    if (pair.client < 0) return;
    if (black_hole_) {
      pair.black_holed = true;  // Never reaches the upstream.
      pairs_.push_back(pair);
      return;
    }
    pair.server = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in upstream = Loopback(upstream_port_);
    if (connect(pair.server, reinterpret_cast<sockaddr*>(&upstream),
                sizeof(upstream)) != 0) {
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
    if (n <= 0 || !WriteAll(*to, buffer, static_cast<size_t>(n))) Close(pair);
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
  std::atomic<int> upstream_closes_{0};
  std::atomic<int> client_closes_{0};
  std::vector<Pair> pairs_;  // Only the proxy's thread touches it.
  std::thread thread_;
};

// A watch of `model` through `address` on a thread of its own, so that the
// connection carries a call; cancelled and joined on destruction.
class WatchInFlight {
 public:
  explicit WatchInFlight(const std::string& address)
      : client_(ConnectTo(address)) {
    thread_ = std::thread([this] {
      client_
          ->Watch(
              "absent",
              [this](const ModelEvent&) {
                started_ = true;
                return true;
              },
              &canceller_)
          .IgnoreError();
    });
  }
  ~WatchInFlight() {
    canceller_.Cancel();
    thread_.join();
  }
  bool started() const { return started_.load(); }

 private:
  std::unique_ptr<Client> client_;
  CallCanceller canceller_;
  std::atomic<bool> started_{false};
  std::thread thread_;
};

struct ServerKeepalive {
  const char* time;
  const char* timeout;
  bool closes;  // Within kWindow of the black hole.
};

// The small settings below are 1s each: a ping at most 1s after the black
// hole, unanswered for 1s.
const absl::Duration kWindow = absl::Seconds(1 + 1) + kSlack;

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

}  // namespace
}  // namespace modelstate

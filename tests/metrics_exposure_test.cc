// The metrics listener against a real modelstated: --metrics_model_labels
// decides whether a scrape names models, and clients that connect and send
// nothing, or half a request, neither hold it for long nor delay a scrape
// beyond its request timeout.
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/test_support.h"

namespace modelstate {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;
using testing_support::ConnectTo;
using testing_support::Daemon;
using testing_support::HttpGet;
using testing_support::MetricsPort;

constexpr char kNet[] = R"({"type": "Sequential", "modules": [
    {"type": "Linear", "args": [4, 4]}]})";

// Distinctive enough that no metric name or help text contains it.
constexpr char kSecretModel[] = "secret-critic-7f3a";

// The daemon's request timeout for /metrics (server.cc) is 3 s and it serves
// with 8 threads; prometheus-cpp's defaults were civetweb's 30 s and 2.
constexpr absl::Duration kRequestTimeout = absl::Seconds(3);
constexpr int kThreads = 8;

std::vector<std::string> DaemonArgs(std::vector<std::string> extra = {}) {
  std::vector<std::string> args = {"--demo_model=", "--log_rpcs=false",
                                   "--metrics_listen=127.0.0.1:0"};
  args.insert(args.end(), extra.begin(), extra.end());
  return args;
}

// A TCP client of 127.0.0.1:`port` that sends `bytes` (maybe none) and then
// nothing more, until destroyed.
class StalledClient {
 public:
  StalledClient(int port, const std::string& bytes) {
    fd_ = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in address{};
    address.sin_family = AF_INET;
    address.sin_port = htons(static_cast<uint16_t>(port));
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    connected_ = fd_ >= 0 &&
                 connect(fd_, reinterpret_cast<const sockaddr*>(&address),
                         sizeof address) == 0 &&
                 send(fd_, bytes.data(), bytes.size(), MSG_NOSIGNAL) ==
                     static_cast<ssize_t>(bytes.size());
  }
  ~StalledClient() {
    if (fd_ >= 0) close(fd_);
  }
  StalledClient(const StalledClient&) = delete;
  StalledClient& operator=(const StalledClient&) = delete;

  bool connected() const { return connected_; }

  // Reads until the server closes the connection (true) or `timeout` passes
  // without that (false).
  bool WaitForClose(absl::Duration timeout) {
    timeval limit = absl::ToTimeval(timeout);
    setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &limit, sizeof limit);
    char buffer[512];
    ssize_t got;
    while ((got = read(fd_, buffer, sizeof buffer)) > 0) {
    }
    return got == 0;
  }

 private:
  int fd_ = -1;
  bool connected_ = false;
};

// `count` stalled clients of `port`, alternately silent and stopped halfway
// through a request line.
std::vector<std::unique_ptr<StalledClient>> StallConnections(int port,
                                                             int count) {
  std::vector<std::unique_ptr<StalledClient>> clients;
  for (int i = 0; i < count; ++i) {
    clients.push_back(
        std::make_unique<StalledClient>(port, i % 2 == 0 ? "" : "GET /metr"));
    EXPECT_TRUE(clients.back()->connected()) << i;
  }
  // Long enough for the listener to accept them and hand each to a thread.
  absl::SleepFor(absl::Milliseconds(300));
  return clients;
}

// A scrape of `port` and how long it took.
struct Scrape {
  std::string page;
  absl::Duration took;
};

Scrape TimedScrape(int port) {
  const absl::Time start = absl::Now();
  std::string page = HttpGet(port, "/metrics");
  return {std::move(page), absl::Now() - start};
}

std::string ScrapeWithModel(const std::vector<std::string>& extra) {
  Daemon daemon(DaemonArgs(extra));
  const int metrics = MetricsPort(daemon);
  EXPECT_GT(metrics, 0);
  EXPECT_TRUE(
      ConnectTo(daemon.address())->CreateModel(kSecretModel, kNet, 1).ok());
  return HttpGet(metrics, "/metrics");
}

TEST(MetricsExposureTest, ByDefaultPerModelSeriesNameEveryModel) {
  const std::string page = ScrapeWithModel({});
  EXPECT_THAT(page, HasSubstr("\nmodelstate_models 1"));
  EXPECT_THAT(page, HasSubstr(absl::StrCat("modelstate_model_version{model=\"",
                                           kSecretModel, "\"} 1")));
}

TEST(MetricsExposureTest, WithoutModelLabelsNoScrapeNamesAModel) {
  const std::string page = ScrapeWithModel({"--metrics_model_labels=false"});
  // The model is there and counted, yet no series names it.
  EXPECT_THAT(page, HasSubstr("\nmodelstate_models 1"));
  EXPECT_THAT(page, Not(HasSubstr(kSecretModel)));
  EXPECT_THAT(page, Not(HasSubstr("modelstate_model_version")));
  EXPECT_THAT(page, Not(HasSubstr("modelstate_model_bytes")));
}

// A follower's per-model series (its upstream's versions, how long each
// model has been behind) name models too, and go with the others.
TEST(MetricsExposureTest, AFollowersPerModelSeriesFollowTheSameSwitch) {
  Daemon primary(DaemonArgs());
  ASSERT_TRUE(
      ConnectTo(primary.address())->CreateModel(kSecretModel, kNet, 1).ok());
  for (const bool labels : {true, false}) {
    SCOPED_TRACE(labels ? "with model labels" : "without model labels");
    Daemon follower(DaemonArgs(
        {"--follow=" + primary.address(),
         absl::StrCat("--metrics_model_labels=", labels ? "true" : "false")}));
    const int metrics = MetricsPort(follower);
    ASSERT_GT(metrics, 0);
    ASSERT_TRUE(testing_support::WaitUntil([&] {
      return testing_support::MetricValue(metrics,
                                          "modelstate_follower_connected") == 1;
    }));
    const std::string page = HttpGet(metrics, "/metrics");
    EXPECT_THAT(page, HasSubstr("\nmodelstate_follower_lag_versions 0"));
    EXPECT_THAT(page, HasSubstr("\nmodelstate_follower_behind_seconds 0"));
    const std::string series = absl::StrCat(
        "modelstate_follower_upstream_version{model=\"", kSecretModel, "\"} 1");
    if (labels) {
      EXPECT_THAT(page, HasSubstr(series));
      EXPECT_THAT(page, HasSubstr(absl::StrCat(
                            "modelstate_follower_model_behind_seconds{model=\"",
                            kSecretModel, "\"} 0")));
    } else {
      EXPECT_THAT(page, Not(HasSubstr(kSecretModel)));
      EXPECT_THAT(page, Not(HasSubstr("modelstate_follower_upstream_version")));
    }
  }
}

// More stalled clients than prometheus-cpp's two threads: with threads to
// spare, the scrape is answered at once rather than after their timeout.
TEST(MetricsExposureTest, AFewStalledClientsDoNotDelayAScrape) {
  Daemon daemon(DaemonArgs());
  const int metrics = MetricsPort(daemon);
  ASSERT_GT(metrics, 0);
  const auto stalled = StallConnections(metrics, 4);
  const Scrape scrape = TimedScrape(metrics);
  EXPECT_THAT(scrape.page, HasSubstr("modelstate_models 0"));
  EXPECT_LT(scrape.took, kRequestTimeout - absl::Seconds(1));
}

// More stalled clients than threads: the scrape waits for the first of them to
// time out, not for civetweb's default of 30 s (HttpGet gives up after 10).
TEST(MetricsExposureTest,
     MoreStalledClientsThanThreadsDelayAScrapeOnlyUntilTheyTimeOut) {
  Daemon daemon(DaemonArgs());
  const int metrics = MetricsPort(daemon);
  ASSERT_GT(metrics, 0);
  const auto stalled = StallConnections(metrics, kThreads + 4);
  const Scrape scrape = TimedScrape(metrics);
  EXPECT_THAT(scrape.page, HasSubstr("modelstate_models 0"));
  EXPECT_LT(scrape.took, kRequestTimeout + absl::Seconds(4));
  std::printf("scrape behind %d stalled clients took %s\n", kThreads + 4,
              absl::FormatDuration(scrape.took).c_str());
}

TEST(MetricsExposureTest, StalledClientsAreClosedAfterTheRequestTimeout) {
  Daemon daemon(DaemonArgs());
  const int metrics = MetricsPort(daemon);
  ASSERT_GT(metrics, 0);
  StalledClient silent(metrics, "");
  StalledClient half_a_request(metrics, "GET /metr");
  ASSERT_TRUE(silent.connected());
  ASSERT_TRUE(half_a_request.connected());
  const absl::Time start = absl::Now();
  EXPECT_TRUE(silent.WaitForClose(kRequestTimeout + absl::Seconds(4)));
  EXPECT_TRUE(half_a_request.WaitForClose(kRequestTimeout + absl::Seconds(4)));
  EXPECT_LT(absl::Now() - start, kRequestTimeout + absl::Seconds(4));
}

}  // namespace
}  // namespace modelstate

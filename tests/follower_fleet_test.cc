// Followers as an operator runs them, with real daemons on loopback and a
// proxy standing for the network or a load-balanced address: a replica that
// lags behind the follower's address never takes it back; a primary restarted
// with an empty data dir empties nobody until its epoch is adopted; a follower
// reconnects within --follow_retry_max however long its upstream was away;
// its metrics tell how far behind it is during a sync and while disconnected;
// --new_epoch starts another history, and the epoch flags are checked.
#include <sys/stat.h>

#include <cstdio>
#include <map>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "store/lineage.h"
#include "tests/follower_support.h"
#include "tests/proxy.h"
#include "tests/test_support.h"

namespace modelstate {
namespace {

using follower_support::FollowerArgs;
using follower_support::Version;
using follower_support::VersionOf;

using ::testing::HasSubstr;
using ::testing::Not;
using testing_support::ConnectTo;
using testing_support::CuttingProxy;
using testing_support::Daemon;
using testing_support::FilledLike;
using testing_support::HttpGet;
using testing_support::MetricsPort;
using testing_support::MetricValue;
using testing_support::ScratchDir;
using testing_support::WaitUntil;

constexpr char kNet[] = R"({"type": "Sequential", "modules": [
    {"type": "Linear", "args": [64, 64]}, {"type": "ReLU"},
    {"type": "Linear", "args": [64, 8]}]})";

// Every wait in this file is bounded by this.
constexpr absl::Duration kWait = absl::Seconds(60);

// Loads `model` on `client` with every element `value`.
void LoadFilled(Client& client, const std::string& model, float value) {
  const StateDict shape = client.StateDict(model).value().state;
  ASSERT_TRUE(client.LoadStateDict(model, FilledLike(shape, value)).ok());
}

// The epoch a daemon logged at start ("modelstated: epoch <16 hex>").
uint64_t LoggedEpoch(Daemon& daemon) {
  const std::string marker = "modelstated: epoch ";
  if (!daemon.WaitForLog(marker, kWait)) return 0;
  const std::string log = daemon.Log();
  const size_t at = log.find(marker) + marker.size();
  return ParseEpoch(log.substr(at, 16)).value_or(0);
}

// How many times `needle` occurs in `text`.
int Count(const std::string& text, const std::string& needle) {
  int count = 0;
  for (size_t at = text.find(needle); at != std::string::npos;
       at = text.find(needle, at + 1)) {
    ++count;
  }
  return count;
}

// A model's events on a daemon, watched on a thread of their own until
// destroyed, as "CREATED@4" and so on.
class Events {
 public:
  Events(const std::string& address, const std::string& model)
      : client_(ConnectTo(address)) {
    thread_ = std::thread([this, model] {
      client_
          ->Watch(
              model,
              [this](const ModelEvent& event) {
                static const char* kNames[] = {"CREATED", "UPDATED", "DELETED",
                                               "CURRENT", "ABSENT",  "LISTED"};
                absl::MutexLock lock(&mu_);
                events_.push_back(absl::StrCat(
                    kNames[static_cast<int>(event.type)], "@", event.version));
                return true;
              },
              &canceller_)
          .IgnoreError();
    });
  }
  ~Events() {
    canceller_.Cancel();
    thread_.join();
  }
  std::vector<std::string> seen() {
    absl::MutexLock lock(&mu_);
    return events_;
  }

 private:
  std::unique_ptr<Client> client_;
  CallCanceller canceller_;
  absl::Mutex mu_;
  std::vector<std::string> events_ ABSL_GUARDED_BY(mu_);
  std::thread thread_;
};

// The node cache's case: its address is a Service in front of the primary
// and a replica. When its connection lands on the replica, which lags (it
// was cut off from the primary), the follower keeps its newer version and
// the model the replica does not have yet, and moves on once the replica
// catches up: never a delete, never an older version.
TEST(FollowerFleetTest, ALaggingReplicaBehindTheAddressNeverTakesItBack) {
  Daemon primary({"--demo_model=", "--log_rpcs=false"});
  CuttingProxy primary_link(primary.port(), {});
  Daemon replica(FollowerArgs(primary_link.address()));
  CuttingProxy service(primary.port(), {});
  Daemon follower(FollowerArgs(service.address()));
  const int metrics = MetricsPort(follower);
  ASSERT_GT(metrics, 0);
  auto to_primary = ConnectTo(primary.address());
  auto to_replica = ConnectTo(replica.address());
  auto to_follower = ConnectTo(follower.address());
  ASSERT_TRUE(to_primary->CreateModel("net", kNet, 1).ok());
  ASSERT_TRUE(WaitUntil([&] {
    return VersionOf(*to_replica, "net").version == 1 &&
           VersionOf(*to_follower, "net").version == 1;
  }));

  primary_link.Isolate();
  for (float value : {2.0f, 3.0f, 4.0f}) LoadFilled(*to_primary, "net", value);
  ASSERT_TRUE(to_primary->CreateModel("fresh", kNet, 2).ok());
  const Version net = VersionOf(*to_primary, "net");
  const Version fresh = VersionOf(*to_primary, "fresh");
  ASSERT_EQ(net.version, 4);
  ASSERT_TRUE(WaitUntil([&] {
    return VersionOf(*to_follower, "net") == net &&
           VersionOf(*to_follower, "fresh") == fresh;
  }));
  Events net_events(follower.address(), "net");
  Events fresh_events(follower.address(), "fresh");
  ASSERT_TRUE(WaitUntil([&] {
    return !net_events.seen().empty() && !fresh_events.seen().empty();
  }));

  service.Redirect(replica.port());
  ASSERT_TRUE(WaitUntil([&] {
    return MetricValue(metrics,
                       "modelstate_follower_upstream_version{model=\"net\"}") ==
               1 &&
           MetricValue(metrics, "modelstate_follower_stale_answers_total") >=
               2 &&
           MetricValue(metrics, "modelstate_follower_connected") == 1;
  }));
  EXPECT_EQ(VersionOf(*to_follower, "net"), net);
  EXPECT_EQ(VersionOf(*to_follower, "fresh"), fresh);
  EXPECT_EQ(MetricValue(metrics, "modelstate_follower_deletes_total"), 0);
  EXPECT_EQ(MetricValue(metrics, "modelstate_follower_lag_versions"), 0);
  EXPECT_THAT(follower.Log(),
              HasSubstr("follow: keeping net version 4: " + service.address() +
                        " shows it version 1 (it lags)"));

  // The replica gets through to the primary again and catches up; the next
  // load reaches the follower through it.
  primary_link.Heal();
  ASSERT_TRUE(
      WaitUntil([&] { return VersionOf(*to_replica, "net") == net; }, kWait));
  LoadFilled(*to_primary, "net", 5);
  const Version next = VersionOf(*to_primary, "net");
  ASSERT_TRUE(
      WaitUntil([&] { return VersionOf(*to_follower, "net") == next; }));
  EXPECT_THAT(net_events.seen(),
              ::testing::ElementsAre("CURRENT@4", "UPDATED@5"));
  EXPECT_THAT(fresh_events.seen(), ::testing::ElementsAre("CURRENT@1"));
  EXPECT_EQ(MetricValue(metrics, "modelstate_follower_deletes_total"), 0);
}

// True if `path` exists.
bool Exists(const std::string& path) {
  struct stat info;
  return stat(path.c_str(), &info) == 0;
}

// The primary comes back with an empty data dir: a new epoch. The follower
// keeps serving its models, in memory and in its data dir, across its own
// restarts, and says so, until it is restarted with --adopt_epoch naming the
// new epoch; then it mirrors the new history.
TEST(FollowerFleetTest, AnEmptyPrimaryEmptiesNobodyUntilItsEpochIsAdopted) {
  const ScratchDir scratch;
  const std::string follower_dir = "--data_dir=" + scratch.file("follower");
  auto primary = std::make_unique<Daemon>(
      std::vector<std::string>{"--demo_model=", "--log_rpcs=false",
                               "--data_dir=" + scratch.file("primary")});
  const std::string address = primary->address();
  const uint64_t first_epoch = LoggedEpoch(*primary);
  ASSERT_NE(first_epoch, 0u);
  Version held;
  {
    auto to_primary = ConnectTo(address);
    ASSERT_TRUE(to_primary->CreateModel("net", kNet, 1).ok());
    LoadFilled(*to_primary, "net", 2);
    ASSERT_TRUE(to_primary->CreateModel("extra", kNet, 3).ok());
    held = VersionOf(*to_primary, "net");
  }
  const std::string held_file =
      scratch.file("follower") + "/net/00000000000000000002.safetensors";
  {
    Daemon follower(FollowerArgs(address, {follower_dir}));
    auto to_follower = ConnectTo(follower.address());
    ASSERT_TRUE(
        WaitUntil([&] { return VersionOf(*to_follower, "net") == held; }));
    ASSERT_TRUE(Exists(held_file));
    EXPECT_EQ(follower.Stop(SIGTERM, 30), 0);
  }

  EXPECT_EQ(primary->Stop(SIGTERM, 30), 0);
  primary = std::make_unique<Daemon>(std::vector<std::string>{
      "--listen=" + address, "--demo_model=", "--log_rpcs=false",
      "--data_dir=" + scratch.file("empty")});
  const uint64_t second_epoch = LoggedEpoch(*primary);
  ASSERT_NE(second_epoch, 0u);
  ASSERT_NE(second_epoch, first_epoch);
  auto to_primary = ConnectTo(address);
  ASSERT_TRUE(to_primary->CreateModel("net", kNet, 9).ok());
  ASSERT_TRUE(to_primary->CreateModel("other", kNet, 9).ok());

  const std::string warning = "follow: WARNING: upstream " + address +
                              " is of epoch " + EpochName(second_epoch);
  {
    Daemon follower(FollowerArgs(address, {follower_dir}));
    const int metrics = MetricsPort(follower);
    ASSERT_GT(metrics, 0);
    ASSERT_TRUE(WaitUntil([&] {
      return MetricValue(metrics, "modelstate_follower_epoch_refused") == 1 &&
             MetricValue(metrics,
                         "modelstate_follower_upstream_failures_total") >= 3;
    }));
    auto to_follower = ConnectTo(follower.address());
    EXPECT_EQ(VersionOf(*to_follower, "net"), held);
    EXPECT_EQ(VersionOf(*to_follower, "extra").version, 1);
    EXPECT_EQ(VersionOf(*to_follower, "other").version, 0);
    EXPECT_TRUE(Exists(held_file));
    const std::string page = HttpGet(metrics, "/metrics");
    EXPECT_THAT(page, HasSubstr("modelstate_epoch_info{epoch=\"" +
                                EpochName(first_epoch) + "\"} 1"));
    EXPECT_THAT(page,
                HasSubstr("modelstate_follower_upstream_epoch_info{epoch=\"" +
                          EpochName(second_epoch) + "\"} 1"));
    // Loud, once a minute, naming the way out.
    EXPECT_EQ(Count(follower.Log(), warning), 1);
    EXPECT_THAT(follower.Log(), HasSubstr("restart with --adopt_epoch=" +
                                          EpochName(second_epoch)));
    EXPECT_EQ(follower.Stop(SIGTERM, 30), 0);
  }

  Daemon follower(FollowerArgs(
      address, {follower_dir, "--adopt_epoch=" + EpochName(second_epoch)}));
  const int metrics = MetricsPort(follower);
  auto to_follower = ConnectTo(follower.address());
  const Version wanted = VersionOf(*to_primary, "net");
  ASSERT_TRUE(WaitUntil([&] {
    return VersionOf(*to_follower, "net") == wanted &&
           VersionOf(*to_follower, "other").version == 1 &&
           VersionOf(*to_follower, "extra").version == 0;
  }));
  EXPECT_EQ(MetricValue(metrics, "modelstate_follower_epoch_refused"), 0);
  EXPECT_THAT(HttpGet(metrics, "/metrics"),
              HasSubstr("modelstate_epoch_info{epoch=\"" +
                        EpochName(second_epoch) + "\"} 1"));
  EXPECT_TRUE(follower.WaitForLog(
      "follow: adopted epoch " + EpochName(second_epoch), kWait));
  EXPECT_FALSE(Exists(held_file));
}

// A primary keeps its data dir's epoch across restarts; --new_epoch starts
// another history on the same models. The epoch flags are refused where they
// do not apply.
TEST(FollowerFleetTest, NewEpochStartsAnotherHistoryAndEpochFlagsAreChecked) {
  const ScratchDir scratch;
  const std::vector<std::string> args = {"--demo_model=", "--log_rpcs=false",
                                         "--data_dir=" + scratch.file("data")};
  auto start = [&args](std::vector<std::string> extra) {
    extra.insert(extra.begin(), args.begin(), args.end());
    return std::make_unique<Daemon>(extra);
  };
  auto primary = start({});
  const uint64_t first = LoggedEpoch(*primary);
  ASSERT_TRUE(ConnectTo(primary->address())->CreateModel("net", kNet, 1).ok());
  EXPECT_EQ(primary->Stop(SIGTERM, 30), 0);
  primary = start({});
  EXPECT_EQ(LoggedEpoch(*primary), first);
  EXPECT_EQ(primary->Stop(SIGTERM, 30), 0);
  primary = start({"--new_epoch"});
  const uint64_t second = LoggedEpoch(*primary);
  EXPECT_NE(second, first);
  EXPECT_NE(second, 0u);
  EXPECT_THAT(primary->Log(),
              HasSubstr("(new: --new_epoch; it was " + EpochName(first)));
  EXPECT_EQ(VersionOf(*ConnectTo(primary->address()), "net").version, 1);

  const std::string daemon =
      testing_support::DaemonPath() + " --listen=127.0.0.1:0 --log_rpcs=false ";
  const testing_support::CommandResult new_follower =
      testing_support::RunCommand(daemon + "--follow=127.0.0.1:1 --new_epoch");
  EXPECT_EQ(new_follower.exit_code, 1);
  EXPECT_THAT(new_follower.output,
              HasSubstr("--new_epoch can't be used with --follow"));
  const testing_support::CommandResult adopting_primary =
      testing_support::RunCommand(daemon + "--adopt_epoch=any");
  EXPECT_EQ(adopting_primary.exit_code, 1);
  EXPECT_THAT(adopting_primary.output,
              HasSubstr("--adopt_epoch needs --follow"));
  const testing_support::CommandResult bad = testing_support::RunCommand(
      daemon + "--follow=127.0.0.1:1 --adopt_epoch=yes");
  EXPECT_EQ(bad.exit_code, 2);
  EXPECT_THAT(bad.output, HasSubstr("--adopt_epoch wants an epoch"));
}

// The longest stretch of [from, to] without any of `times`.
absl::Duration LongestQuiet(const std::vector<absl::Time>& times,
                            absl::Time from, absl::Time to) {
  absl::Duration longest;
  absl::Time last = from;
  for (absl::Time time : times) {
    if (time <= from || time >= to) continue;
    longest = std::max(longest, time - last);
    last = time;
  }
  return std::max(longest, to - last);
}

// gRPC's own reconnect backoff grows to 120 s: a follower whose upstream was
// away for long would come back minutes late. With --follow_retry_max=1s its
// channel keeps trying about every second however long the absence, and it
// is back and syncing within a few seconds of the upstream's return.
TEST(FollowerFleetTest, ReconnectsWithinTheRetryCapAfterALongAbsence) {
  Daemon primary({"--demo_model=", "--log_rpcs=false"});
  CuttingProxy link(primary.port(), {});
  Daemon follower({"--follow=" + link.address(), "--log_rpcs=false",
                   "--follow_retry_max=1s", "--metrics_listen=127.0.0.1:0"});
  const int metrics = MetricsPort(follower);
  ASSERT_GT(metrics, 0);
  auto to_primary = ConnectTo(primary.address());
  auto to_follower = ConnectTo(follower.address());
  ASSERT_TRUE(to_primary->CreateModel("net", kNet, 1).ok());
  ASSERT_TRUE(
      WaitUntil([&] { return VersionOf(*to_follower, "net").version == 1; }));

  link.Isolate();
  const absl::Time away = absl::Now();
  ASSERT_TRUE(WaitUntil([&] {
    return MetricValue(metrics, "modelstate_follower_connected") == 0;
  }));
  // By 25 s, gRPC's default backoff would space attempts 6 to 16 s apart.
  absl::SleepFor(absl::Seconds(25) - (absl::Now() - away));
  const absl::Duration gap =
      LongestQuiet(link.accept_times(), away + absl::Seconds(10), absl::Now());
  LoadFilled(*to_primary, "net", 2);
  const Version wanted = VersionOf(*to_primary, "net");
  link.Heal();
  const absl::Time back = absl::Now();
  ASSERT_TRUE(WaitUntil(
      [&] { return VersionOf(*to_follower, "net") == wanted; }, kWait));
  const absl::Duration caught_up = absl::Now() - back;
  std::printf(
      "away 25 s: longest time without a connection attempt in its last 15 s "
      "%s; synced %s after the upstream returned\n",
      absl::FormatDuration(gap).c_str(),
      absl::FormatDuration(caught_up).c_str());
  // Jitter is 20% of 1 s; generous multiples of the flag, not targets.
  EXPECT_LE(gap, absl::Seconds(3));
  EXPECT_LE(caught_up, absl::Seconds(10));
}

// A sync of 64 MiB over a shaped link: while it runs, the watch still reads
// every commit, so the metrics show the upstream's newest version and the
// true lag, the bytes still to fetch and for how long the follower has been
// behind; while the link is down they keep that lag and count the seconds
// since the upstream was heard from.
TEST(FollowerFleetTest, MetricsTellHowFarBehindDuringASyncAndWhileCutOff) {
  constexpr uint64_t kMiB = uint64_t{1} << 20;
  Daemon primary({"--demo_model=", "--log_rpcs=false"});
  auto to_primary = ConnectTo(primary.address());
  StateDict big;
  for (int i = 0; i < 16; ++i) {
    big.Set(absl::StrCat("w", i),
            Tensor::Zeros(DType::kFloat32, {1024 * 1024}).value());
  }
  LoadRequest create("big");
  create.create_if_missing = true;
  ASSERT_TRUE(to_primary->LoadStateDict(create, FilledLike(big, 1)).ok());
  CuttingProxy link(primary.port(), {});
  Daemon follower(FollowerArgs(link.address()));
  const int metrics = MetricsPort(follower);
  ASSERT_GT(metrics, 0);
  auto to_follower = ConnectTo(follower.address());
  ASSERT_TRUE(
      WaitUntil([&] { return VersionOf(*to_follower, "big").version == 1; }));

  link.Throttle(8 * kMiB);  // 8 s for the next version.
  for (float value : {2.0f, 3.0f, 4.0f, 5.0f, 6.0f}) {
    ASSERT_TRUE(to_primary->LoadStateDict("big", FilledLike(big, value)).ok());
  }
  const std::string upstream_version =
      "modelstate_follower_upstream_version{model=\"big\"}";
  ASSERT_TRUE(WaitUntil([&] {
    return MetricValue(metrics, upstream_version) == 6 &&
           MetricValue(metrics, "modelstate_follower_sync_bytes_in_flight") > 0;
  }));
  // Mid-sync: whatever it holds, the lag counts up to the newest version.
  int64_t held = VersionOf(*to_follower, "big").version;
  EXPECT_LT(held, 6);
  EXPECT_EQ(MetricValue(metrics, "modelstate_follower_lag_versions"), 6 - held);
  EXPECT_LE(MetricValue(metrics, "modelstate_follower_sync_bytes_in_flight"),
            64.0 * kMiB);
  EXPECT_EQ(MetricValue(metrics, "modelstate_follower_last_heard_seconds"), 0);
  EXPECT_GT(MetricValue(metrics, "modelstate_follower_behind_seconds"), 0);

  link.Isolate();
  ASSERT_TRUE(WaitUntil([&] {
    return MetricValue(metrics, "modelstate_follower_connected") == 0 &&
           MetricValue(metrics, "modelstate_follower_last_heard_seconds") >= 1;
  }));
  held = VersionOf(*to_follower, "big").version;
  EXPECT_LT(held, 6);
  EXPECT_EQ(MetricValue(metrics, "modelstate_follower_lag_versions"), 6 - held);
  EXPECT_EQ(MetricValue(metrics, upstream_version), 6);
  EXPECT_GE(MetricValue(metrics, "modelstate_follower_behind_seconds"), 1);
  EXPECT_GE(MetricValue(metrics,
                        "modelstate_follower_model_behind_seconds{model="
                        "\"big\"}"),
            1);

  link.Throttle(0);
  link.Heal();
  const Version wanted = VersionOf(*to_primary, "big");
  ASSERT_TRUE(WaitUntil(
      [&] { return VersionOf(*to_follower, "big") == wanted; }, kWait));
  ASSERT_TRUE(WaitUntil([&] {
    return MetricValue(metrics, "modelstate_follower_connected") == 1;
  }));
  EXPECT_EQ(MetricValue(metrics, "modelstate_follower_lag_versions"), 0);
  EXPECT_EQ(MetricValue(metrics, "modelstate_follower_behind_seconds"), 0);
  EXPECT_EQ(MetricValue(metrics, "modelstate_follower_sync_bytes_in_flight"),
            0);
  EXPECT_EQ(MetricValue(metrics, "modelstate_follower_last_heard_seconds"), 0);
}

}  // namespace
}  // namespace modelstate

#include "store/version_wait.h"

#include <atomic>
#include <string>

#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "model/test_util.h"

namespace modelstate {
namespace {

using ::testing::HasSubstr;

constexpr char kNet[] = R"({"type": "Linear", "args": [4, 4]})";

// Records the one outcome of a wait.
struct Outcome {
  absl::Notification done;
  absl::Status status;
  VersionWaiter::Callback Callback() {
    return [this](absl::Status result) {
      status = std::move(result);
      done.Notify();
    };
  }
};

void LoadOnce(ModelStore& store) {
  const StateDict state = *store.Fetch({"net"}).value().state;
  ASSERT_TRUE(store.Load({"net"}, state).ok());
}

TEST(VersionWaiterTest, AVersionAlreadyThereAnswersAtOnce) {
  ModelStore store;
  ASSERT_TRUE(store.CreateFromSpec("net", kNet, 1).ok());
  VersionWaiter waiter(&store);
  Outcome outcome;
  EXPECT_EQ(waiter.Wait("net", 1, absl::InfinitePast(), outcome.Callback()), 0);
  ASSERT_TRUE(outcome.done.HasBeenNotified());
  EXPECT_TRUE(outcome.status.ok());
}

TEST(VersionWaiterTest, ACommitWakesTheWait) {
  ModelStore store;
  ASSERT_TRUE(store.CreateFromSpec("net", kNet, 1).ok());
  VersionWaiter waiter(&store);
  Outcome outcome;
  EXPECT_NE(waiter.Wait("net", 3, absl::Now() + absl::Seconds(60),
                        outcome.Callback()),
            0);
  LoadOnce(store);
  EXPECT_FALSE(outcome.done.WaitForNotificationWithTimeout(
      absl::Milliseconds(50)));  // Version 2 is not enough.
  const absl::Time committed = absl::Now();
  LoadOnce(store);
  ASSERT_TRUE(outcome.done.WaitForNotificationWithTimeout(absl::Seconds(10)));
  EXPECT_TRUE(outcome.status.ok());
  EXPECT_LT(absl::Now() - committed, absl::Seconds(5));
  EXPECT_EQ(waiter.pending(), 0);
}

TEST(VersionWaiterTest, CreatingTheModelWakesTheWait) {
  ModelStore store;
  VersionWaiter waiter(&store);
  Outcome outcome;
  waiter.Wait("net", 1, absl::Now() + absl::Seconds(60), outcome.Callback());
  ASSERT_TRUE(store.CreateFromSpec("net", kNet, 1).ok());
  ASSERT_TRUE(outcome.done.WaitForNotificationWithTimeout(absl::Seconds(10)));
  EXPECT_TRUE(outcome.status.ok());
}

TEST(VersionWaiterTest, TheDeadlineEndsTheWaitWithUnavailable) {
  ModelStore store;
  ASSERT_TRUE(store.CreateFromSpec("net", kNet, 1).ok());
  VersionWaiter waiter(&store);
  Outcome outcome, absent;
  const absl::Time start = absl::Now();
  waiter.Wait("net", 2, start + absl::Milliseconds(200), outcome.Callback());
  waiter.Wait("other", 7, start + absl::Milliseconds(200), absent.Callback());
  ASSERT_TRUE(outcome.done.WaitForNotificationWithTimeout(absl::Seconds(10)));
  ASSERT_TRUE(absent.done.WaitForNotificationWithTimeout(absl::Seconds(10)));
  EXPECT_GE(absl::Now() - start, absl::Milliseconds(200));
  EXPECT_EQ(outcome.status.code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(std::string(outcome.status.message()),
              HasSubstr("is at version 1, asked for min_version 2"));
  EXPECT_THAT(
      std::string(absent.status.message()),
      HasSubstr("\"other\" does not exist here, asked for min_version 7"));
}

TEST(VersionWaiterTest, CancelledWaitsNeverCallBack) {
  ModelStore store;
  ASSERT_TRUE(store.CreateFromSpec("net", kNet, 1).ok());
  VersionWaiter waiter(&store);
  std::atomic<int> calls{0};
  const int64_t id = waiter.Wait("net", 2, absl::Now() + absl::Seconds(60),
                                 [&](absl::Status) { ++calls; });
  EXPECT_TRUE(waiter.Cancel(id));
  EXPECT_FALSE(waiter.Cancel(id));
  LoadOnce(store);
  Outcome later;  // Proves the thread ran after the commit.
  waiter.Wait("net", 3, absl::Now() + absl::Seconds(60), later.Callback());
  LoadOnce(store);
  ASSERT_TRUE(later.done.WaitForNotificationWithTimeout(absl::Seconds(10)));
  EXPECT_EQ(calls.load(), 0);
}

TEST(VersionWaiterTest, ShutdownEndsPendingAndLaterWaits) {
  ModelStore store;
  Outcome pending, later;
  {
    VersionWaiter waiter(&store);
    waiter.Wait("net", 1, absl::InfiniteFuture(), pending.Callback());
    waiter.Shutdown();
    ASSERT_TRUE(pending.done.WaitForNotificationWithTimeout(absl::Seconds(10)));
    EXPECT_EQ(waiter.Wait("net", 1, absl::InfiniteFuture(), later.Callback()),
              0);
  }
  EXPECT_EQ(pending.status.code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(later.status.code(), absl::StatusCode::kUnavailable);
  // The store's listener is gone with the waiter.
  EXPECT_TRUE(store.CreateFromSpec("net", kNet, 1).ok());
}

TEST(VersionWaiterTest, DestroyingTheWaiterEndsItsWaits) {
  ModelStore store;
  Outcome pending;
  {
    VersionWaiter waiter(&store);
    waiter.Wait("net", 1, absl::InfiniteFuture(), pending.Callback());
  }
  ASSERT_TRUE(pending.done.HasBeenNotified());
  EXPECT_EQ(pending.status.code(), absl::StatusCode::kUnavailable);
}

}  // namespace
}  // namespace modelstate

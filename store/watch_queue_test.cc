#include "store/watch_queue.h"

#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace modelstate {
namespace {

using testing::ElementsAre;

std::vector<std::string> Drain(EventQueue& queue) {
  std::vector<std::string> out;
  while (!queue.empty()) {
    const ModelEvent event = queue.Pop();
    out.push_back(
        absl::StrCat(static_cast<int>(event.type), event.model, event.version));
  }
  return out;
}

constexpr ModelEvent::Type kCreated = ModelEvent::Type::kCreated;
constexpr ModelEvent::Type kUpdated = ModelEvent::Type::kUpdated;
constexpr ModelEvent::Type kDeleted = ModelEvent::Type::kDeleted;

TEST(WatchQueueTest, ConsecutiveUpdatesCollapseIntoTheNewest) {
  WatchQueue queue(16);
  queue.Push({kCreated, "m", 1});
  for (int v = 2; v <= 300; ++v) queue.Push({kUpdated, "m", v});
  EXPECT_EQ(queue.size(), 2u);
  queue.Push({kDeleted, "m", 300});
  queue.Push({kCreated, "m", 301});
  queue.Push({kUpdated, "m", 302});
  EXPECT_THAT(Drain(queue),
              ElementsAre("0m1", "1m300", "2m300", "0m301", "1m302"));
}

TEST(WatchQueueTest, UpdatesOfDifferentModelsStaySeparate) {
  WatchQueue queue(16);
  queue.Push({kUpdated, "a", 2});
  queue.Push({kUpdated, "b", 7});
  queue.Push({kUpdated, "b", 8});
  EXPECT_THAT(Drain(queue), ElementsAre("1a2", "1b8"));
}

TEST(WatchQueueTest, TheBoundDropsTheOldestAndKeepsTheNewest) {
  WatchQueue queue(3);
  for (int v = 1; v <= 100; ++v) {
    queue.Push({kCreated, "m", v});
    queue.Push({kDeleted, "m", v});
  }
  EXPECT_EQ(queue.size(), 3u);
  EXPECT_THAT(Drain(queue), ElementsAre("2m99", "0m100", "2m100"));
}

TEST(LatestEventQueueTest, KeepsEachModelsNewestEventInFirstChangedOrder) {
  const ModelEvent::Type kCurrent = ModelEvent::Type::kCurrent;
  const ModelEvent::Type kListed = ModelEvent::Type::kListed;
  LatestEventQueue queue;
  queue.Push({kCurrent, "a", 3});
  queue.Push({kCurrent, "b", 1});
  queue.Push({kListed, "", 0});
  for (int v = 4; v <= 1000; ++v) queue.Push({kUpdated, "a", v});
  queue.Push({kCreated, "c", 1});
  queue.Push({kDeleted, "b", 1});
  // Far more events than models: one per model, the listing marker last of
  // the listing, the newest state of each model.
  EXPECT_EQ(queue.size(), 4u);
  EXPECT_THAT(Drain(queue), ElementsAre("1a1000", "2b1", "50", "0c1"));
  queue.Push({kCreated, "d", 1});
  queue.Push({kDeleted, "d", 1});
  queue.Push({kCreated, "d", 2});
  EXPECT_THAT(Drain(queue), ElementsAre("0d2"));
}

}  // namespace
}  // namespace modelstate

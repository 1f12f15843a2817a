// Epochs and what a follower decides from them: the table of its cases.
#include "store/lineage.h"

#include <set>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace modelstate {
namespace {

using ::testing::HasSubstr;

TEST(EpochTest, NewEpochsAreNonzeroAndDistinct) {
  std::set<uint64_t> epochs;
  for (int i = 0; i < 100; ++i) {
    const uint64_t epoch = NewEpoch();
    EXPECT_NE(epoch, 0u);
    epochs.insert(epoch);
  }
  EXPECT_EQ(epochs.size(), 100u);
}

TEST(EpochTest, NamesAreSixteenHexDigitsThatParseBack) {
  EXPECT_EQ(EpochName(0x1f), "000000000000001f");
  EXPECT_EQ(EpochName(0x9f3c2a1b4d5e6f70), "9f3c2a1b4d5e6f70");
  EXPECT_EQ(ParseEpoch("9f3c2a1b4d5e6f70").value(), 0x9f3c2a1b4d5e6f70u);
  EXPECT_EQ(ParseEpoch("1F").value(), 0x1fu);
  for (const char* bad : {"", "0", "0000000000000000", "12345678901234567",
                          "0x12", "g1", "-1", " 1f"}) {
    EXPECT_EQ(ParseEpoch(bad).status().code(),
              absl::StatusCode::kInvalidArgument)
        << bad;
  }
}

TEST(EpochTest, AdoptionFlagIsNoneAnyOrOneEpoch) {
  const EpochAdoption none = ParseEpochAdoption("").value();
  EXPECT_FALSE(none.Allows(7));
  const EpochAdoption any = ParseEpochAdoption("any").value();
  EXPECT_TRUE(any.Allows(7));
  const EpochAdoption one = ParseEpochAdoption("00000000000000a7").value();
  EXPECT_TRUE(one.Allows(0xa7));
  EXPECT_FALSE(one.Allows(0xa8));
  absl::StatusOr<EpochAdoption> bad = ParseEpochAdoption("yes");
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(bad.status().message(), HasSubstr("--adopt_epoch"));
}

struct EpochCase {
  const char* name;
  Lineage held;
  bool holds_models;
  uint64_t upstream;
  EpochAdoption adoption;
  EpochAction action;
  uint64_t epoch;
};

Lineage Of(uint64_t epoch, bool adopting = false) {
  Lineage lineage;
  lineage.epoch = epoch;
  lineage.adopting = adopting;
  return lineage;
}

EpochAdoption Allowing(uint64_t epoch) {
  EpochAdoption adoption;
  adoption.epoch = epoch;
  return adoption;
}

EpochAdoption AllowingAny() {
  EpochAdoption adoption;
  adoption.any = true;
  return adoption;
}

TEST(DecideEpochTest, EveryCase) {
  constexpr uint64_t kA = 0xa, kB = 0xb;
  using A = EpochAction;
  const EpochCase cases[] = {
      {"same epoch", Of(kA), true, kA, {}, A::kFollow, kA},
      {"upstream predates epochs", Of(kA), true, 0, {}, A::kFollow, kA},
      {"neither knows", Of(0), true, 0, {}, A::kFollow, 0},
      {"first epoch, nothing held", Of(0), false, kB, {}, A::kFollow, kB},
      {"first epoch, a data dir from before epochs",
       Of(0),
       true,
       kB,
       {},
       A::kFollow,
       kB},
      {"another history, not allowed", Of(kA), true, kB, {}, A::kRefuse, kA},
      {"another history, another one allowed", Of(kA), true, kB, Allowing(kA),
       A::kRefuse, kA},
      {"another history, allowed by name", Of(kA), true, kB, Allowing(kB),
       A::kAdopt, kB},
      {"another history, any allowed", Of(kA), true, kB, AllowingAny(),
       A::kAdopt, kB},
      {"another history, nothing held to lose",
       Of(kA),
       false,
       kB,
       {},
       A::kAdopt,
       kB},
      {"an adoption cut short resumes",
       Of(kB, true),
       true,
       kB,
       {},
       A::kAdopt,
       kB},
      {"an adoption cut short meets a third history",
       Of(kB, true),
       true,
       kA,
       {},
       A::kRefuse,
       kB},
      {"an adoption cut short meets an old upstream",
       Of(kB, true),
       true,
       0,
       {},
       A::kRefuse,
       kB},
  };
  for (const EpochCase& c : cases) {
    const EpochDecision decision =
        DecideEpoch(c.held, c.holds_models, c.upstream, c.adoption);
    EXPECT_EQ(decision.action, c.action) << c.name;
    EXPECT_EQ(decision.epoch, c.epoch) << c.name;
  }
}

}  // namespace
}  // namespace modelstate

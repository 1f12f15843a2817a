#include "client/format.h"

#include <cstdint>
#include <limits>

#include "gtest/gtest.h"

namespace modelstate {
namespace {

TEST(HumanBytesTest, ExactBelowOneKibibyte) {
  EXPECT_EQ(HumanBytes(0), "0 B");
  EXPECT_EQ(HumanBytes(1), "1 B");
  EXPECT_EQ(HumanBytes(512), "512 B");
  EXPECT_EQ(HumanBytes(1023), "1023 B");
}

TEST(HumanBytesTest, BinaryUnitsWithOneDecimal) {
  EXPECT_EQ(HumanBytes(1024), "1.0 KiB");
  EXPECT_EQ(HumanBytes(23040), "22.5 KiB");
  EXPECT_EQ(HumanBytes(uint64_t{3} << 20), "3.0 MiB");
  EXPECT_EQ(HumanBytes(uint64_t{1} << 30), "1.0 GiB");
  EXPECT_EQ(HumanBytes((uint64_t{5} << 40) + (uint64_t{1} << 39)), "5.5 TiB");
  EXPECT_EQ(HumanBytes(uint64_t{1} << 50), "1.0 PiB");
}

TEST(HumanBytesTest, RoundsToTheNearestTenth) {
  EXPECT_EQ(HumanBytes(1126), "1.1 KiB");  // 1.0996 KiB
  EXPECT_EQ(HumanBytes(1075), "1.0 KiB");  // 1.0498 KiB
}

TEST(HumanBytesTest, NeverPrints1024OfAUnit) {
  EXPECT_EQ(HumanBytes(1048524), "1023.9 KiB");  // 1023.94 KiB
  EXPECT_EQ(HumanBytes(1048525), "1.0 MiB");     // 1023.95 KiB
  EXPECT_EQ(HumanBytes((uint64_t{1} << 20) - 1), "1.0 MiB");
  EXPECT_EQ(HumanBytes((uint64_t{1} << 30) - 1), "1.0 GiB");
}

TEST(HumanBytesTest, LargestCountIsInExbibytes) {
  EXPECT_EQ(HumanBytes(std::numeric_limits<uint64_t>::max()), "16.0 EiB");
}

}  // namespace
}  // namespace modelstate

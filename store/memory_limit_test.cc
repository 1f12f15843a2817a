#include "store/memory_limit.h"

#include <sys/stat.h>

#include <cstdlib>
#include <fstream>
#include <string>

#include "gtest/gtest.h"

namespace modelstate {
namespace {

std::string MakeRoot() {
  std::string dir = testing::TempDir() + "/cgroupXXXXXX";
  EXPECT_NE(mkdtemp(dir.data()), nullptr);
  mkdir((dir + "/memory").c_str(), 0755);
  return dir;
}

TEST(MemoryLimitTest, CgroupV2LimitWinsWithAMargin) {
  const std::string root = MakeRoot();
  std::ofstream(root + "/memory.max") << "1073741824\n";
  const DefaultMemoryLimit limit = DetectMemoryLimit(root);
  EXPECT_EQ(limit.source, "cgroup v2");
  EXPECT_EQ(limit.bytes, 1073741824 / 10 * 9);
}

TEST(MemoryLimitTest, V1LimitIsUsedWhenV2SaysMax) {
  const std::string root = MakeRoot();
  std::ofstream(root + "/memory.max") << "max\n";
  std::ofstream(root + "/memory/memory.limit_in_bytes") << "2147483648\n";
  const DefaultMemoryLimit limit = DetectMemoryLimit(root);
  EXPECT_EQ(limit.source, "cgroup v1");
  EXPECT_EQ(limit.bytes, int64_t{2147483648} / 10 * 9);
}

TEST(MemoryLimitTest, NoLimitOrAnUnlimitedOneFallsBackToPhysicalMemory) {
  const std::string root = MakeRoot();
  std::ofstream(root + "/memory/memory.limit_in_bytes")
      << "9223372036854771712\n";  // v1's "unlimited"
  const DefaultMemoryLimit limit = DetectMemoryLimit(root);
  EXPECT_EQ(limit.source, "physical memory");
  EXPECT_GT(limit.bytes, int64_t{64} << 20);
  EXPECT_EQ(DetectMemoryLimit(root + "/absent").source, "physical memory");
}

}  // namespace
}  // namespace modelstate

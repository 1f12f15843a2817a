#include "bench/counters.h"

#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <climits>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace modelstate::bench {
namespace {

using ::testing::ElementsAre;
using ::testing::Pair;

// A /proc/PID/stat line whose command name holds spaces and parentheses;
// utime (field 14) is 1234 and stime (field 15) 567, cutime and cstime (16,
// 17, the children's) 89 and 10.
constexpr char kStat[] =
    "4242 (a) b (c)) S 1 4242 4242 0 -1 4194560 2500 0 3 0 1234 567 89 10 "
    "20 0 4 0 100 123456789 2048 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 "
    "17 1 0 0 0 0 0\n";

TEST(ParseStatCpuTicksTest, AddsUtimeAndStimeAfterANameWithParentheses) {
  EXPECT_EQ(ParseStatCpuTicks(kStat), 1234 + 567);
}

TEST(ParseStatCpuTicksTest, RejectsWhatIsNotAStatLine) {
  EXPECT_EQ(ParseStatCpuTicks(""), std::nullopt);
  EXPECT_EQ(ParseStatCpuTicks("4242 no name 1 2 3 4 5 6 7 8 9 10 11 12 13"),
            std::nullopt);
  // Cut after utime: no stime.
  EXPECT_EQ(ParseStatCpuTicks("4242 (x) S 1 4242 4242 0 -1 4194560 2500 0 3 "
                              "0 1234"),
            std::nullopt);
  EXPECT_EQ(ParseStatCpuTicks("4242 (x) S 1 4242 4242 0 -1 4194560 2500 0 3 "
                              "0 12x4 567"),
            std::nullopt);
}

TEST(ParseVmstatTest, ReadsNameValueLinesUpToTheFirstOtherLine) {
  EXPECT_THAT(ParseVmstat("pgfault 12\nthp_fault_alloc 3\n"),
              ElementsAre(Pair("pgfault", 12), Pair("thp_fault_alloc", 3)));
  EXPECT_THAT(ParseVmstat("pgfault 12\nbroken\npgscan_direct 7\n"),
              ElementsAre(Pair("pgfault", 12)));
}

Counters Reading(long long reported_kib, long long pgfault,
                 long long pgscan_direct) {
  Counters counters;
  counters.reported_kib = reported_kib;
  counters.vmstat = {{"pgfault", pgfault}, {"pgscan_direct", pgscan_direct}};
  return counters;
}

TEST(SystemDeltasTest, GivesTheNamedCountersInOrderAndSkipsAbsentOnes) {
  const Counters before = Reading(100, 1000, 5);
  const Counters after = Reading(2148, 1010, 7);
  EXPECT_EQ(SystemDeltas(before, after, {"pgscan_direct", "nope", "pgfault"}),
            "reported_kib 2048 pgscan_direct 2 pgfault 10");
}

TEST(UsageDeltasTest, GivesEveryFieldWithItsPrefix) {
  Usage before;
  Usage after;
  after.user_seconds = 0.5;
  after.system_seconds = 0.25;
  after.minor_faults = 10;
  after.major_faults = 1;
  after.voluntary_switches = 7;
  after.involuntary_switches = 3;
  EXPECT_EQ(UsageDeltas("ctl_", before, after),
            "ctl_user_s 0.5 ctl_sys_s 0.25 ctl_minflt 10 ctl_majflt 1 "
            "ctl_nvcsw 7 ctl_nivcsw 3");
}

// P1's line, which docs/performance.md quotes, keeps its fields and order.
TEST(FaultDeltasTest, GivesP1sFields) {
  Counters before;
  Counters after;
  int value = 0;
  for (const std::string& name : FaultVmstat()) {
    before.vmstat[name] = 100;
    after.vmstat[name] = 100 + value++;
  }
  before.self.minor_faults = 5;
  after.self.minor_faults = 25;
  after.self.user_seconds = 0.5;
  after.self.system_seconds = 0.25;
  after.reported_kib = 4096;
  EXPECT_EQ(FaultDeltas(before, after),
            "minflt 20 cpu_s 0.75 reported_kib 4096 pgfault 0 "
            "thp_fault_alloc 1 thp_fault_fallback 2 compact_stall 3 "
            "compact_fail 4 pgscan_direct 5 thp_split_pmd 6");
}

// P3 counts a pull through RUSAGE_CHILDREN, which must include a child once
// waitpid has reaped it.
TEST(ReadUsageTest, ChildrenIncludeAReapedChildsFaults) {
  constexpr int kPages = 64;
  const Usage before = ReadUsage(RUSAGE_CHILDREN);
  const pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    const long page = sysconf(_SC_PAGESIZE);
    void* memory = mmap(nullptr, kPages * page, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (memory == MAP_FAILED) _exit(1);
    for (int i = 0; i < kPages; ++i) static_cast<char*>(memory)[i * page] = 1;
    _exit(0);
  }
  int status = 0;
  ASSERT_EQ(waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  const Usage after = ReadUsage(RUSAGE_CHILDREN);
  EXPECT_GE(after.minor_faults - before.minor_faults, kPages);
}

// This process's user + system CPU seconds, from getrusage.
double OwnCpuSeconds() {
  const Usage self = ReadUsage(RUSAGE_SELF);
  return self.user_seconds + self.system_seconds;
}

// Spins until this process has used `seconds` of CPU, for at most 10 s.
void UseCpuUntil(double seconds) {
  const auto give_up =
      std::chrono::steady_clock::now() + std::chrono::seconds(10);
  volatile unsigned sink = 0;
  while (OwnCpuSeconds() < seconds &&
         std::chrono::steady_clock::now() < give_up) {
    for (int i = 0; i < 100000; ++i) sink = sink + i;
  }
}

TEST(ProcessCpuSecondsTest, AgreesWithGetrusageForThisProcess) {
  UseCpuUntil(0.3);
  const double before = OwnCpuSeconds();
  ASSERT_GE(before, 0.3);
  const std::optional<double> seconds = ProcessCpuSeconds(getpid());
  const double after = OwnCpuSeconds();
  ASSERT_TRUE(seconds.has_value());
  // /proc counts whole clock ticks (usually 10 ms).
  EXPECT_GE(*seconds, before - 0.05);
  EXPECT_LE(*seconds, after + 0.05);
}

TEST(ProcessCpuSecondsTest, NoneForAProcessThatDoesNotExist) {
  EXPECT_EQ(ProcessCpuSeconds(INT_MAX), std::nullopt);  // above any pid_max
}

TEST(ReadCountersTest, ReadsTheServersCpuSecondsOnlyWhenGivenOne) {
  UseCpuUntil(0.1);
  const Counters with_server = ReadCounters(getpid());
  EXPECT_GT(with_server.server_cpu_seconds, 0);
  EXPECT_EQ(ReadCounters().server_cpu_seconds, 0);
  EXPECT_GT(with_server.vmstat.count("pgfault"), 0u);
}

}  // namespace
}  // namespace modelstate::bench

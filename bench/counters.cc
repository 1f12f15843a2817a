#include "bench/counters.h"

#include <sys/resource.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <sstream>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace modelstate::bench {
namespace {

constexpr char kReportedKib[] =
    "/sys/module/page_reporting/parameters/reported_kib";

std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

double Seconds(const timeval& time) { return time.tv_sec + time.tv_usec / 1e6; }

}  // namespace

const std::vector<std::string>& FaultVmstat() {
  static const auto* const names = new std::vector<std::string>{
      "pgfault",      "thp_fault_alloc", "thp_fault_fallback", "compact_stall",
      "compact_fail", "pgscan_direct",   "thp_split_pmd"};
  return *names;
}

const std::vector<std::string>& ReclaimVmstat() {
  static const auto* const names = [] {
    auto* names = new std::vector<std::string>(FaultVmstat());
    for (const char* name : {"pgmajfault", "pgscan_kswapd", "pgsteal_kswapd",
                             "pgsteal_direct", "allocstall_normal",
                             "allocstall_movable", "workingset_refault_file"}) {
      names->push_back(name);
    }
    return names;
  }();
  return *names;
}

Usage ReadUsage(int who) {
  rusage usage{};
  if (getrusage(who, &usage) != 0) return {};
  Usage read;
  read.user_seconds = Seconds(usage.ru_utime);
  read.system_seconds = Seconds(usage.ru_stime);
  read.minor_faults = usage.ru_minflt;
  read.major_faults = usage.ru_majflt;
  read.voluntary_switches = usage.ru_nvcsw;
  read.involuntary_switches = usage.ru_nivcsw;
  return read;
}

std::map<std::string, long long> ParseVmstat(absl::string_view text) {
  std::map<std::string, long long> vmstat;
  for (absl::string_view line : absl::StrSplit(text, '\n', absl::SkipEmpty())) {
    const std::vector<absl::string_view> fields =
        absl::StrSplit(line, ' ', absl::SkipEmpty());
    long long value;
    if (fields.size() != 2 || !absl::SimpleAtoi(fields[1], &value)) break;
    vmstat[std::string(fields[0])] = value;
  }
  return vmstat;
}

std::optional<long long> ParseStatCpuTicks(absl::string_view text) {
  // The command name may hold ") ", so the fields start after the last ')'.
  const size_t name_end = text.rfind(')');
  if (name_end == absl::string_view::npos) return std::nullopt;
  // Field 3 (the state) is the first after the name: utime (14) and stime
  // (15) are the 12th and 13th.
  const std::vector<absl::string_view> fields =
      absl::StrSplit(text.substr(name_end + 1), ' ', absl::SkipWhitespace());
  long long user, system;
  if (fields.size() < 13 || !absl::SimpleAtoi(fields[11], &user) ||
      !absl::SimpleAtoi(fields[12], &system)) {
    return std::nullopt;
  }
  return user + system;
}

std::optional<double> ProcessCpuSeconds(pid_t pid) {
  const std::optional<long long> ticks =
      ParseStatCpuTicks(ReadFile(absl::StrCat("/proc/", pid, "/stat")));
  if (!ticks.has_value()) return std::nullopt;
  return static_cast<double>(*ticks) / sysconf(_SC_CLK_TCK);
}

Counters ReadCounters(pid_t server) {
  Counters counters;
  counters.vmstat = ParseVmstat(ReadFile("/proc/vmstat"));
  std::ifstream(kReportedKib) >> counters.reported_kib;
  counters.self = ReadUsage(RUSAGE_SELF);
  counters.children = ReadUsage(RUSAGE_CHILDREN);
  if (server > 0)
    counters.server_cpu_seconds = ProcessCpuSeconds(server).value_or(0);
  return counters;
}

std::string SystemDeltas(const Counters& before, const Counters& after,
                         const std::vector<std::string>& names) {
  std::string line =
      absl::StrCat("reported_kib ", after.reported_kib - before.reported_kib);
  for (const std::string& name : names) {
    const auto was = before.vmstat.find(name);
    const auto is = after.vmstat.find(name);
    if (was == before.vmstat.end() || is == after.vmstat.end()) continue;
    absl::StrAppend(&line, " ", name, " ", is->second - was->second);
  }
  return line;
}

std::string UsageDeltas(absl::string_view prefix, const Usage& before,
                        const Usage& after) {
  return absl::StrCat(
      prefix, "user_s ", after.user_seconds - before.user_seconds, " ", prefix,
      "sys_s ", after.system_seconds - before.system_seconds, " ", prefix,
      "minflt ", after.minor_faults - before.minor_faults, " ", prefix,
      "majflt ", after.major_faults - before.major_faults, " ", prefix,
      "nvcsw ", after.voluntary_switches - before.voluntary_switches, " ",
      prefix, "nivcsw ",
      after.involuntary_switches - before.involuntary_switches);
}

std::string FaultDeltas(const Counters& before, const Counters& after) {
  const double cpu_before =
      before.self.user_seconds + before.self.system_seconds;
  const double cpu_after = after.self.user_seconds + after.self.system_seconds;
  return absl::StrCat(
      "minflt ", after.self.minor_faults - before.self.minor_faults, " cpu_s ",
      cpu_after - cpu_before, " ", SystemDeltas(before, after, FaultVmstat()));
}

double SampleWithCounters(const std::string& what,
                          const std::function<double()>& timed,
                          const DescribeDeltas& describe, pid_t server) {
  const Counters before = ReadCounters(server);
  const double gbps = timed();
  const Counters after = ReadCounters(server);
  std::fprintf(stderr, "%s %s GB/s %s\n", what.c_str(),
               absl::StrCat(gbps).c_str(), describe(before, after).c_str());
  return gbps;
}

}  // namespace modelstate::bench

// Per-sample counters: what the kernel, this process, its reaped children and
// a server process did while one timed sample ran, printed as one line on
// stderr beside the sample's GB/s, so that a slow sample can be told from a
// fast one by its faults, reclaim, compaction and CPU time
// (docs/performance.md, "P1: why it was bimodal"; P1 and P3 print them).
//
// The counters are read before and after the timed span, never inside it.
// Not thread-safe: getrusage(RUSAGE_CHILDREN) counts whichever children any
// thread reaps in between.
#ifndef MODELSTATE_BENCH_COUNTERS_H_
#define MODELSTATE_BENCH_COUNTERS_H_

#include <sys/types.h>

#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/string_view.h"

namespace modelstate::bench {

// The /proc/vmstat counters that tell a sample's page-fault and huge-page
// work: faults, THP allocations and fallbacks, direct compaction and reclaim
// (P1's line).
const std::vector<std::string>& FaultVmstat();

// FaultVmstat and the counters of reclaim (kswapd's and direct scans and
// steals, allocation stalls, refaults of evicted page cache) and of major
// faults: what writing a file to tmpfs under memory pressure would show (P3).
const std::vector<std::string>& ReclaimVmstat();

// One getrusage() reading.
struct Usage {
  double user_seconds = 0;
  double system_seconds = 0;
  long long minor_faults = 0;
  long long major_faults = 0;
  long long voluntary_switches = 0;    // blocked (waited for I/O, a lock, ...)
  long long involuntary_switches = 0;  // preempted
};

// getrusage(`who`): RUSAGE_SELF, or RUSAGE_CHILDREN for every child this
// process has reaped (waitpid) so far, with theirs. All 0 on failure.
Usage ReadUsage(int who);

struct Counters {
  std::map<std::string, long long> vmstat;  // all of /proc/vmstat
  // Free memory the guest kernel has handed back to the hypervisor (free page
  // reporting), which the host must fault in and zero again on the next
  // touch. 0 outside such virtual machines.
  long long reported_kib = 0;
  Usage self;      // this process
  Usage children;  // this process's reaped children
  // User + system CPU seconds of the server given to ReadCounters, all its
  // threads; 0 if none was given or its /proc entry cannot be read.
  double server_cpu_seconds = 0;
};

// Reads every counter, the CPU seconds of process `server` too when it is > 0.
Counters ReadCounters(pid_t server = 0);

// Parses /proc/vmstat's "name value" lines; stops at the first line that is
// not one.
std::map<std::string, long long> ParseVmstat(absl::string_view text);

// The user + system clock ticks (fields 14 and 15) of a /proc/PID/stat line,
// whose second field, the command name in parentheses, may itself hold spaces
// and parentheses. Nullopt if `text` is not such a line.
std::optional<long long> ParseStatCpuTicks(absl::string_view text);

// The CPU seconds (user + system, every thread) of process `pid` from
// /proc/`pid`/stat; nullopt if it cannot be read.
std::optional<double> ProcessCpuSeconds(pid_t pid);

// "reported_kib D name D ..." for each of `names` present in both readings,
// D being after's value minus before's.
std::string SystemDeltas(const Counters& before, const Counters& after,
                         const std::vector<std::string>& names);

// "`prefix`user_s D `prefix`sys_s D `prefix`minflt D `prefix`majflt D
// `prefix`nvcsw D `prefix`nivcsw D": every field of Usage, after minus before.
std::string UsageDeltas(absl::string_view prefix, const Usage& before,
                        const Usage& after);

// P1's description of a sample: "minflt D cpu_s D " (this process) followed
// by SystemDeltas of FaultVmstat.
std::string FaultDeltas(const Counters& before, const Counters& after);

// How a sample's line describes what changed between two readings.
using DescribeDeltas =
    std::function<std::string(const Counters& before, const Counters& after)>;

// Reads the counters (with `server`'s CPU seconds), runs `timed` — the
// timed transfer, which returns its GB/s — and reads them again; prints
// "`what` <GB/s> GB/s <describe(before, after)>" on stderr and returns the
// GB/s.
double SampleWithCounters(const std::string& what,
                          const std::function<double()>& timed,
                          const DescribeDeltas& describe, pid_t server = 0);

}  // namespace modelstate::bench

#endif  // MODELSTATE_BENCH_COUNTERS_H_

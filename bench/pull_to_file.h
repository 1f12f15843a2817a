// P3: `modelstatectl pull` (the real binary, a process per pull) writing the
// main model to a file on tmpfs, against nginx sendfile -> libcurl writing the
// same bytes to a file on the same tmpfs. Every output file is compared byte
// for byte with the file nginx serves, so a failed or short transfer ends the
// run instead of passing for a fast one. Every sample prints its counters on
// stderr (bench/counters.h): a pull's line "P3 <GB/s> GB/s ctl_user_s ..."
// has the modelstatectl process's CPU seconds, faults and context switches
// and the daemon's CPU seconds, a libcurl fetch's line "P3.c <GB/s> GB/s
// user_s ..." has this process's and nginx's CPU seconds; both end with the
// kernel's reclaim, compaction and fault counters.
//
// --only=P3 runs P3 alone (RunPullToFileOnly).
#ifndef MODELSTATE_BENCH_PULL_TO_FILE_H_
#define MODELSTATE_BENCH_PULL_TO_FILE_H_

#include <string>
#include <vector>

#include "bench/child_process.h"
#include "bench/plan.h"
#include "bench/results.h"

namespace modelstate::bench {

// In GB/s (file bytes per second), one per repetition.
struct PullToFileSamples {
  std::vector<double> modelstatectl, nginx;
};

// Creates the tmpfs directory of P3's files (under /dev/shm, unique to this
// process; nginx serves it at /tmpfs/, bench/nginx.h) and returns its path.
// The directory and whatever it holds are removed when the process exits
// (also through Die), since tmpfs files hold memory until deleted.
std::string CreateTmpfsDir();

// Pulls `model` from `daemon` (at 127.0.0.1:daemon.port) once with
// config.ctl into `tmpfs_dir`/served.safetensors, the file `nginx` then
// serves; then `reps` times, in an order that alternates, a timed pull into a
// new file and a timed libcurl fetch into another, each checked against the
// served file and deleted, and each printing its line of counters on stderr
// (read outside the timing; `daemon`.pid and `nginx`.pid give the servers'
// CPU seconds). Deletes the served file too. Dies on any failure or mismatch.
// A pull is counted through getrusage(RUSAGE_CHILDREN), so no other thread
// may reap a child meanwhile.
PullToFileSamples MeasurePullToFile(const Config& config, const Child& daemon,
                                    const std::string& model,
                                    const Child& nginx,
                                    const std::string& tmpfs_dir, int reps);

// Adds the figures P3 and P3.c.
void AddPullToFileRows(PullToFileSamples samples, Results& results);

// Adds the ratio P3/c = P3 / P3.c (target >= 1.0), once both are in
// `results`.
void AddPullToFileRatio(Results& results);

// Runs P3 alone: a daemon holding only the main model (16 tensors, loaded as
// a trainer would, as P1's) and nginx serving P3's tmpfs directory, then
// MeasurePullToFile and the rows and ratio above; prints them as markdown and
// JSON on stdout (and to config.out if set). Returns the exit code.
int RunPullToFileOnly(const Config& config);

}  // namespace modelstate::bench

#endif  // MODELSTATE_BENCH_PULL_TO_FILE_H_

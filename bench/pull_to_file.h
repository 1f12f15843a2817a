// P3: `modelstatectl pull` (the real binary, a process per pull) writing the
// main model to a file on tmpfs, against nginx sendfile -> libcurl writing the
// same bytes to a file on the same tmpfs. Every output file is compared byte
// for byte with the file nginx serves, so a failed or short transfer ends the
// run instead of passing for a fast one.
#ifndef MODELSTATE_BENCH_PULL_TO_FILE_H_
#define MODELSTATE_BENCH_PULL_TO_FILE_H_

#include <string>
#include <vector>

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

// Pulls `model` from the daemon at 127.0.0.1:`daemon_port` once with
// config.ctl into `tmpfs_dir`/served.safetensors, the file nginx (at
// `nginx_port`) then serves; then `reps` times, in an order that alternates,
// a timed pull into a new file and a timed libcurl fetch into another, each
// checked against the served file and deleted. Deletes the served file too.
// Dies on any failure or mismatch.
PullToFileSamples MeasurePullToFile(const Config& config, int daemon_port,
                                    const std::string& model, int nginx_port,
                                    const std::string& tmpfs_dir, int reps);

// Adds the figures P3 and P3.c (the suite adds their ratio).
void AddPullToFileRows(PullToFileSamples samples, Results& results);

}  // namespace modelstate::bench

#endif  // MODELSTATE_BENCH_PULL_TO_FILE_H_

#!/usr/bin/env bash
# Runs the benchmark suite (modelstated and modelstatectl beside raw TCP, naive gRPC and nginx)
# and writes the results table to bench/results/latest.md and .json: every figure of
# docs/performance.md (P1, P1r, P3 to P10) from this one run. Usage: bench/run.sh [--quick] [--reps=N]
# The full suite (5 repetitions) runs in about 7 minutes on 2 cores, plus a minute the first time
# to write the model files. It needs about 6.5 GB of free disk in /tmp/modelstate-bench (the model
# files, kept for the next run), 2 GiB of /dev/shm (P3's files, removed when it exits) and about
# 16 GB of memory at its peak: P10's 4 GiB model is held at once by the daemon, the raw-TCP server
# and the client (every other server is stopped by then). --quick runs in under a minute.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install-deps.sh
build_dir="${MODELSTATE_BUILD_DIR:-build}"
cmake -S . -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$build_dir" -j"$(nproc)" --target modelstate_bench modelstated
mkdir -p bench/results
"$build_dir/bench/modelstate_bench" --out=bench/results/latest "$@"

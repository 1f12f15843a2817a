#!/usr/bin/env bash
# Runs the benchmark suite (modelstated beside raw TCP, naive gRPC and nginx) and writes the
# results table to bench/results/latest.md and .json. Usage: bench/run.sh [--quick] [--reps=N]
# The full suite needs about 8 GB of free disk in /tmp and 12 GB of memory, and runs in under
# 10 minutes on 2 cores; --quick runs in under a minute.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install-deps.sh
build_dir="${MODELSTATE_BUILD_DIR:-build}"
cmake -S . -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$build_dir" -j"$(nproc)" --target modelstate_bench modelstated
mkdir -p bench/results
"$build_dir/bench/modelstate_bench" --out=bench/results/latest "$@"

#!/usr/bin/env bash
# Runs the replication benchmark (one primary, 1/2/4 followers and a chain on loopback; see
# docs/scale.md) and writes bench/results/scale.md and .json. Usage: bench/scale.sh [--quick]
# [--reps=N]. The full run holds up to six copies of a 1 GiB model (about 10 GB of memory).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install-deps.sh
build_dir="${MODELSTATE_BUILD_DIR:-build}"
cmake -S . -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$build_dir" -j"$(nproc)" --target modelstate_scale_bench modelstated
mkdir -p bench/results
"$build_dir/bench/modelstate_scale_bench" --out=bench/results/scale "$@"

#!/usr/bin/env bash
# Runs bench/python_bench.py (the Python client against the C++ client and a grpcio client, one
# run) after building what it needs. Usage: bench/python_bench.sh [--model_mib=N] [--reps=N] ...
# Results go to bench/results/python.{md,json}. A 1 GiB model needs ~5 GB of free memory.
set -euo pipefail
cd "$(dirname "$0")/.."
build_dir="${MODELSTATE_BUILD_DIR:-build}"
cmake -S . -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$build_dir" -j"$(nproc)" --target modelstate_bench modelstated _modelstate
# Debian's interpreter: python3-torch, python3-grpcio, python3-grpc-tools and python3-xxhash
# are installed for it (tools/install-deps.sh).
PYTHONPATH="$build_dir/python${PYTHONPATH:+:$PYTHONPATH}" \
  exec /usr/bin/python3 bench/python_bench.py --build_dir="$build_dir" "$@"

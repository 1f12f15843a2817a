#!/usr/bin/env bash
# Installs dependencies, builds modelstated and modelstatectl, and runs the daemon in the
# foreground serving the built-in demo model on 127.0.0.1:50551. Extra arguments go to the daemon.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install-deps.sh
build_dir="${MODELSTATE_BUILD_DIR:-build}"
cmake -S . -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=Release
cmake --build "$build_dir" -j"$(nproc)" --target modelstated modelstatectl
echo "modelstatectl is at $build_dir/client/modelstatectl; try: $build_dir/client/modelstatectl models" >&2
exec "$build_dir/server/modelstated" --listen=127.0.0.1:50551 --demo_model=demo "$@"

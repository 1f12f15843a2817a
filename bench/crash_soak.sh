#!/usr/bin/env bash
# Crash-safety soak: SIGKILLs modelstated (--data_dir, sync durability) at random points while
# a client pushes versions, N times (default 300), checking after every restart that the model is
# at an acknowledged version (or the one in flight) with exactly the bytes pushed for it.
# Usage: bench/crash_soak.sh [TRIALS]   (after tools/test.sh or a build in ./build)
set -euo pipefail
cd "$(dirname "$0")/.."
build_dir="${MODELSTATE_BUILD_DIR:-build}"
cmake --build "$build_dir" --target durability_test modelstated >/dev/null
MODELSTATE_CRASH_TRIALS="${1:-300}" "$build_dir/tests/durability_test" \
  --gtest_filter='DurabilityTest.SigkillAtRandomPointsLosesNothingAcknowledged'

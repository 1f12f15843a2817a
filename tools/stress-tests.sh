#!/usr/bin/env bash
# Runs the tests that involve threads, processes or timing many times with
# `ctest -j2` while two CPU hogs compete for the cores, to flush out flaky tests.
# Prints the runs and the failures per test; exits non-zero if any
# run failed.
#
#   tools/stress-tests.sh [-b BUILD_DIR] [UNIT_RUNS [E2E_RUNS]]
#
# UNIT_RUNS (default 200) is how often the concurrency unit tests run;
# E2E_RUNS (default UNIT_RUNS / 10, at least 1) how often the server, daemon
# and durability tests run. BUILD_DIR (default build) must be built already.
# It competes with everything else on the machine: on a shared machine run it
# under the build lock, e.g.
#   flock /tmp/modelstate-build.lock tools/stress-tests.sh 5 2
set -uo pipefail

usage() {
  sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

build_dir=build
while getopts "b:h" option; do
  case "$option" in
    b) build_dir="$OPTARG" ;;
    *) usage ;;
  esac
done
shift $((OPTIND - 1))
[[ $# -le 2 ]] || usage
unit_runs="${1:-200}"
[[ "$unit_runs" =~ ^[1-9][0-9]*$ ]] || usage
e2e_runs="${2:-$(((unit_runs + 9) / 10))}"
[[ "$e2e_runs" =~ ^[1-9][0-9]*$ ]] || usage

# Threads, the async persister, subprocess handling.
unit_tests='^(ModelStoreTest\.Concurrent.*|RetainedVersionsTest\..*|DataDirTest\..*|SubprocessTest\..*)$'
# An in-process server, daemons as subprocesses, crashes and restarts.
e2e_tests='^(ServerTest|DaemonTest|DurabilityTest)\.'

count_tests() {
  ctest --test-dir "$build_dir" -N -R "$1" 2>/dev/null |
    sed -n 's/^Total Tests: \([0-9]*\)$/\1/p'
}
for regex in "$unit_tests" "$e2e_tests"; do
  if [[ "$(count_tests "$regex")" -eq 0 ]]; then
    echo "stress-tests: no tests match $regex in $build_dir (built?)" >&2
    exit 2
  fi
done

hogs=()
logs="$(mktemp -d "${TMPDIR:-/tmp}/stress-tests.XXXXXX")"
# shellcheck disable=SC2317  # called by the trap
cleanup() {
  if [[ ${#hogs[@]} -gt 0 ]]; then
    kill "${hogs[@]}" 2>/dev/null
    wait "${hogs[@]}" 2>/dev/null
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# One hog per core, at the tests' priority: the tests get what the scheduler
# leaves them, as on a busy CI machine.
for _ in 1 2; do
  sha256sum /dev/zero >/dev/null 2>&1 &
  hogs+=("$!")
done

declare -A failures_by_test=()
failed_runs=0
total_runs=0

# Runs the tests matching $2, $3 times; $1 names the group.
stress() {
  local group="$1" regex="$2" runs="$3" tests
  tests="$(count_tests "$regex")"
  echo "== $group: $runs runs of $tests tests with ctest -j2 and 2 CPU hogs"
  local run failed_here=0
  for ((run = 1; run <= runs; ++run)); do
    local log="$logs/$group-$run.log"
    total_runs=$((total_runs + 1))
    if ctest --test-dir "$build_dir" -j2 -R "$regex" --output-on-failure \
      >"$log" 2>&1; then
      rm -f "$log"
      continue
    fi
    failed_runs=$((failed_runs + 1))
    failed_here=$((failed_here + 1))
    # ctest lists them as "<tab> 49 - Suite.Name (Failed)".
    local name
    while read -r name; do
      failures_by_test["$name"]=$((${failures_by_test["$name"]:-0} + 1))
      echo "   run $run: $name failed (log: $log)"
    done < <(sed -n 's/^[[:space:]]*[0-9]* - \([^ ]*\) (.*)$/\1/p' "$log")
  done
  echo "   $group: $runs runs, $failed_here failed"
}

start=$SECONDS
stress unit "$unit_tests" "$unit_runs"
stress e2e "$e2e_tests" "$e2e_runs"

echo "== $total_runs runs in $((SECONDS - start)) s, $failed_runs failed"
if [[ $failed_runs -eq 0 ]]; then
  rmdir "$logs" 2>/dev/null
  exit 0
fi
for name in "${!failures_by_test[@]}"; do
  echo "   ${failures_by_test[$name]}x $name"
done | sort -rn
echo "   logs of the failed runs: $logs"
exit 1

#!/usr/bin/env bash
# Builds the libFuzzer targets in fuzz/ with clang (in build-fuzz, or $MODELSTATE_FUZZ_BUILD_DIR),
# replays every committed seed (fuzz/corpus/<target>/, at full length), then fuzzes each target
# for SECONDS (default 60), as many at once as there are cores. Prints each target's executions
# and exits non-zero if any target crashed, leaked, timed out or ran out of memory; the input
# that did it is saved as build-fuzz/artifacts/<target>-crash-... (or leak-, timeout-, oom-).
# Usage: tools/fuzz.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v clang++-14 >/dev/null 2>&1; then
  echo "$0: clang++-14 is missing; tools/install-deps.sh installs it" >&2
  exit 1
fi
# Symbolized sanitizer stack traces (Debian's llvm-14 has only the versioned name).
if [ -z "${ASAN_SYMBOLIZER_PATH:-}" ] && command -v llvm-symbolizer-14 >/dev/null 2>&1; then
  export ASAN_SYMBOLIZER_PATH="$(command -v llvm-symbolizer-14)"
fi
seconds="${1:-60}"
shift || true
build_dir="${MODELSTATE_FUZZ_BUILD_DIR:-build-fuzz}"

# Longest input each target generates. Seeds may be longer (the deep-nesting reproducers):
# the replay runs them whole, the fuzzing run truncates them. The factory's bound keeps the
# tensors of one spec (each at most 32 MiB, fuzz/fuzz_options.cc) under 1 GiB in all.
declare -A max_len=(
  [safetensors_fuzz]=8192
  [module_factory_fuzz]=1024
  [module_tree_fuzz]=4096
  [chunk_receiver_fuzz]=8192
  [chunk_frame_fuzz]=4096
  [load_frame_fuzz]=4096
  [convert_fuzz]=4096
)
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(safetensors_fuzz module_factory_fuzz module_tree_fuzz chunk_receiver_fuzz
           chunk_frame_fuzz load_frame_fuzz convert_fuzz)
fi

launcher=()
if command -v ccache >/dev/null 2>&1; then launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache); fi
if [ ! -f "$build_dir/CMakeCache.txt" ]; then
  cmake -S . -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DCMAKE_CXX_COMPILER=clang++-14 "${launcher[@]}" \
    -DMODELSTATE_FUZZ=ON -DMODELSTATE_BUILD_TESTS=OFF -DMODELSTATE_BUILD_BENCH=OFF
fi
start=$SECONDS
cmake --build "$build_dir" -j"$(nproc)" --target "${targets[@]}"
echo "fuzz.sh: build took $((SECONDS - start)) s"

mkdir -p "$build_dir/artifacts" "$build_dir/logs"
# Replays the seeds of $1 one by one at full length; returns non-zero on a crash.
replay() {
  local target="$1" seeds=(fuzz/corpus/"$1"/*)
  "$build_dir/fuzz/$target" -rss_limit_mb=2048 -timeout=60 \
    -artifact_prefix="$build_dir/artifacts/$target-" "${seeds[@]}" \
    >"$build_dir/logs/$target.replay.log" 2>&1
}
# Fuzzes $1 for $seconds from its seeds plus what earlier runs here found; its exit code goes
# to logs/$1.rc.
run() {
  local target="$1" rc=0
  mkdir -p "$build_dir/corpus/$target"
  "$build_dir/fuzz/$target" -max_total_time="$seconds" -max_len="${max_len[$target]}" \
    -rss_limit_mb=2048 -timeout=60 -print_final_stats=1 \
    -artifact_prefix="$build_dir/artifacts/$target-" \
    "$build_dir/corpus/$target" "fuzz/corpus/$target" >"$build_dir/logs/$target.log" 2>&1 \
    || rc=$?
  echo "$rc" >"$build_dir/logs/$target.rc"
}

failed=()
for target in "${targets[@]}"; do
  if ! replay "$target"; then
    failed+=("$target (seed replay)")
    tail -n 60 "$build_dir/logs/$target.replay.log" >&2
  fi
done

for target in "${targets[@]}"; do
  rm -f "$build_dir/logs/$target.rc"
  while [ "$(jobs -rp | wc -l)" -ge "$(nproc)" ]; do wait -n || true; done
  run "$target" &
done
wait
for target in "${targets[@]}"; do
  log="$build_dir/logs/$target.log"
  if [ "$(cat "$build_dir/logs/$target.rc" 2>/dev/null)" = 0 ]; then
    done_line="$(grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -n 1 || true)"
    units="$(grep -E 'stat::number_of_executed_units' "$log" | tail -n 1 || true)"
    echo "fuzz.sh: $target: ${done_line:-no DONE line} | ${units}"
  else
    failed+=("$target")
    echo "fuzz.sh: $target FAILED; last lines of $log:" >&2
    tail -n 80 "$log" >&2
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz.sh: failed: ${failed[*]}" >&2
  exit 1
fi
echo "fuzz.sh: all ${#targets[@]} targets ran ${seconds} s each without a finding"

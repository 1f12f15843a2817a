#!/usr/bin/env bash
# Builds the tests with clang under AddressSanitizer and UndefinedBehaviorSanitizer (in
# build-asan, or $MODELSTATE_ASAN_BUILD_DIR) and runs them with ctest. Exits non-zero when a test
# fails or any process (a test, or a daemon a test started) printed a sanitizer report.
# Usage: tools/sanitize.sh [ctest -R regex]
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
build_dir="${MODELSTATE_ASAN_BUILD_DIR:-build-asan}"
regex="${1:-}"

launcher=()
if command -v ccache >/dev/null 2>&1; then launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache); fi
if [ ! -f "$build_dir/CMakeCache.txt" ]; then
  # -O1: the sanitizers' usual trade between build time and run time. No benchmarks.
  cmake -S . -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=Debug \
    -DCMAKE_CXX_COMPILER=clang++-14 -DCMAKE_CXX_FLAGS_DEBUG="-O1 -g" "${launcher[@]}" \
    -DMODELSTATE_SANITIZE=ON -DMODELSTATE_BUILD_BENCH=OFF -DMODELSTATE_BUILD_PYTHON=OFF
fi
start=$SECONDS
cmake --build "$build_dir" -j"$(nproc)"
echo "sanitize.sh: build took $((SECONDS - start)) s"

# Every process writes its reports to its own file under logs/, so a report from a child
# daemon fails the run too, even when the test that started it did not notice.
logs="$(cd "$build_dir" && pwd)/sanitizer-logs"
rm -rf "$logs"
mkdir -p "$logs"
export ASAN_OPTIONS="detect_leaks=1:strict_string_checks=1:detect_stack_use_after_return=1:check_initialization_order=1:log_path=$logs/asan"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:log_path=$logs/ubsan"
# gRPC's DNS resolver leaks a few bytes inside Debian's (uninstrumented) c-ares at exit, in
# code that is not ours to fix; every other leak fails the run.
printf 'leak:libcares.so\n' >"$build_dir/lsan.supp"
export LSAN_OPTIONS="suppressions=$(cd "$build_dir" && pwd)/lsan.supp:print_suppressions=0"

# deploy_manifests and install_consumer build or check nothing that the sanitizers see; the
# Python extension cannot load into an uninstrumented interpreter (it is not built here); and
# ASan's shadow memory and quarantine make peak-RSS bounds meaningless.
ctest_args=(--test-dir "$build_dir" --output-on-failure -j"$(nproc)" --timeout 900
            -E '^(deploy_manifests|deploy_entrypoint|install_consumer)$|PeakRss')
if [ -n "$regex" ]; then ctest_args+=(-R "$regex"); fi
start=$SECONDS
status=0
ctest "${ctest_args[@]}" || status=$?
echo "sanitize.sh: tests took $((SECONDS - start)) s"

reports=("$logs"/*)
if [ -e "${reports[0]}" ]; then
  echo "sanitize.sh: sanitizer reports:" >&2
  for r in "${reports[@]}"; do
    echo "==== $r" >&2
    cat "$r" >&2
  done
  exit 1
fi
exit "$status"

// Sanitizer settings shared by every fuzz target, compiled into each binary so
// that running one by hand behaves as tools/fuzz.sh does.

// The code under test allocates what a request declares once the declaration
// has passed its checks (a Linear of 30000 x 30000 is a valid, 3.6 GB spec).
// Such requests are the memory limit's business, not bugs, so allocations
// above MODELSTATE_FUZZ_MAX_ALLOCATION_MB (fuzz/CMakeLists.txt) fail here
// (aligned_alloc returns null and the code reports ResourceExhausted) instead
// of exhausting the fuzzer's memory; tools/fuzz.sh bounds the input length so
// that the tensors one input can hold stay well below -rss_limit_mb. A `new`
// that large still aborts: nothing reachable from a small input should ask for
// it. (libFuzzer itself allocates 20 MiB blocks, and protobuf reserves up to
// 50 MB for a string field whose declared length the input has not backed.)
#include <cstddef>

#include "model/tensor.h"

// The same ceiling for tensor storages, which large ones map directly.
static const bool kStorageCeiling = [] {
  modelstate::Storage::SetMaxAllocation(
      size_t{MODELSTATE_FUZZ_MAX_ALLOCATION_MB} << 20);
  return true;
}();

#define MODELSTATE_STR(x) #x
#define MODELSTATE_XSTR(x) MODELSTATE_STR(x)
extern "C" const char* __asan_default_options() {
  return "allocator_may_return_null=1:max_allocation_size_mb=" MODELSTATE_XSTR(
      MODELSTATE_FUZZ_MAX_ALLOCATION_MB) ":detect_leaks=1";
}

extern "C" const char* __ubsan_default_options() {
  return "print_stacktrace=1:halt_on_error=1";
}

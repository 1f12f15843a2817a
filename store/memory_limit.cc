#include "store/memory_limit.h"

#include <unistd.h>

#include <fstream>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"

namespace modelstate {
namespace {

// The number in `path`, or 0 when it is absent or not a number ("max").
int64_t ReadLimit(const std::string& path) {
  std::ifstream file(path);
  std::string text;
  if (!std::getline(file, text)) return 0;
  int64_t value = 0;
  if (!absl::SimpleAtoi(absl::StripAsciiWhitespace(text), &value)) return 0;
  return value > 0 ? value : 0;
}

int64_t PhysicalMemory() {
  const long pages = sysconf(_SC_PHYS_PAGES);
  const long page_size = sysconf(_SC_PAGESIZE);
  return pages > 0 && page_size > 0 ? int64_t{pages} * page_size : 0;
}

}  // namespace

DefaultMemoryLimit DetectMemoryLimit(const std::string& cgroup_root) {
  const int64_t physical = PhysicalMemory();
  DefaultMemoryLimit limit{physical, "physical memory"};
  const int64_t v2 = ReadLimit(cgroup_root + "/memory.max");
  const int64_t v1 = ReadLimit(cgroup_root + "/memory/memory.limit_in_bytes");
  if (v2 > 0 && v2 < physical) {
    limit = {v2, "cgroup v2"};
  } else if (v1 > 0 && v1 < physical) {
    limit = {v1, "cgroup v1"};
  }
  limit.bytes = limit.bytes / 10 * 9;
  return limit;
}

}  // namespace modelstate

// The memory limit a daemon takes when none is given: what its cgroup allows
// (Kubernetes' resources.limits.memory), else the machine's physical memory,
// less a margin for everything that is not tensor bytes.
#ifndef MODELSTATE_STORE_MEMORY_LIMIT_H_
#define MODELSTATE_STORE_MEMORY_LIMIT_H_

#include <cstdint>
#include <string>

namespace modelstate {

struct DefaultMemoryLimit {
  int64_t bytes = 0;   // 90% of the source's figure.
  std::string source;  // "cgroup v2", "cgroup v1" or "physical memory".
};

// Reads memory.max (cgroup v2) or memory/memory.limit_in_bytes (v1) under
// `cgroup_root`; an absent file, "max" or a v1 "unlimited" (a value at or
// above physical memory) falls through to physical memory.
DefaultMemoryLimit DetectMemoryLimit(
    const std::string& cgroup_root = "/sys/fs/cgroup");

}  // namespace modelstate

#endif  // MODELSTATE_STORE_MEMORY_LIMIT_H_

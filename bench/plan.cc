#include "bench/plan.h"

#include "absl/strings/str_cat.h"
#include "bench/common.h"

namespace modelstate::bench {

Plan MakePlan(const Config& config) {
  Plan plan;
  plan.reps = config.reps;
  plan.model_bytes = config.quick ? 64 * kMiB : kGiB;
  plan.many_tensors = config.quick ? 10000 : 100000;
  plan.fan_out =
      config.quick ? std::vector<int>{1, 4} : std::vector<int>{1, 4, 16};
  plan.sizes = config.quick ? std::vector<uint64_t>{16 * kMiB, 64 * kMiB}
                            : std::vector<uint64_t>{64 * kMiB, 256 * kMiB, kGiB,
                                                    4 * kGiB};
  plan.latency_calls = config.quick ? 200 : 2000;
  return plan;
}

std::string SizeId(uint64_t size) {
  return absl::StrCat("P10.", size / kMiB, "MiB");
}

}  // namespace modelstate::bench

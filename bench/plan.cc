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

std::vector<ExpectedFigure> ExpectedFigures(const Plan& plan) {
  std::vector<ExpectedFigure> figures = {{"P1", "GB/s"},   {"P1.a", "GB/s"},
                                         {"P1.b", "GB/s"}, {"P1.c", "GB/s"},
                                         {"P8", "GB/s"},   {"P5.many", "GB/s"}};
  for (int n : plan.fan_out) {
    figures.push_back({absl::StrCat("P6.", n), "GB/s"});
    figures.push_back({absl::StrCat("P6.rss.", n), "ratio"});
  }
  for (const char* id : {"P4", "P4.a"}) figures.push_back({id, "GB/s"});
  figures.push_back({"RSS.load", "ratio"});
  for (const char* id : {"P7.fetch", "P7.fetch99", "P7.empty", "P7.empty99"})
    figures.push_back({id, "us"});
  for (uint64_t size : plan.sizes) figures.push_back({SizeId(size), "GB/s"});
  for (const char* id : {"P9.shm", "P9.tcp"}) figures.push_back({id, "GB/s"});
  for (const char* id :
       {"P1/a", "P1/b", "P1/c", "P4/a", "P5", "P6", "P7", "P8", "P9"})
    figures.push_back({id, "ratio"});
  figures.push_back({"P10", "fraction"});
  return figures;
}

}  // namespace modelstate::bench

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
  std::vector<ExpectedFigure> figures;
  for (const char* id :
       {"P1", "P1.a", "P1r", "P1r.staged", "P1r.a", "P3", "P3.c", "P1.b",
        "P1.c", "P8", "P5.many", "P9.shm", "P9.tcp", "P9.map", "P9.copy"}) {
    figures.push_back({id, "GB/s", ""});
  }
  for (int n : plan.fan_out) {
    figures.push_back({absl::StrCat("P6.", n), "GB/s", ""});
    figures.push_back(
        {absl::StrCat("P6.rss.", n), "ratio", "<= 1.1 + 64 MiB/model"});
  }
  for (const char* id : {"P4", "P4.a"}) figures.push_back({id, "GB/s", ""});
  figures.push_back({"RSS.load", "ratio", ""});
  for (const char* id : {"P7.fetch", "P7.fetch99", "P7.empty", "P7.empty99"})
    figures.push_back({id, "us", ""});
  for (uint64_t size : plan.sizes) {
    figures.push_back({SizeId(size), "GB/s", ""});
    figures.push_back({SizeId(size) + ".a", "GB/s", ""});
    figures.push_back({SizeId(size) + "/a", "ratio", ""});
  }
  const std::vector<ExpectedFigure> judged = {
      {"P1/a", "ratio", ">= 0.9"},   {"P1/spread", "ratio", ">= 0.7"},
      {"P1r/a", "ratio", ">= 0.95"}, {"P1/b", "ratio", ">= 1.2"},
      {"P1/c", "ratio", ">= 1.0"},   {"P3/c", "ratio", ">= 1.0"},
      {"P4/a", "ratio", ">= 0.8"},   {"P5", "ratio", ">= 0.7"},
      {"P6", "ratio", ">= 0.9"},     {"P7", "ratio", "<= 2.0"},
      {"P8", "ratio", ">= 1.3"},     {"P9", "ratio", ">= 0.8"},
      {"P10", "fraction", "<= 0.15"}};
  figures.insert(figures.end(), judged.begin(), judged.end());
  return figures;
}

}  // namespace modelstate::bench

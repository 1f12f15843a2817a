#include "bench/suite.h"

#include <sys/stat.h>

#include <cstdio>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "bench/benchmarks.h"
#include "bench/common.h"
#include "bench/fresh_fetch.h"
#include "bench/pull_to_file.h"
#include "bench/results_check.h"
#include "bench/reused_memory.h"
#include "bench/shared_memory.h"

namespace modelstate::bench {
namespace {

void AddFetchRows(Bench& bench, Results& results) {
  AddReusedMemoryRows(
      MeasureReusedMemory(*bench.client, bench.tcp, "main", bench.plan.reps),
      results);
  AddPullToFileRows(MeasurePullToFile(bench.config, bench.servers.daemon,
                                      "main", bench.servers.nginx,
                                      bench.servers.tmpfs_dir, bench.plan.reps),
                    results);
  FetchSamples fetches = MeasureFetches(bench);
  results.Add("P1.b", "naive gRPC stream of 1 MiB messages", "GB/s",
              std::move(fetches.naive_grpc));
  results.Add("P1.c", "nginx sendfile + libcurl", "GB/s",
              std::move(fetches.nginx));
  results.Add("P8", "modelstate fetch with fp32->bf16 cast, source bytes",
              "GB/s", std::move(fetches.cast_bf16));
  results.Add("P5.many",
              absl::StrCat("modelstate full fetch, ", bench.plan.many_tensors,
                           " tensors"),
              "GB/s", MeasureManyTensors(bench));
}

void AddFanOutRows(Bench& bench, Results& results) {
  std::vector<FanOutSamples> fan_out = MeasureFanOut(bench);
  const double rss_limit =
      1.1 + static_cast<double>(64 * kMiB) / bench.tensor_bytes;
  for (size_t i = 0; i < fan_out.size(); ++i) {
    const int n = bench.plan.fan_out[i];
    results.Add(absl::StrCat("P6.", n),
                absl::StrCat(n, " concurrent fetchers, aggregate"), "GB/s",
                std::move(fan_out[i].aggregate));
    results.Add(
        absl::StrCat("P6.rss.", n),
        absl::StrCat("daemon peak RSS with ", n, " fetchers / model bytes"),
        "ratio", std::move(fan_out[i].peak_rss),
        EverySampleAtMost(rss_limit, "<= 1.1 + 64 MiB/model"));
  }
}

void AddPushAndLatencyRows(Bench& bench, Results& results) {
  PushSamples push = MeasurePush(bench);
  results.Add("P4", "modelstate push (LoadStateDict), 16 tensors", "GB/s",
              std::move(push.modelstate));
  results.Add("P4.a", "raw TCP loopback push", "GB/s", std::move(push.raw_tcp));
  results.Add("RSS.load", "daemon peak RSS during a full load / model bytes",
              "ratio", std::move(push.peak_rss));
  const LatencySamples latency = MeasureLatency(bench);
  results.Add("P7.fetch", "fetch one 4 KiB tensor by key, p50", "us",
              {Percentile(latency.fetch, 0.5)});
  results.Add("P7.fetch99", "fetch one 4 KiB tensor by key, p99", "us",
              {Percentile(latency.fetch, 0.99)});
  results.Add("P7.empty", "empty unary RPC (health Check), p50", "us",
              {Percentile(latency.empty, 0.5)});
  results.Add("P7.empty99", "empty unary RPC (health Check), p99", "us",
              {Percentile(latency.empty, 0.99)});
}

// P10: each size against its own raw-TCP baseline, measured as P1 is, with
// servers of its own (started after the suite's others have stopped, so the
// 4 GiB size has the memory to itself).
void AddModelSizeRows(const Config& config, const Plan& plan,
                      const ModelFiles& files, Results& results) {
  for (uint64_t size : plan.sizes) {
    const std::string id = SizeId(size);
    FreshFetchSamples samples =
        MeasureFreshFetch(config, files.by_size.at(size), plan.reps, id);
    results.Add(id,
                absl::StrCat("modelstate full fetch into fresh memory, ",
                             size / kMiB, " MiB model"),
                "GB/s", std::move(samples.modelstate));
    results.Add(
        id + ".a",
        absl::StrCat("raw TCP into fresh memory, ", size / kMiB, " MiB model"),
        "GB/s", std::move(samples.raw_tcp));
  }
}

void AddRatios(const Plan& plan, Results& results) {
  AddFreshFetchRatios(results);
  results.AddRatio("P1r/a", "P1r / raw TCP into reused memory", "P1r", "P1r.a",
                   AtLeast(0.95));
  results.AddRatio("P1/b", "P1 / naive gRPC", "P1", "P1.b", AtLeast(1.2));
  results.AddRatio("P1/c", "P1 / nginx", "P1", "P1.c", AtLeast(1.0));
  AddPullToFileRatio(results);
  results.AddRatio("P4/a", "P4 / raw TCP push", "P4", "P4.a", AtLeast(0.8));
  results.AddRatio("P5", "many tensors / 16 tensors", "P5.many", "P1",
                   AtLeast(0.7));
  const int most = plan.fan_out.back();
  results.AddRatio("P6", absl::StrCat(most, " fetchers aggregate / 1 fetcher"),
                   absl::StrCat("P6.", most), "P6.1", AtLeast(0.9));
  results.AddRatio("P7", "p50 fetch-by-key / p50 empty RPC", "P7.fetch",
                   "P7.empty", AtMost(2.0));
  // Looks up the throughput "P8", added before this ratio of the same id.
  results.AddRatio("P8", "cast fetch (source bytes/s) / P1", "P8", "P1",
                   AtLeast(1.3));
  std::vector<std::string> ratio_ids;
  for (uint64_t size : plan.sizes) {
    const std::string id = SizeId(size);
    ratio_ids.push_back(id + "/a");
    results.AddRatio(ratio_ids.back(),
                     absl::StrCat(size / kMiB, " MiB model / raw TCP"), id,
                     id + ".a", std::nullopt);
  }
  results.AddLargestDeviation(
      "P10",
      "largest deviation of the per-size ratios to raw TCP from their mean",
      ratio_ids, AtMost(0.15));
}

// Reads back the results file at `path` and reports its problems on stderr;
// returns 0 when there are none, 1 otherwise.
int CheckResultsFile(const std::string& path, const Plan& plan) {
  const std::vector<ExpectedFigure> expected = ExpectedFigures(plan);
  const std::vector<std::string> problems =
      CheckResultsJson(ReadWholeFile(path), expected);
  for (const std::string& problem : problems)
    std::fprintf(stderr, "%s: %s\n", path.c_str(), problem.c_str());
  if (!problems.empty()) return 1;
  std::fprintf(stderr, "%s: all %zu expected figures present and sound\n",
               path.c_str(), expected.size());
  return 0;
}

// Every figure of the suite, then the ratios, in report order.
Results MeasureSuite(const Config& config, const Plan& plan,
                     const ModelFiles& files) {
  Results results;
  // P1 first, with servers of its own, as --only=P1 measures it.
  AddFreshFetchRows(MeasureFreshFetch(config, files.main, plan.reps, "P1"),
                    results);
  {
    Bench bench(config, plan, files);
    AddFetchRows(bench, results);
    AddSharedMemoryRows(MeasureSharedMemory(*bench.client, *bench.local_client,
                                            "main", plan.reps),
                        results);
    AddFanOutRows(bench, results);
    AddPushAndLatencyRows(bench, results);
  }  // disconnects and stops every server
  AddModelSizeRows(config, plan, files, results);
  AddRatios(plan, results);
  return results;
}

}  // namespace

int RunSuite(const Config& config) {
  mkdir(config.work_dir.c_str(), 0755);
  const Plan plan = MakePlan(config);
  const ModelFiles files = PrepareModelFiles(plan, config.work_dir);
  const Results results = MeasureSuite(config, plan, files);
  PrintAndWrite(results, config.out);
  if (config.out.empty()) return 0;
  return config.check ? CheckResultsFile(config.out + ".json", plan) : 0;
}

}  // namespace modelstate::bench

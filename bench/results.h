// The results of a benchmark run: rows of samples, the one place where their
// median, min, max, percentiles, ratios and verdicts are computed, and their
// markdown and JSON forms (docs/performance.md shows both).
#ifndef MODELSTATE_BENCH_RESULTS_H_
#define MODELSTATE_BENCH_RESULTS_H_

#include <optional>
#include <string>
#include <vector>

#include "nlohmann/json.hpp"

namespace modelstate::bench {

struct Summary {
  double median = 0;
  double min = 0;
  double max = 0;
};

// Median (the mean of the middle two for an even count), min and max of
// `samples`; all 0 when there are none.
Summary Summarize(const std::vector<double>& samples);

// The sample at rank floor(`fraction` * count) of the sorted `samples`
// (clamped to the last); 0 when there are none.
double Percentile(std::vector<double> samples, double fraction);

// A target a figure is judged against, e.g. ">= 0.9".
struct Target {
  enum class Bound { kAtLeast, kAtMost };
  enum class Judged { kMedian, kEverySample };
  Bound bound = Bound::kAtLeast;
  double limit = 0;
  std::string text;  // as reported
  Judged judged = Judged::kMedian;
};

// Met when the median is >= `limit` (or <= it); reported as ">= 0.9".
Target AtLeast(double limit);
Target AtMost(double limit);
// Met when no sample exceeds `limit`; reported as `text`.
Target EverySampleAtMost(double limit, std::string text);

struct Row {
  std::string id;      // "P1", "P1.a", "P1/a", ...
  std::string figure;  // what was measured, in words
  std::string unit;    // "GB/s", "us", "ratio" or "fraction"
  std::vector<double> samples;
  std::optional<Target> target;  // none when the figure is only reported
};

// "met" or "missed" against the row's target; "" for a row without one.
std::string Verdict(const Row& row);

// The rows of one run in the order they are reported. Ids are not unique: the
// throughput "P8" and the ratio "P8" are both reported. Not thread-safe.
class Results {
 public:
  void Add(std::string id, std::string figure, std::string unit,
           std::vector<double> samples,
           std::optional<Target> target = std::nullopt);

  // The median of the first row with `id`; NaN when there is none, so that a
  // figure computed from a missing one is reported as missing too.
  double Median(const std::string& id) const;

  // Adds median(`numerator`) / median(`denominator`) as a one-sample "ratio".
  void AddRatio(std::string id, std::string figure,
                const std::string& numerator, const std::string& denominator,
                std::optional<Target> target);

  // Adds min(`of`) / median(`of`), how far the slowest sample fell below the
  // typical one, as a one-sample "ratio".
  void AddMinOverMedian(std::string id, std::string figure,
                        const std::string& of, Target target);

  // Adds the largest |median(row) / mean - 1| over the rows `ids`, where mean
  // is the mean of their medians, as a one-sample "fraction": how far the most
  // distant row strays from the rows' common level.
  void AddLargestDeviation(std::string id, std::string figure,
                           const std::vector<std::string>& ids, Target target);

  const std::vector<Row>& rows() const { return rows_; }

 private:
  std::vector<Row> rows_;
};

// The markdown table of docs/performance.md: id, figure, median, min, max,
// unit, target, verdict.
std::string ToMarkdown(const Results& results);

// An array of objects with keys id, figure, unit, median, min, max, samples
// (their count), target and verdict. A value that is not finite is null.
nlohmann::ordered_json ToJson(const Results& results);

// Prints the markdown table and the JSON of `results` on stdout and, when
// `out` is not empty, writes them to `out`.md and `out`.json.
void PrintAndWrite(const Results& results, const std::string& out);

}  // namespace modelstate::bench

#endif  // MODELSTATE_BENCH_RESULTS_H_

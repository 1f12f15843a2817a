#include "bench/results.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <limits>
#include <utility>

#include "absl/strings/str_format.h"

namespace modelstate::bench {
namespace {

// 0.9 -> "0.9", 1 -> "1.0", 0.15 -> "0.15".
std::string FormatLimit(double limit) {
  std::string text = absl::StrFormat("%g", limit);
  if (text.find_first_of(".e") == std::string::npos) text += ".0";
  return text;
}

}  // namespace

Summary Summarize(const std::vector<double>& samples) {
  if (samples.empty()) return {};
  std::vector<double> v = samples;
  std::sort(v.begin(), v.end());
  const size_t middle = v.size() / 2;
  return {v.size() % 2 ? v[middle] : (v[middle - 1] + v[middle]) / 2, v.front(),
          v.back()};
}

double Percentile(std::vector<double> samples, double fraction) {
  if (samples.empty()) return 0;
  std::sort(samples.begin(), samples.end());
  return samples[std::min(samples.size() - 1,
                          static_cast<size_t>(fraction * samples.size()))];
}

Target AtLeast(double limit) {
  return {Target::Bound::kAtLeast, limit, ">= " + FormatLimit(limit)};
}

Target AtMost(double limit) {
  return {Target::Bound::kAtMost, limit, "<= " + FormatLimit(limit)};
}

Target EverySampleAtMost(double limit, std::string text) {
  return {Target::Bound::kAtMost, limit, std::move(text),
          Target::Judged::kEverySample};
}

std::string Verdict(const Row& row) {
  if (!row.target) return "";
  const Target& target = *row.target;
  const Summary summary = Summarize(row.samples);
  const bool every = target.judged == Target::Judged::kEverySample;
  const bool met = target.bound == Target::Bound::kAtLeast
                       ? (every ? summary.min : summary.median) >= target.limit
                       : (every ? summary.max : summary.median) <= target.limit;
  return met ? "met" : "missed";
}

void Results::Add(std::string id, std::string figure, std::string unit,
                  std::vector<double> samples, std::optional<Target> target) {
  rows_.push_back(Row{std::move(id), std::move(figure), std::move(unit),
                      std::move(samples), std::move(target)});
}

double Results::Median(const std::string& id) const {
  for (const Row& row : rows_) {
    if (row.id == id) return Summarize(row.samples).median;
  }
  return std::numeric_limits<double>::quiet_NaN();
}

void Results::AddRatio(std::string id, std::string figure,
                       const std::string& numerator,
                       const std::string& denominator,
                       std::optional<Target> target) {
  const double ratio = Median(numerator) / Median(denominator);
  Add(std::move(id), std::move(figure), "ratio", {ratio}, std::move(target));
}

void Results::AddMinOverMedian(std::string id, std::string figure,
                               const std::string& of, Target target) {
  double ratio = std::numeric_limits<double>::quiet_NaN();
  for (const Row& row : rows_) {
    if (row.id != of) continue;
    const Summary summary = Summarize(row.samples);
    ratio = summary.min / summary.median;
    break;
  }
  Add(std::move(id), std::move(figure), "ratio", {ratio}, std::move(target));
}

void Results::AddLargestDeviation(std::string id, std::string figure,
                                  const std::vector<std::string>& ids,
                                  Target target) {
  double sum = 0;
  for (const std::string& each : ids) sum += Median(each);
  const double mean = sum / ids.size();
  double worst = ids.empty() ? std::nan("") : 0;
  for (const std::string& each : ids) {
    const double deviation = std::abs(Median(each) / mean - 1);
    if (std::isnan(deviation)) {  // a missing row makes the figure missing
      worst = deviation;
      break;
    }
    worst = std::max(worst, deviation);
  }
  Add(std::move(id), std::move(figure), "fraction", {worst}, std::move(target));
}

std::string ToMarkdown(const Results& results) {
  std::string out =
      "| id | figure | median | min | max | unit | target | verdict |\n"
      "|---|---|---|---|---|---|---|---|\n";
  for (const Row& row : results.rows()) {
    const Summary summary = Summarize(row.samples);
    absl::StrAppendFormat(
        &out, "| %s | %s | %.3f | %.3f | %.3f | %s | %s | %s |\n", row.id,
        row.figure, summary.median, summary.min, summary.max, row.unit,
        row.target ? row.target->text : "", Verdict(row));
  }
  return out;
}

nlohmann::ordered_json ToJson(const Results& results) {
  nlohmann::ordered_json rows = nlohmann::ordered_json::array();
  for (const Row& row : results.rows()) {
    const Summary summary = Summarize(row.samples);
    rows.push_back({{"id", row.id},
                    {"figure", row.figure},
                    {"unit", row.unit},
                    {"median", summary.median},
                    {"min", summary.min},
                    {"max", summary.max},
                    {"samples", row.samples.size()},
                    {"target", row.target ? row.target->text : ""},
                    {"verdict", Verdict(row)}});
  }
  return rows;
}

void PrintAndWrite(const Results& results, const std::string& out) {
  const std::string markdown = ToMarkdown(results);
  const std::string json = ToJson(results).dump(2) + "\n";
  std::printf("%s\n%s", markdown.c_str(), json.c_str());
  if (out.empty()) return;
  std::ofstream(out + ".md") << markdown;
  std::ofstream(out + ".json") << json;
}

}  // namespace modelstate::bench

// Checks a results file written by a benchmark run (ToJson in results.h), so
// that CI notices a harness that stops measuring something. It judges no
// timings: a missed target passes.
#ifndef MODELSTATE_BENCH_RESULTS_CHECK_H_
#define MODELSTATE_BENCH_RESULTS_CHECK_H_

#include <string>
#include <string_view>
#include <vector>

namespace modelstate::bench {

// A figure a run must report: a row with this id and unit and, when `target`
// is set, judged against that target (a verdict of "met" or "missed").
struct ExpectedFigure {
  std::string id;
  std::string unit;
  std::string target;  // as reported, e.g. ">= 0.9"; "" for a reported figure
};

// Returns one line per problem, empty when `json_text` is a sound results
// file: a JSON array of objects, one of them for each of `expected`, where
// every object has string fields id, figure, unit, target and verdict ("",
// "met" or "missed"), at least one sample, and finite numbers median, min and
// max with min <= median <= max, all greater than 0 (a "fraction", a
// deviation, may be 0). An expected figure with a target must carry that
// target and a verdict "met" or "missed".
std::vector<std::string> CheckResultsJson(
    std::string_view json_text, const std::vector<ExpectedFigure>& expected);

}  // namespace modelstate::bench

#endif  // MODELSTATE_BENCH_RESULTS_CHECK_H_

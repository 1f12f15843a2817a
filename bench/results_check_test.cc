#include "bench/results_check.h"

#include <ostream>
#include <string>
#include <vector>

#include "bench/results.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace modelstate::bench {
namespace {

using ::testing::Contains;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;

const std::vector<ExpectedFigure> kExpected = {{"P1", "GB/s", ""},
                                               {"P7.fetch", "us", ""},
                                               {"P1/a", "ratio", ""},
                                               {"P10", "fraction", ""}};

// A row as ToJson writes it.
std::string Row(const std::string& id, const std::string& unit,
                const std::string& median, const std::string& min = "",
                const std::string& max = "", const std::string& samples = "3") {
  return "{\"id\": \"" + id + "\", \"figure\": \"f\", \"unit\": \"" + unit +
         "\", \"median\": " + median +
         ", \"min\": " + (min.empty() ? median : min) +
         ", \"max\": " + (max.empty() ? median : max) +
         ", \"samples\": " + samples + ", \"target\": \"\", \"verdict\": \"\"}";
}

std::string Sound(const std::string& replace_id = "",
                  const std::string& with = "") {
  std::vector<std::string> rows = {
      Row("P1", "GB/s", "1.2", "0.5", "1.6"), Row("P7.fetch", "us", "160.5"),
      Row("P1/a", "ratio", "0.75"), Row("P10", "fraction", "0.4")};
  std::string out = "[";
  for (const std::string& row : rows) {
    if (out.size() > 1) out += ",";
    out += row.find("\"" + replace_id + "\"") != std::string::npos &&
                   !replace_id.empty()
               ? with
               : row;
  }
  return out + "]";
}

TEST(ResultsCheckTest, AcceptsSoundResults) {
  EXPECT_THAT(CheckResultsJson(Sound(), kExpected), IsEmpty());
}

TEST(ResultsCheckTest, AcceptsAZeroDeviation) {
  EXPECT_THAT(
      CheckResultsJson(Sound("P10", Row("P10", "fraction", "0")), kExpected),
      IsEmpty());
}

TEST(ResultsCheckTest, AcceptsWhatToJsonWrites) {
  Results results;
  results.Add("P1", "ours", "GB/s", {1.0, 3.0, 2.0});
  results.Add("P1.a", "theirs", "GB/s", {4.0});
  results.Add("P7.fetch", "latency", "us", {150.0});
  results.AddRatio("P1/a", "ours / theirs", "P1", "P1.a", AtLeast(0.9));
  results.AddLargestDeviation("P10", "d", {"P1", "P1.a"}, AtMost(0.15));
  EXPECT_THAT(CheckResultsJson(ToJson(results).dump(2), kExpected), IsEmpty());
}

// What a harness that lost a figure writes: the ratio built on it is null.
TEST(ResultsCheckTest, RejectsWhatToJsonWritesWithoutAFigure) {
  Results results;
  results.Add("P1", "ours", "GB/s", {1.0, 3.0, 2.0});
  results.Add("P7.fetch", "latency", "us", {150.0});
  results.AddRatio("P1/a", "ours / theirs", "P1", "P1.a", AtLeast(0.9));
  results.AddLargestDeviation("P10", "d", {"P1"}, AtMost(0.15));
  EXPECT_THAT(CheckResultsJson(ToJson(results).dump(2), kExpected),
              ElementsAre(HasSubstr("P1/a (ratio): min is not a number")));
}

// A figure expected with a target must carry it and be judged against it.
TEST(ResultsCheckTest, JudgedFiguresNeedTheirTargetAndAVerdict) {
  Results results;
  results.Add("P1", "ours", "GB/s", {1.0, 3.0, 2.0});
  results.Add("P1.a", "theirs", "GB/s", {4.0});
  results.AddRatio("P1/a", "ours / theirs", "P1", "P1.a", AtLeast(0.9));
  results.AddRatio("P3/c", "unjudged", "P1", "P1.a", std::nullopt);
  results.AddRatio("P1r/a", "other target", "P1", "P1.a", AtLeast(0.8));
  const std::string json = ToJson(results).dump(2);
  EXPECT_THAT(CheckResultsJson(json, {{"P1/a", "ratio", ">= 0.9"}}), IsEmpty());
  EXPECT_THAT(CheckResultsJson(json, {{"P3/c", "ratio", ">= 1.0"}}),
              ElementsAre(HasSubstr("P3/c (ratio): target \"\", expected "
                                    "\">= 1.0\""),
                          HasSubstr("P3/c (ratio): not judged")));
  EXPECT_THAT(CheckResultsJson(json, {{"P1r/a", "ratio", ">= 0.95"}}),
              ElementsAre(HasSubstr("P1r/a (ratio): target \">= 0.8\"")));
}

struct BadCase {
  const char* name;
  std::string json;
  const char* problem;  // a substring of one of the problems reported
};

void PrintTo(const BadCase& bad, std::ostream* out) { *out << bad.name; }

class RejectsTest : public ::testing::TestWithParam<BadCase> {};

TEST_P(RejectsTest, ReportsTheProblem) {
  EXPECT_THAT(CheckResultsJson(GetParam().json, kExpected),
              Contains(HasSubstr(GetParam().problem)));
}

INSTANTIATE_TEST_SUITE_P(
    BadResults, RejectsTest,
    ::testing::Values(
        BadCase{"NotJson", "[{\"id\": ", "not valid JSON"},
        BadCase{"Empty", "", "not valid JSON"},
        BadCase{"NotAnArray", "{\"P1\": 1}", "not a JSON array"},
        BadCase{"RowNotAnObject",
                "[" + Sound().substr(1, Sound().size() - 2) + ", 7]",
                "row 4 is not an object"},
        BadCase{"MissingFigure", Sound("P7.fetch", Row("P7", "us", "1")),
                "P7.fetch (us): missing"},
        BadCase{"WrongUnit", Sound("P1/a", Row("P1/a", "GB/s", "1")),
                "P1/a (ratio): missing"},
        BadCase{"ZeroThroughput", Sound("P1", Row("P1", "GB/s", "0")),
                "P1 (GB/s): min 0 <= 0"},
        BadCase{"ZeroMinimum", Sound("P1", Row("P1", "GB/s", "1", "0", "2")),
                "P1 (GB/s): min 0 <= 0"},
        BadCase{"NegativeRatio", Sound("P1/a", Row("P1/a", "ratio", "-0.5")),
                "P1/a (ratio): min -0.5 <= 0"},
        BadCase{"NegativeFraction",
                Sound("P10", Row("P10", "fraction", "-0.1")),
                "P10 (fraction): min -0.1 < 0"},
        BadCase{"NotANumber", Sound("P1/a", Row("P1/a", "ratio", "null")),
                "P1/a (ratio): min is not a number"},
        BadCase{"NumberAsString", Sound("P1", Row("P1", "GB/s", "\"1.5\"")),
                "P1 (GB/s): min is not a number"},
        BadCase{"MissingKey",
                Sound("P7.fetch",
                      "{\"id\": \"P7.fetch\", \"unit\": \"us\", "
                      "\"figure\": \"f\", \"min\": 1, \"max\": 1, "
                      "\"samples\": 1, \"target\": \"\", "
                      "\"verdict\": \"\"}"),
                "P7.fetch (us): median is not a number"},
        BadCase{"MinAboveMedian", Sound("P1", Row("P1", "GB/s", "1", "2", "3")),
                "P1 (GB/s): not min 2 <= median 1 <= max 3"},
        BadCase{"MedianAboveMax", Sound("P1", Row("P1", "GB/s", "3", "1", "2")),
                "P1 (GB/s): not min 1 <= median 3 <= max 2"},
        BadCase{"NoSamples", Sound("P1", Row("P1", "GB/s", "1", "", "", "0")),
                "P1 (GB/s): no samples"},
        BadCase{"FigureNotAString",
                Sound("P7.fetch",
                      "{\"id\": \"P7.fetch\", \"unit\": \"us\", "
                      "\"figure\": 7, \"median\": 1, \"min\": 1, "
                      "\"max\": 1, \"samples\": 1, \"target\": "
                      "\"\", \"verdict\": \"\"}"),
                "P7.fetch (us): figure is not a string"},
        BadCase{"UnknownVerdict",
                Sound("P7.fetch",
                      "{\"id\": \"P7.fetch\", \"unit\": \"us\", "
                      "\"figure\": \"f\", \"median\": 1, "
                      "\"min\": 1, \"max\": 1, \"samples\": 1, "
                      "\"target\": \"\", \"verdict\": \"ok\"}"),
                "P7.fetch (us): unknown verdict ok"}),
    [](const ::testing::TestParamInfo<BadCase>& info) {
      return std::string(info.param.name);
    });

}  // namespace
}  // namespace modelstate::bench

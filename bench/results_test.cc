#include "bench/results.h"

#include <cmath>
#include <string>

#include "gtest/gtest.h"

namespace modelstate::bench {
namespace {

TEST(SummarizeTest, MedianOfOddAndEvenCountsMinAndMax) {
  const Summary odd = Summarize({3, 1, 2});
  EXPECT_EQ(odd.median, 2);
  EXPECT_EQ(odd.min, 1);
  EXPECT_EQ(odd.max, 3);
  EXPECT_EQ(Summarize({4, 1, 3, 2}).median, 2.5);
}

TEST(SummarizeTest, NoSamplesIsAllZero) {
  const Summary none = Summarize({});
  EXPECT_EQ(none.median, 0);
  EXPECT_EQ(none.min, 0);
  EXPECT_EQ(none.max, 0);
}

TEST(PercentileTest, RankIsFloorOfFractionTimesCount) {
  std::vector<double> samples;
  for (int i = 100; i > 0; --i) samples.push_back(i);  // 1..100, unsorted
  EXPECT_EQ(Percentile(samples, 0.5), 51);
  EXPECT_EQ(Percentile(samples, 0.99), 100);
  EXPECT_EQ(Percentile(samples, 1.0), 100);  // clamped to the last
  EXPECT_EQ(Percentile({}, 0.5), 0);
}

TEST(TargetTest, TextShowsTheBound) {
  EXPECT_EQ(AtLeast(0.9).text, ">= 0.9");
  EXPECT_EQ(AtLeast(1.0).text, ">= 1.0");
  EXPECT_EQ(AtMost(0.15).text, "<= 0.15");
  EXPECT_EQ(AtMost(2).text, "<= 2.0");
}

TEST(VerdictTest, MedianAgainstBoundsAndEverySampleAgainstTheWorst) {
  EXPECT_EQ(Verdict(Row{"a", "", "ratio", {0.9}, AtLeast(0.9)}), "met");
  EXPECT_EQ(Verdict(Row{"a", "", "ratio", {0.89}, AtLeast(0.9)}), "missed");
  EXPECT_EQ(Verdict(Row{"a", "", "ratio", {2.0}, AtMost(2.0)}), "met");
  EXPECT_EQ(Verdict(Row{"a", "", "ratio", {2.1}, AtMost(2.0)}), "missed");
  // The median (1.0) is within the limit but one sample is not.
  EXPECT_EQ(
      Verdict(Row{
          "a", "", "ratio", {1.0, 1.0, 1.2}, EverySampleAtMost(1.1, "<= 1.1")}),
      "missed");
  EXPECT_EQ(
      Verdict(Row{
          "a", "", "ratio", {1.0, 1.1, 1.0}, EverySampleAtMost(1.1, "<= 1.1")}),
      "met");
  EXPECT_EQ(Verdict(Row{"a", "", "GB/s", {1.0}, std::nullopt}), "");
  // A missing figure (NaN) never meets a target.
  EXPECT_EQ(Verdict(Row{"a", "", "ratio", {std::nan("")}, AtMost(2.0)}),
            "missed");
}

Results TwoFigures() {
  Results results;
  results.Add("P1", "ours", "GB/s", {1.0, 3.0, 2.0});
  results.Add("P1.a", "theirs", "GB/s", {4.0, 4.0});
  return results;
}

TEST(ResultsTest, RatioOfMedians) {
  Results results = TwoFigures();
  results.AddRatio("P1/a", "ours / theirs", "P1", "P1.a", AtLeast(0.9));
  const Row& ratio = results.rows().back();
  EXPECT_EQ(ratio.id, "P1/a");
  EXPECT_EQ(ratio.unit, "ratio");
  ASSERT_EQ(ratio.samples.size(), 1u);
  EXPECT_EQ(ratio.samples[0], 0.5);
  EXPECT_EQ(Verdict(ratio), "missed");
}

TEST(ResultsTest, MedianOfTheFirstRowWithTheId) {
  Results results = TwoFigures();
  results.AddRatio("P1", "ours / theirs, same id", "P1", "P1.a", AtLeast(1));
  EXPECT_EQ(results.Median("P1"), 2.0);
  EXPECT_TRUE(std::isnan(results.Median("P2")));
}

TEST(ResultsTest, RatioOfAMissingFigureIsNotANumber) {
  Results results = TwoFigures();
  results.AddRatio("P1/b", "ours / absent", "P1", "P1.b", AtLeast(1));
  EXPECT_TRUE(std::isnan(results.rows().back().samples[0]));
}

TEST(ResultsTest, LargestDeviationFromTheMeanOfTheMedians) {
  Results results;
  results.Add("S1", "", "ratio", {1.5, 0.1, 9.0});  // median 1.5
  results.Add("S2", "", "ratio", {2.0});
  results.Add("S3", "", "ratio", {2.5});
  results.AddLargestDeviation("P10", "deviation", {"S1", "S2", "S3"},
                              AtMost(0.15));
  const Row& row = results.rows().back();
  EXPECT_EQ(row.unit, "fraction");
  EXPECT_DOUBLE_EQ(row.samples[0], 0.25);  // mean 2.0: 1.5 and 2.5 are 25% off
  EXPECT_EQ(Verdict(row), "missed");
  results.AddLargestDeviation("P10", "", {"S2", "S3"}, AtMost(0.15));
  EXPECT_DOUBLE_EQ(results.rows().back().samples[0], 0.25 / 2.25);
  EXPECT_EQ(Verdict(results.rows().back()), "met");
}

TEST(ResultsTest, LargestDeviationOfAMissingOrNoFigureIsNotANumber) {
  Results results;
  results.Add("S1", "", "ratio", {1.5});
  results.AddLargestDeviation("P10", "", {"S1", "S9"}, AtMost(0.15));
  EXPECT_TRUE(std::isnan(results.rows().back().samples[0]));
  results.AddLargestDeviation("P10", "", {}, AtMost(0.15));
  EXPECT_TRUE(std::isnan(results.rows().back().samples[0]));
  EXPECT_EQ(Verdict(results.rows().back()), "missed");
}

TEST(ResultsTest, MinOverMedianOfTheFirstRowWithTheId) {
  Results results = TwoFigures();  // P1: 1, 3, 2
  results.AddMinOverMedian("P1/spread", "min / median", "P1", AtLeast(0.7));
  const Row& row = results.rows().back();
  EXPECT_EQ(row.unit, "ratio");
  ASSERT_EQ(row.samples.size(), 1u);
  EXPECT_EQ(row.samples[0], 0.5);
  EXPECT_EQ(Verdict(row), "missed");
  results.AddMinOverMedian("P1.a/spread", "", "P1.a", AtLeast(0.7));
  EXPECT_EQ(results.rows().back().samples[0], 1.0);
  results.AddMinOverMedian("P2/spread", "", "P2", AtLeast(0.7));
  EXPECT_TRUE(std::isnan(results.rows().back().samples[0]));
}

TEST(ResultsTest, RatioWithoutATargetIsOnlyReported) {
  Results results = TwoFigures();
  results.AddRatio("P1/a", "ours / theirs", "P1", "P1.a", std::nullopt);
  EXPECT_EQ(results.rows().back().samples[0], 0.5);
  EXPECT_EQ(Verdict(results.rows().back()), "");
}

TEST(ResultsTest, MarkdownRowsInOrder) {
  Results results = TwoFigures();
  results.AddRatio("P1/a", "ours / theirs", "P1", "P1.a", AtLeast(0.9));
  EXPECT_EQ(ToMarkdown(results),
            "| id | figure | median | min | max | unit | target | verdict |\n"
            "|---|---|---|---|---|---|---|---|\n"
            "| P1 | ours | 2.000 | 1.000 | 3.000 | GB/s |  |  |\n"
            "| P1.a | theirs | 4.000 | 4.000 | 4.000 | GB/s |  |  |\n"
            "| P1/a | ours / theirs | 0.500 | 0.500 | 0.500 | ratio | >= 0.9 "
            "| missed |\n");
}

TEST(ResultsTest, JsonKeysInOrderAndNotANumberAsNull) {
  Results results = TwoFigures();
  results.AddRatio("P1/b", "ours / absent", "P1", "P1.b", AtLeast(1.2));
  const nlohmann::ordered_json json = ToJson(results);
  ASSERT_EQ(json.size(), 3u);
  EXPECT_EQ(json[0].dump(),
            R"({"id":"P1","figure":"ours","unit":"GB/s","median":2.0,)"
            R"("min":1.0,"max":3.0,"samples":3,"target":"","verdict":""})");
  EXPECT_EQ(json[2].dump(),
            R"({"id":"P1/b","figure":"ours / absent","unit":"ratio",)"
            R"("median":null,"min":null,"max":null,"samples":1,)"
            R"("target":">= 1.2","verdict":"missed"})");
}

}  // namespace
}  // namespace modelstate::bench

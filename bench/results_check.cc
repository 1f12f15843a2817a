#include "bench/results_check.h"

#include <cmath>

#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"

namespace modelstate::bench {
namespace {

using Json = nlohmann::json;

std::string StringField(const Json& row, const char* key) {
  const auto it = row.find(key);
  return it != row.end() && it->is_string() ? it->get<std::string>() : "";
}

// Checks the fields of one row other than its numbers.
void CheckLabels(const Json& row, const std::string& name,
                 std::vector<std::string>& problems) {
  for (const char* key : {"id", "figure", "unit", "target", "verdict"}) {
    const auto it = row.find(key);
    if (it == row.end() || !it->is_string())
      problems.push_back(absl::StrCat(name, ": ", key, " is not a string"));
  }
  const std::string verdict = StringField(row, "verdict");
  if (verdict != "" && verdict != "met" && verdict != "missed")
    problems.push_back(absl::StrCat(name, ": unknown verdict ", verdict));
  const auto samples = row.find("samples");
  if (samples == row.end() || !samples->is_number_integer() ||
      samples->get<int64_t>() < 1) {
    problems.push_back(absl::StrCat(name, ": no samples"));
  }
}

// Checks median, min and max of one row.
void CheckNumbers(const Json& row, const std::string& name,
                  std::vector<std::string>& problems) {
  const bool fraction = StringField(row, "unit") == "fraction";
  double values[3];
  const char* keys[3] = {"min", "median", "max"};
  for (int i = 0; i < 3; ++i) {
    const auto it = row.find(keys[i]);
    if (it == row.end() || !it->is_number() ||
        !std::isfinite(it->get<double>())) {
      problems.push_back(absl::StrCat(name, ": ", keys[i], " is not a number"));
      return;
    }
    values[i] = it->get<double>();
    if (fraction ? values[i] < 0 : values[i] <= 0) {
      problems.push_back(absl::StrCat(name, ": ", keys[i], " ", values[i],
                                      fraction ? " < 0" : " <= 0"));
    }
  }
  if (!(values[0] <= values[1] && values[1] <= values[2])) {
    problems.push_back(absl::StrCat(name, ": not min ", values[0],
                                    " <= median ", values[1], " <= max ",
                                    values[2]));
  }
}

// The row that reports `figure`, or null.
const Json* Find(const Json& rows, const ExpectedFigure& figure) {
  for (const Json& row : rows) {
    if (row.is_object() && StringField(row, "id") == figure.id &&
        StringField(row, "unit") == figure.unit) {
      return &row;
    }
  }
  return nullptr;
}

// Checks that `row` is judged as `figure` says.
void CheckJudged(const Json& row, const ExpectedFigure& figure,
                 std::vector<std::string>& problems) {
  if (figure.target.empty()) return;
  const std::string name = absl::StrCat(figure.id, " (", figure.unit, ")");
  const std::string target = StringField(row, "target");
  if (target != figure.target) {
    problems.push_back(absl::StrCat(name, ": target \"", target,
                                    "\", expected \"", figure.target, "\""));
  }
  const std::string verdict = StringField(row, "verdict");
  if (verdict != "met" && verdict != "missed")
    problems.push_back(absl::StrCat(name, ": not judged"));
}

}  // namespace

std::vector<std::string> CheckResultsJson(
    std::string_view json_text, const std::vector<ExpectedFigure>& expected) {
  const Json rows = Json::parse(json_text, nullptr, /*allow_exceptions=*/false);
  if (rows.is_discarded()) return {"the results are not valid JSON"};
  if (!rows.is_array()) return {"the results are not a JSON array"};
  std::vector<std::string> problems;
  for (size_t i = 0; i < rows.size(); ++i) {
    const Json& row = rows[i];
    if (!row.is_object()) {
      problems.push_back(absl::StrCat("row ", i, " is not an object"));
      continue;
    }
    const std::string name = absl::StrCat(StringField(row, "id"), " (",
                                          StringField(row, "unit"), ")");
    CheckLabels(row, name, problems);
    CheckNumbers(row, name, problems);
  }
  for (const ExpectedFigure& figure : expected) {
    const Json* row = Find(rows, figure);
    if (row == nullptr) {
      problems.push_back(absl::StrCat(figure.id, " (", figure.unit,
                                      "): missing from the results"));
    } else {
      CheckJudged(*row, figure, problems);
    }
  }
  return problems;
}

}  // namespace modelstate::bench

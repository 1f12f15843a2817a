#include "model/names.h"

#include <string>
#include <vector>

#include "absl/strings/str_join.h"
#include "common/limits.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace modelstate {
namespace {

using testing::HasSubstr;

TEST(NamesTest, KeysAllowWhatTorchAllows) {
  for (const char* key : {"encoder.layers.0.weight", "w", "a/b.c", "with space",
                          "\xc3\xbcnic\xc3\xb6"
                          "de.\xe6\x9d\x83\xe9\x87\x8d"}) {
    EXPECT_TRUE(ValidateTensorKey(key).ok()) << key;
  }
}

TEST(NamesTest, EveryBadKeyIsRefusedWithItsReason) {
  const std::pair<std::string, const char*> cases[] = {
      {"", "empty component"},
      {"a..b", "empty component"},
      {".a", "empty component"},
      {"a.", "empty component"},
      {std::string("a\nb"), "control character"},
      {std::string("a\0b", 3), "control character"},
      {"a\x7f", "control character"},
      {"a.\xff", "not valid UTF-8"},
      {"\xc0\xaf", "not valid UTF-8"},  // overlong '/'
      {std::string(kMaxKeyLength + 1, 'k'), "kMaxKeyLength"},
      {absl::StrJoin(std::vector<std::string>(kMaxKeyComponents + 1, "m"), "."),
       "kMaxKeyComponents"},
  };
  for (const auto& [key, reason] : cases) {
    absl::Status status = ValidateTensorKey(key);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << key;
    EXPECT_THAT(status.message(), HasSubstr(reason)) << key;
    EXPECT_LT(status.message().size(), 300u);  // Long keys are cut.
  }
  EXPECT_TRUE(ValidateTensorKey(std::string(kMaxKeyLength, 'k')).ok());
}

TEST(NamesTest, MemberNamesHaveNoDot) {
  EXPECT_TRUE(ValidateMemberName("weight").ok());
  EXPECT_THAT(ValidateMemberName("a.b").message(), HasSubstr("\".\""));
  EXPECT_THAT(ValidateMemberName("").message(), HasSubstr("empty"));
}

}  // namespace
}  // namespace modelstate

// modelstatectl's size columns: human units by default, exact byte counts with
// --bytes, checked against the manifest the client API returns.
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "client/format.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/test_support.h"

namespace modelstate {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;
using testing_support::CommandResult;
using testing_support::ConnectTo;
using testing_support::CtlPath;
using testing_support::ReadSourceFile;
using testing_support::RunCommand;
using testing_support::StartServer;

// The line of `output` that starts with `prefix`, or "" if none does.
std::string LineStartingWith(const std::string& output,
                             const std::string& prefix) {
  std::istringstream lines(output);
  std::string line;
  while (std::getline(lines, line)) {
    if (absl::StartsWith(line, prefix)) return line;
  }
  return "";
}

class ModelstatectlFormatTest : public ::testing::Test {
 protected:
  void SetUp() override {
    server_ = StartServer();
    ASSERT_NE(server_, nullptr);
    auto client = ConnectTo(*server_);
    ASSERT_TRUE(
        client->CreateModel("cnn", ReadSourceFile("tests/models/cnn.json"))
            .ok());
    manifest_ = client->GetModel("cnn").value();
    // Sizes of 1 KiB and more read differently in the two forms.
    ASSERT_GE(manifest_.summary.num_bytes, 1024u);
  }

  CommandResult Ctl(const std::string& args) {
    return RunCommand(CtlPath() + " --server=127.0.0.1:" +
                      std::to_string(server_->port()) + " " + args);
  }

  std::unique_ptr<Server> server_;
  ModelManifest manifest_;
};

TEST_F(ModelstatectlFormatTest, ModelsPrintsHumanSizesByDefault) {
  CommandResult models = Ctl("models");
  ASSERT_EQ(models.exit_code, 0) << models.output;
  EXPECT_THAT(LineStartingWith(models.output, "NAME "), HasSubstr("SIZE"));
  const std::string row = LineStartingWith(models.output, "cnn ");
  EXPECT_THAT(row, HasSubstr(" " + HumanBytes(manifest_.summary.num_bytes)));
  EXPECT_THAT(row, HasSubstr("KiB"));
  EXPECT_THAT(row, Not(HasSubstr(std::to_string(manifest_.summary.num_bytes))));
}

TEST_F(ModelstatectlFormatTest, ModelsPrintsExactBytesWithFlag) {
  CommandResult models = Ctl("models --bytes");
  ASSERT_EQ(models.exit_code, 0) << models.output;
  EXPECT_THAT(LineStartingWith(models.output, "NAME "), HasSubstr("BYTES"));
  const std::string row = LineStartingWith(models.output, "cnn ");
  EXPECT_TRUE(
      absl::EndsWith(row, " " + std::to_string(manifest_.summary.num_bytes)))
      << row;
  EXPECT_THAT(models.output, Not(HasSubstr("iB")));
}

TEST_F(ModelstatectlFormatTest, InfoPrintsHumanSizesByDefault) {
  CommandResult info = Ctl("info cnn");
  ASSERT_EQ(info.exit_code, 0) << info.output;
  EXPECT_THAT(
      info.output,
      HasSubstr("tensors, " + HumanBytes(manifest_.summary.num_bytes) + "\n"));
  bool saw_small = false, saw_large = false;
  for (const TensorDescription& tensor : manifest_.tensors) {
    const std::string row = LineStartingWith(info.output, tensor.name + " ");
    EXPECT_THAT(row, HasSubstr(" " + HumanBytes(tensor.num_bytes) + " "))
        << tensor.name;
    saw_small |= tensor.num_bytes < 1024;
    saw_large |= tensor.num_bytes >= 1024;
  }
  // Both forms appear: "864 B" and "4.5 KiB".
  EXPECT_TRUE(saw_small && saw_large);
}

TEST_F(ModelstatectlFormatTest, InfoPrintsExactBytesWithFlag) {
  CommandResult info = Ctl("info cnn --bytes");
  ASSERT_EQ(info.exit_code, 0) << info.output;
  EXPECT_THAT(
      info.output,
      HasSubstr("tensors, " + std::to_string(manifest_.summary.num_bytes) +
                " bytes\n"));
  EXPECT_THAT(LineStartingWith(info.output, "KEY "), HasSubstr("BYTES"));
  for (const TensorDescription& tensor : manifest_.tensors) {
    const std::string row = LineStartingWith(info.output, tensor.name + " ");
    EXPECT_THAT(row, HasSubstr(" " + std::to_string(tensor.num_bytes) + " "))
        << tensor.name;
  }
  EXPECT_THAT(info.output, Not(HasSubstr("iB")));
  EXPECT_THAT(info.output, Not(HasSubstr(" B ")));
}

}  // namespace
}  // namespace modelstate

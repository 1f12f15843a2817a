#include "tests/subprocess.h"

#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <system_error>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace modelstate {
namespace {

using ::testing::HasSubstr;
using Stream = Subprocess::Stream;

std::unique_ptr<Subprocess> Shell(const std::string& script,
                                  SubprocessOptions options = {}) {
  return Subprocess::Spawn({"/bin/sh", "-c", script}, options).value();
}

SubprocessOptions Piped() {
  SubprocessOptions options;
  options.stdout_to = OutputTarget::Pipe();
  options.stderr_to = OutputTarget::Pipe();
  return options;
}

// True once `pid` has exited: no such process, or a zombie nobody reaped yet.
bool Exited(pid_t pid) {
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  std::string text;
  if (!std::getline(stat, text)) return true;
  const size_t at = text.rfind(") ");
  return at != std::string::npos && text[at + 2] == 'Z';
}

// Polls Exited for up to 30 s.
bool ExitsSoon(pid_t pid) {
  const absl::Time deadline = absl::Now() + absl::Seconds(30);
  while (!Exited(pid)) {
    if (absl::Now() > deadline) return false;
    absl::SleepFor(absl::Milliseconds(10));
  }
  return true;
}

TEST(SubprocessTest, CapturesStdoutAndStderrInPipes) {
  auto child = Shell("echo out; echo err >&2; exit 3", Piped());
  const int status = child->Wait(absl::Seconds(60)).value();
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 3);
  EXPECT_EQ(child->Wait(absl::ZeroDuration()).value(), status);  // again
  ASSERT_TRUE(child->WaitForEndOfOutput(absl::Seconds(60)).ok());
  EXPECT_EQ(child->Output(Stream::kStdout), "out\n");
  EXPECT_EQ(child->Output(Stream::kStderr), "err\n");
}

TEST(SubprocessTest, StderrCanJoinStdout) {
  SubprocessOptions options;
  options.stdout_to = OutputTarget::Pipe();
  options.stderr_to = OutputTarget::SameAsStdout();
  auto child = Shell("echo a; echo b >&2; echo c", options);
  ASSERT_TRUE(child->Wait(absl::Seconds(60)).ok());
  ASSERT_TRUE(child->WaitForEndOfOutput(absl::Seconds(60)).ok());
  EXPECT_EQ(child->Output(Stream::kStdout), "a\nb\nc\n");
  EXPECT_EQ(child->Output(Stream::kStderr), "");
}

TEST(SubprocessTest, OutputToAFileOrNowhere) {
  char dir[] = "/tmp/subprocess-test-XXXXXX";
  ASSERT_NE(mkdtemp(dir), nullptr);
  const std::string path = std::string(dir) + "/out.txt";
  std::ofstream(path) << "stale text that must be truncated away\n";
  SubprocessOptions options;
  options.stdout_to = OutputTarget::File(path);
  options.stderr_to = OutputTarget::Discard();
  auto child = Shell("echo to-file; echo to-nowhere >&2", options);
  ASSERT_TRUE(child->Wait(absl::Seconds(60)).ok());
  EXPECT_EQ(child->Output(Stream::kStdout), "to-file\n");
  EXPECT_EQ(child->Output(Stream::kStderr), "");
  EXPECT_EQ(child->WaitForLine(Stream::kStdout, "to-file", absl::Seconds(1))
                .status()
                .code(),
            absl::StatusCode::kFailedPrecondition);  // only pipes are watched
  std::error_code ignored;
  std::filesystem::remove_all(dir, ignored);
}

TEST(SubprocessTest, BadSpawnsAreReported) {
  EXPECT_EQ(Subprocess::Spawn({}).status().code(),
            absl::StatusCode::kInvalidArgument);
  absl::Status missing = Subprocess::Spawn({"/nonexistent/program"}).status();
  EXPECT_EQ(missing.code(), absl::StatusCode::kNotFound) << missing;
  EXPECT_THAT(std::string(missing.message()),
              HasSubstr("/nonexistent/program"));
  SubprocessOptions bad_file;
  bad_file.stdout_to = OutputTarget::File("/nonexistent/dir/out.txt");
  EXPECT_EQ(Subprocess::Spawn({"/bin/true"}, bad_file).status().code(),
            absl::StatusCode::kNotFound);
  SubprocessOptions loop;
  loop.stdout_to = OutputTarget::SameAsStdout();
  EXPECT_EQ(Subprocess::Spawn({"/bin/true"}, loop).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(SubprocessTest, WaitsAreBoundedAndSignalsArrive) {
  auto child = Shell("exec sleep 300");
  const absl::Time start = absl::Now();
  EXPECT_EQ(child->Wait(absl::Milliseconds(100)).status().code(),
            absl::StatusCode::kDeadlineExceeded);
  EXPECT_LT(absl::Now() - start, absl::Seconds(30));
  ASSERT_TRUE(child->Signal(SIGTERM).ok());
  const int status = child->Wait(absl::Seconds(60)).value();
  ASSERT_TRUE(WIFSIGNALED(status));
  EXPECT_EQ(WTERMSIG(status), SIGTERM);
  EXPECT_EQ(child->Signal(SIGTERM).code(),
            absl::StatusCode::kFailedPrecondition);  // reaped: pid not ours
}

TEST(SubprocessTest, WaitForLineNeedsACompleteLine) {
  auto child = Shell(
      "echo first; echo 'port 123'; printf 'ready'; exec sleep 300", Piped());
  EXPECT_EQ(
      child->WaitForLine(Stream::kStdout, "port ", absl::Seconds(60)).value(),
      "port 123");
  // "ready" has no newline yet: not a line.
  EXPECT_EQ(
      child->WaitForLine(Stream::kStdout, "ready", absl::Milliseconds(200))
          .status()
          .code(),
      absl::StatusCode::kDeadlineExceeded);
  const int status = child->Kill();
  EXPECT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL);
  // Once the stream closes, a wait for a line that never came ends at once.
  const absl::Time start = absl::Now();
  EXPECT_EQ(child->WaitForLine(Stream::kStdout, "never", absl::Seconds(60))
                .status()
                .code(),
            absl::StatusCode::kUnavailable);
  EXPECT_LT(absl::Now() - start, absl::Seconds(30));
}

TEST(SubprocessTest, AChildThatWritesMuchNeverBlocksOnTheUnreadPipe) {
  // Sixteen times a pipe's default capacity, nobody reading until the exit.
  auto child = Shell("head -c 1048576 /dev/zero", Piped());
  const int status = child->Wait(absl::Seconds(60)).value();
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  ASSERT_TRUE(child->WaitForEndOfOutput(absl::Seconds(60)).ok());
  EXPECT_EQ(child->Output(Stream::kStdout).size(), 1048576u);
}

TEST(SubprocessTest, DestructionKillsTheWholeProcessGroup) {
  auto child = Shell("sleep 300 & echo \"grandchild $!\"; wait", Piped());
  const std::string line =
      child->WaitForLine(Stream::kStdout, "grandchild ", absl::Seconds(60))
          .value();
  pid_t grandchild = 0;
  ASSERT_TRUE(absl::SimpleAtoi(line.substr(line.find(' ') + 1), &grandchild));
  const pid_t shell = child->pid();
  ASSERT_FALSE(Exited(grandchild));
  child.reset();
  EXPECT_TRUE(Exited(shell));  // reaped by the destructor
  EXPECT_TRUE(ExitsSoon(grandchild));
}

TEST(SubprocessTest, TheChildDiesWithTheThreadThatSpawnedIt) {
  for (bool kill_when_parent_dies : {true, false}) {
    SCOPED_TRACE(kill_when_parent_dies);
    SubprocessOptions options;
    options.kill_when_parent_dies = kill_when_parent_dies;
    std::unique_ptr<Subprocess> child;
    std::thread([&] { child = Shell("exec sleep 300", options); }).join();
    if (kill_when_parent_dies) {
      const int status = child->Wait(absl::Seconds(60)).value();
      EXPECT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL);
    } else {
      EXPECT_EQ(child->Wait(absl::Milliseconds(200)).status().code(),
                absl::StatusCode::kDeadlineExceeded);
    }
  }
}

}  // namespace
}  // namespace modelstate

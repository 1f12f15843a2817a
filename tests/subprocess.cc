#include "tests/subprocess.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"

namespace modelstate {
namespace {

constexpr int kStreams = 2;  // stdout, stderr

// The fds the child gets for one of its streams, opened before the fork so
// that errors are reported here and the child only calls async-signal-safe
// functions. Every fd is close-on-exec, so no other child inherits it.
struct Plumbing {
  int child_fd = -1;   // Becomes the child's stdout/stderr; -1 leaves it.
  int parent_fd = -1;  // Read end of a pipe.
  bool same_as_stdout = false;

  void Close() {
    if (child_fd >= 0) close(child_fd);
    if (parent_fd >= 0) close(parent_fd);
    child_fd = parent_fd = -1;
  }
};

absl::Status Plumb(const OutputTarget& target, bool is_stderr,
                   Plumbing* plumbing) {
  switch (target.kind) {
    case OutputTarget::Kind::kInherit:
      return absl::OkStatus();
    case OutputTarget::Kind::kDiscard:
    case OutputTarget::Kind::kFile: {
      const bool discard = target.kind == OutputTarget::Kind::kDiscard;
      const std::string path = discard ? "/dev/null" : target.path;
      plumbing->child_fd =
          open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
      if (plumbing->child_fd < 0) return absl::ErrnoToStatus(errno, path);
      return absl::OkStatus();
    }
    case OutputTarget::Kind::kPipe: {
      int fds[2];
      if (pipe2(fds, O_CLOEXEC) != 0) return absl::ErrnoToStatus(errno, "pipe");
      plumbing->parent_fd = fds[0];
      plumbing->child_fd = fds[1];
      return absl::OkStatus();
    }
    case OutputTarget::Kind::kSameAsStdout:
      if (!is_stderr) {
        return absl::InvalidArgumentError("stdout cannot be SameAsStdout");
      }
      plumbing->same_as_stdout = true;
      return absl::OkStatus();
  }
  return absl::InvalidArgumentError("unknown output kind");
}

// Runs in the child between fork and exec: async-signal-safe calls only.
[[noreturn]] void ExecChild(char* const* argv, const Plumbing* plumbing,
                            bool kill_when_parent_dies, pid_t parent,
                            int error_fd) {
  setpgid(0, 0);
  if (kill_when_parent_dies) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent) _exit(127);  // It died before the prctl.
  }
  // Signal dispositions set to "ignore" and the signal mask survive exec;
  // the child starts with the defaults whatever this process did.
  sigset_t none;
  sigemptyset(&none);
  sigprocmask(SIG_SETMASK, &none, nullptr);
  struct sigaction default_action = {};
  default_action.sa_handler = SIG_DFL;
  sigaction(SIGPIPE, &default_action, nullptr);
  for (int stream = 0; stream < kStreams; ++stream) {
    const int target = stream + 1;  // STDOUT_FILENO, STDERR_FILENO
    if (plumbing[stream].child_fd >= 0) {
      dup2(plumbing[stream].child_fd, target);
    } else if (plumbing[stream].same_as_stdout) {
      dup2(STDOUT_FILENO, target);
    }
  }
  execv(argv[0], argv);
  const int error = errno;
  ssize_t ignored = write(error_fd, &error, sizeof error);
  (void)ignored;
  _exit(127);
}

// Returns the line of `text` that contains `needle` and is complete (ends in a
// newline), if there is one.
bool FindCompleteLine(absl::string_view text, absl::string_view needle,
                      std::string* line) {
  for (size_t at = text.find(needle); at != absl::string_view::npos;
       at = text.find(needle, at + 1)) {
    const size_t end = text.find('\n', at + needle.size());
    if (end == absl::string_view::npos) return false;  // None later is whole.
    const size_t begin = text.rfind('\n', at);
    const size_t start = begin == absl::string_view::npos ? 0 : begin + 1;
    *line = std::string(text.substr(start, end - start));
    return true;
  }
  return false;
}

// A descriptor that turns readable when `pid` exits, so a wait ends then
// rather than at its next poll (benchmarks time children through Wait); -1
// where the kernel (before 5.3) or the headers have none.
int OpenPidfd(pid_t pid) {
#ifdef SYS_pidfd_open
  return static_cast<int>(syscall(SYS_pidfd_open, pid, 0));
#else
  (void)pid;
  return -1;
#endif
}

}  // namespace

absl::StatusOr<std::unique_ptr<Subprocess>> Subprocess::Spawn(
    std::vector<std::string> argv, SubprocessOptions options) {
  if (argv.empty()) return absl::InvalidArgumentError("empty argv");
  std::vector<char*> c_argv;
  for (std::string& arg : argv) c_argv.push_back(arg.data());
  c_argv.push_back(nullptr);

  Plumbing plumbing[kStreams];
  auto close_all = [&] {
    for (Plumbing& p : plumbing) p.Close();
  };
  const OutputTarget* targets[kStreams] = {&options.stdout_to,
                                           &options.stderr_to};
  for (int stream = 0; stream < kStreams; ++stream) {
    absl::Status status =
        Plumb(*targets[stream], stream == 1, &plumbing[stream]);
    if (!status.ok()) {
      close_all();
      return status;
    }
  }
  // Carries errno from a failed execv; closed by a successful one.
  int error_pipe[2];
  if (pipe2(error_pipe, O_CLOEXEC) != 0) {
    close_all();
    return absl::ErrnoToStatus(errno, "pipe");
  }
  const pid_t parent = getpid();
  const pid_t pid = fork();
  if (pid == 0) {
    ExecChild(c_argv.data(), plumbing, options.kill_when_parent_dies, parent,
              error_pipe[1]);
  }
  const int fork_errno = errno;
  close(error_pipe[1]);
  if (pid < 0) {
    close(error_pipe[0]);
    close_all();
    return absl::ErrnoToStatus(fork_errno, "fork");
  }
  // Also here, so the group exists before Spawn returns whichever process
  // runs first (EACCES once the child has exec'd: it did it itself).
  setpgid(pid, pid);
  int exec_errno = 0;
  ssize_t got;
  do {
    got = read(error_pipe[0], &exec_errno, sizeof exec_errno);
  } while (got < 0 && errno == EINTR);
  close(error_pipe[0]);
  std::vector<Capture> captures(kStreams);
  for (int stream = 0; stream < kStreams; ++stream) {
    if (plumbing[stream].child_fd >= 0) close(plumbing[stream].child_fd);
    captures[stream].fd = plumbing[stream].parent_fd;
    if (targets[stream]->kind == OutputTarget::Kind::kFile) {
      captures[stream].path = targets[stream]->path;
    }
  }
  if (got > 0) {
    for (Capture& capture : captures)
      if (capture.fd >= 0) close(capture.fd);
    waitpid(pid, nullptr, 0);
    return absl::ErrnoToStatus(exec_errno, absl::StrCat("execv ", argv[0]));
  }
  return std::unique_ptr<Subprocess>(new Subprocess(pid, std::move(captures)));
}

Subprocess::Subprocess(pid_t pid, std::vector<Capture> captures)
    : pid_(pid), captures_(std::move(captures)) {
  bool any_pipe = false;
  for (const Capture& capture : captures_) any_pipe |= capture.fd >= 0;
  if (any_pipe) drainer_ = std::thread([this] { Drain(); });
}

Subprocess::~Subprocess() {
  Kill();
  if (drainer_.joinable()) {
    {
      absl::MutexLock lock(&mu_);
      stop_draining_ = true;
    }
    drainer_.join();
  }
  absl::MutexLock lock(&mu_);
  for (Capture& capture : captures_)
    if (capture.fd >= 0) close(capture.fd);
}

// Reads the pipes as the child writes, so the child never blocks on a full
// pipe however little the caller reads. Stops at end of file on every pipe,
// or, once asked to stop, as soon as nothing more arrives: a grandchild that
// left the group may hold a pipe open forever.
void Subprocess::Drain() {
  char buffer[1 << 16];
  while (true) {
    std::vector<pollfd> fds;
    std::vector<int> streams;
    {
      absl::MutexLock lock(&mu_);
      for (int stream = 0; stream < kStreams; ++stream) {
        if (captures_[stream].fd >= 0 && !captures_[stream].closed) {
          fds.push_back({captures_[stream].fd, POLLIN, 0});
          streams.push_back(stream);
        }
      }
    }
    if (fds.empty()) return;
    const int ready = poll(fds.data(), fds.size(), 50);
    if (ready < 0 && errno != EINTR) return;
    if (ready <= 0) {
      absl::MutexLock lock(&mu_);
      if (stop_draining_) return;
      continue;
    }
    for (size_t i = 0; i < fds.size(); ++i) {
      if (fds[i].revents == 0) continue;
      const ssize_t got = read(fds[i].fd, buffer, sizeof buffer);
      if (got < 0 && (errno == EINTR || errno == EAGAIN)) continue;
      absl::MutexLock lock(&mu_);
      Capture& capture = captures_[streams[i]];
      if (got > 0) {
        capture.text.append(buffer, got);
      } else {
        capture.closed = true;
      }
    }
  }
}

absl::Status Subprocess::Signal(int signal) {
  absl::MutexLock lock(&reap_mu_);
  // Once reaped, the pid may belong to another process.
  if (reaped_) return absl::FailedPreconditionError("the child was reaped");
  if (kill(pid_, signal) != 0) return absl::ErrnoToStatus(errno, "kill");
  return absl::OkStatus();
}

absl::Status Subprocess::SignalGroup(int signal) {
  // The group outlives its leader while any member lives, so this is allowed
  // after the reap too.
  if (kill(-pid_, signal) != 0) return absl::ErrnoToStatus(errno, "killpg");
  return absl::OkStatus();
}

absl::StatusOr<int> Subprocess::TryReap() {
  if (reaped_) return wait_status_;
  int status = 0;
  pid_t got;
  do {
    got = waitpid(pid_, &status, WNOHANG);
  } while (got < 0 && errno == EINTR);
  if (got == pid_ || (got < 0 && errno == ECHILD)) {
    reaped_ = true;
    wait_status_ = got == pid_ ? status : -1;
    return wait_status_;
  }
  return absl::DeadlineExceededError("still running");
}

absl::StatusOr<int> Subprocess::Wait(absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  int pidfd = -1;  // Opened once the child is known not to be reaped.
  absl::Duration pause = absl::Milliseconds(1);
  absl::StatusOr<int> result = absl::UnknownError("unreachable");
  while (true) {
    {
      // Not held while sleeping, so Signal works during a Wait.
      absl::MutexLock lock(&reap_mu_);
      result = TryReap();
      if (result.ok()) break;
    }
    if (pidfd < 0) pidfd = OpenPidfd(pid_);
    const absl::Duration left = deadline - absl::Now();
    if (left <= absl::ZeroDuration()) {
      result = absl::DeadlineExceededError(
          absl::StrCat("pid ", pid_, " still running after ",
                       absl::FormatDuration(timeout)));
      break;
    }
    // Looks again at least every 50 ms, whatever wakes the wait.
    const absl::Duration step =
        std::min(pidfd >= 0 ? absl::Milliseconds(50) : pause, left);
    if (pidfd >= 0) {
      pollfd exited{pidfd, POLLIN, 0};
      (void)poll(&exited, 1,
                 static_cast<int>(
                     absl::ToInt64Milliseconds(step + absl::Milliseconds(1))));
    } else {
      absl::SleepFor(step);
      pause = std::min(pause * 2, absl::Milliseconds(50));
    }
  }
  if (pidfd >= 0) close(pidfd);
  return result;
}

int Subprocess::Kill() {
  (void)SignalGroup(SIGKILL);
  absl::MutexLock lock(&reap_mu_);
  if (!reaped_) {
    kill(pid_, SIGKILL);  // In case it moved to another group.
    int status = 0;
    pid_t got;
    do {
      got = waitpid(pid_, &status, 0);
    } while (got < 0 && errno == EINTR);
    reaped_ = true;
    wait_status_ = got == pid_ ? status : -1;
  }
  return wait_status_;
}

std::string Subprocess::Output(Stream stream) const {
  absl::MutexLock lock(&mu_);
  const Capture& capture = captures_[static_cast<int>(stream)];
  if (!capture.path.empty()) {
    std::string text;
    const int fd = open(capture.path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return text;
    char buffer[1 << 16];
    ssize_t got;
    while ((got = read(fd, buffer, sizeof buffer)) > 0)
      text.append(buffer, got);
    close(fd);
    return text;
  }
  return capture.text;
}

absl::Status Subprocess::WaitForEndOfOutput(absl::Duration timeout) const {
  absl::MutexLock lock(&mu_);
  auto all_closed = [&] {
    mu_.AssertReaderHeld();
    for (const Capture& capture : captures_)
      if (capture.fd >= 0 && !capture.closed) return false;
    return true;
  };
  if (!mu_.AwaitWithTimeout(absl::Condition(&all_closed), timeout)) {
    return absl::DeadlineExceededError(absl::StrCat(
        "output still open after ", absl::FormatDuration(timeout)));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> Subprocess::WaitForLine(
    Stream stream, absl::string_view needle, absl::Duration timeout) const {
  absl::MutexLock lock(&mu_);
  const Capture& capture = captures_[static_cast<int>(stream)];
  if (capture.fd < 0) {
    return absl::FailedPreconditionError("the stream does not go to a pipe");
  }
  std::string line;
  auto found_or_closed = [&] {
    mu_.AssertReaderHeld();
    return FindCompleteLine(capture.text, needle, &line) || capture.closed;
  };
  if (!mu_.AwaitWithTimeout(absl::Condition(&found_or_closed), timeout)) {
    return absl::DeadlineExceededError(absl::StrCat(
        "no line with \"", needle, "\" after ", absl::FormatDuration(timeout)));
  }
  if (FindCompleteLine(capture.text, needle, &line)) return line;
  return absl::UnavailableError(
      absl::StrCat("the stream closed without a line with \"", needle, "\""));
}

}  // namespace modelstate

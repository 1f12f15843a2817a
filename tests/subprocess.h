// Subprocess: a child process for tests and benchmarks, started from an argv
// (no shell unless asked for), in a process group of its own, with its stdout
// and stderr captured, every wait bounded, and the whole group killed when the
// object goes away.
//
// Thread-safety: every method may be called from several threads at once.
#ifndef MODELSTATE_TESTS_SUBPROCESS_H_
#define MODELSTATE_TESTS_SUBPROCESS_H_

#include <sys/types.h>

#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace modelstate {

// Where one of the child's output streams goes.
struct OutputTarget {
  enum class Kind {
    kInherit,      // This process's own stream.
    kDiscard,      // /dev/null.
    kFile,         // `path`, created or truncated.
    kPipe,         // Kept in memory: see Subprocess::Output.
    kSameAsStdout  // stderr only: wherever stdout goes (as 2>&1).
  };
  static OutputTarget Inherit() { return {Kind::kInherit, ""}; }
  static OutputTarget Discard() { return {Kind::kDiscard, ""}; }
  static OutputTarget File(std::string path) {
    return {Kind::kFile, std::move(path)};
  }
  static OutputTarget Pipe() { return {Kind::kPipe, ""}; }
  static OutputTarget SameAsStdout() { return {Kind::kSameAsStdout, ""}; }

  Kind kind = Kind::kInherit;
  std::string path;
};

struct SubprocessOptions {
  OutputTarget stdout_to = OutputTarget::Inherit();
  OutputTarget stderr_to = OutputTarget::Inherit();
  // SIGKILL the child if the thread that spawned it dies (PR_SET_PDEATHSIG),
  // so a test killed by its timeout leaves no daemon behind. Spawn from a
  // thread that outlives the child (e.g. the test's main thread), since it is
  // the thread's death that counts, not the process's.
  bool kill_when_parent_dies = true;
};

class Subprocess {
 public:
  enum class Stream { kStdout, kStderr };

  // Starts argv[0] (a path: PATH is not searched) with `argv` as its arguments,
  // in a new process group. Returns InvalidArgument for an empty argv, the
  // errno's status if an output file cannot be opened or argv[0] cannot be
  // executed (e.g. NotFound), Internal if fork or pipe fails.
  static absl::StatusOr<std::unique_ptr<Subprocess>> Spawn(
      std::vector<std::string> argv, SubprocessOptions options = {});

  // Kills the child's process group (SIGKILL) and reaps the child unless it
  // was reaped already; grandchildren in the group die too.
  ~Subprocess();

  Subprocess(const Subprocess&) = delete;
  Subprocess& operator=(const Subprocess&) = delete;

  pid_t pid() const { return pid_; }

  // Sends `signal` to the child only (not its group). FailedPrecondition once
  // the child has been reaped; the errno's status if kill fails.
  absl::Status Signal(int signal);

  // Sends `signal` to every process in the child's group.
  absl::Status SignalGroup(int signal);

  // Waits up to `timeout` for the child to exit and returns its wait status
  // (as from waitpid: use WIFEXITED etc.); the same status again on later
  // calls. DeadlineExceeded if it is still running at the deadline.
  absl::StatusOr<int> Wait(absl::Duration timeout);

  // SIGKILLs the process group and reaps the child; returns the wait status.
  int Kill();

  // Everything the child wrote so far to `stream`, if it goes to a pipe or a
  // file; empty otherwise. With kSameAsStdout, stderr's text is in kStdout.
  std::string Output(Stream stream) const;

  // Waits up to `timeout` until every pipe has reached end of file, i.e. until
  // Output holds everything once the child and any process it started that
  // kept the stream have exited. DeadlineExceeded at the deadline.
  absl::Status WaitForEndOfOutput(absl::Duration timeout) const;

  // Waits up to `timeout` until a complete line of `stream` (a pipe) contains
  // `needle`, and returns that line without its newline. DeadlineExceeded at
  // the deadline; Unavailable if the stream closed (usually: the child exited)
  // without such a line; FailedPrecondition if `stream` is not a pipe.
  absl::StatusOr<std::string> WaitForLine(Stream stream,
                                          absl::string_view needle,
                                          absl::Duration timeout) const;

 private:
  struct Capture {
    int fd = -1;          // Read end of the pipe, or -1.
    std::string path;     // The file, for kFile.
    std::string text;     // What came through the pipe so far.
    bool closed = false;  // The pipe reached end of file.
  };

  Subprocess(pid_t pid, std::vector<Capture> captures);
  void Drain();
  absl::StatusOr<int> TryReap() ABSL_EXCLUSIVE_LOCKS_REQUIRED(reap_mu_);

  const pid_t pid_;
  mutable absl::Mutex mu_;
  // Indexed by Stream.
  std::vector<Capture> captures_ ABSL_GUARDED_BY(mu_);
  bool stop_draining_ ABSL_GUARDED_BY(mu_) = false;
  absl::Mutex reap_mu_ ABSL_ACQUIRED_BEFORE(mu_);
  bool reaped_ ABSL_GUARDED_BY(reap_mu_) = false;
  int wait_status_ ABSL_GUARDED_BY(reap_mu_) = 0;
  std::thread drainer_;
};

}  // namespace modelstate

#endif  // MODELSTATE_TESTS_SUBPROCESS_H_

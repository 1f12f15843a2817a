// Helpers for the end-to-end tests: in-process servers, daemons as real
// subprocesses, commands, throwaway TLS certificates.
#ifndef MODELSTATE_TESTS_TEST_SUPPORT_H_
#define MODELSTATE_TESTS_TEST_SUPPORT_H_

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/time/time.h"
#include "client/client.h"
#include "grpcpp/channel.h"
#include "server/server.h"
#include "tests/subprocess.h"

namespace modelstate::testing_support {

// Reads a file from the source tree (path relative to the repository root).
std::string ReadSourceFile(const std::string& relative_path);

// Deadline of each call made by the clients below, and of RunCommand: far
// beyond what any test needs, so that a hang fails the test rather than
// stalling it until CTest's timeout.
inline constexpr absl::Duration kCallTimeout = absl::Seconds(120);

// Starts an in-process server on 127.0.0.1:0 (no demo model, RPC logging off
// unless asked).
std::unique_ptr<Server> StartServer(ServerOptions options = {});

// The state dict `server` holds for `model` (of a submodule with `options`),
// read from its store directly.
StateDict CoreState(Server& server, const std::string& model,
                    const StateDictOptions& options = {});

// A client of `server` over plaintext loopback; every call has a deadline
// of kCallTimeout.
std::unique_ptr<Client> ConnectTo(const Server& server);

// A client of the daemon at `address` whose every call has a deadline
// (kCallTimeout), so a daemon that hangs fails the test instead of stalling it.
std::unique_ptr<Client> ConnectTo(const std::string& address);

// A plaintext channel to `address` whose client pings the server every
// `interval` (HTTP/2 keepalive), with or without calls in flight: for tests of
// the server's keepalive enforcement.
std::shared_ptr<grpc::Channel> PingingChannel(const std::string& address,
                                              absl::Duration interval);

// What ended a PingFlood.
inline constexpr int kFloodStillOpen = -2;
inline constexpr int kFloodClosedWithoutGoaway = -1;
// HTTP/2's ENHANCE_YOUR_CALM error code, which gRPC's GOAWAY carries for a
// client that pings too often.
inline constexpr int kEnhanceYourCalm = 11;

// Connects to 127.0.0.1:`port` as a bare HTTP/2 client (no gRPC library to
// throttle it) that sends nothing but a PING every `interval`. Returns the
// error code of the GOAWAY that ended the connection,
// kFloodClosedWithoutGoaway, or kFloodStillOpen if neither happened within
// `timeout`.
int PingFlood(int port, absl::Duration interval, absl::Duration timeout);

// A fresh directory of this test process's own under the test temp dir,
// removed with everything in it on destruction. CTest runs every TEST as its
// own process, two at a time, so tests must not share fixed paths.
class ScratchDir {
 public:
  ScratchDir();
  ~ScratchDir();
  ScratchDir(const ScratchDir&) = delete;
  ScratchDir& operator=(const ScratchDir&) = delete;

  const std::string& path() const { return path_; }
  // path() + "/" + name.
  std::string file(const std::string& name) const;

 private:
  std::string path_;
};

// modelstated as a child process (see tests/subprocess.h) with its stderr
// captured. The destructor kills its process group (SIGKILL) if it still runs.
// Create it on the test's main thread: the daemon is killed when the thread
// that started it ends.
class Daemon {
 public:
  // Starts the daemon binary with `args` (plus --listen=127.0.0.1:0 unless
  // given) and waits until it prints its port. Fails the test if it does not
  // start within 60 s; port() is 0 then.
  explicit Daemon(std::vector<std::string> args);

  int port() const { return port_; }
  // The daemon's process id, e.g. to read its memory from /proc; 0 if it did
  // not start.
  pid_t pid() const { return process_ != nullptr ? process_->pid() : 0; }
  std::string address() const { return "127.0.0.1:" + std::to_string(port_); }
  // Sends `signal` and waits up to `timeout_seconds` for the exit; returns the
  // exit status (as from waitpid) or -1 if it did not exit in time.
  int Stop(int signal, int timeout_seconds);
  // Sends `signal` without waiting; false if the daemon is gone.
  bool Signal(int signal);
  // Waits up to `timeout` for the exit; returns the status as Stop does.
  int WaitForExit(absl::Duration timeout);
  // Waits up to `timeout` for a log line containing `needle`; false if none
  // came (the daemon exited, or the deadline passed).
  bool WaitForLog(const std::string& needle, absl::Duration timeout);
  // Everything the daemon wrote to stderr so far.
  std::string Log() const;

 private:
  std::unique_ptr<Subprocess> process_;
  int port_ = 0;
};

struct CommandResult {
  int exit_code = -1;  // -1 if killed by a signal or the timeout.
  std::string output;  // stdout and stderr together.
};

// Runs `command` through /bin/sh and returns its exit code and output. Kills
// the command and everything it started after `timeout`.
CommandResult RunCommand(const std::string& command,
                         absl::Duration timeout = kCallTimeout);

// A state dict with the keys, shapes, dtypes and kinds of `shape` whose every
// element holds `value` (converted to each tensor's dtype).
StateDict FilledLike(const StateDict& shape, float value);

// Paths of the built binaries.
std::string DaemonPath();
std::string CtlPath();

// Throwaway PKI made with the openssl command: a CA, a server certificate for
// localhost and 127.0.0.1, a client certificate from the same CA, and a client
// certificate from another CA.
struct Certificates {
  std::string dir;
  std::string ca, server_cert, server_key, client_cert, client_key, rogue_cert,
      rogue_key;
};
Certificates MakeCertificates();

// GET `path` from 127.0.0.1:`port` over plain HTTP/1.0 (e.g. /metrics); the
// whole response, or "" when nothing answers within 10 s.
std::string HttpGet(int port, const std::string& path);

// The metrics port `daemon` logs (it must run with --metrics_listen), waiting
// up to 60 s for the line; 0 if none came.
int MetricsPort(Daemon& daemon);

// The value of the unlabelled metric `name` on 127.0.0.1:`port`'s /metrics,
// or -1 if the page has no such sample.
double MetricValue(int port, const std::string& name);

// Polls `done` every 10 ms until it holds (true) or `timeout` passes (false).
bool WaitUntil(const std::function<bool()>& done,
               absl::Duration timeout = absl::Seconds(60));

}  // namespace modelstate::testing_support

#endif  // MODELSTATE_TESTS_TEST_SUPPORT_H_

// Helpers for the end-to-end tests: in-process servers, daemons as real
// subprocesses, commands, throwaway TLS certificates.
#ifndef MODELSTATE_TESTS_TEST_SUPPORT_H_
#define MODELSTATE_TESTS_TEST_SUPPORT_H_

#include <sys/types.h>

#include <memory>
#include <string>
#include <vector>

#include "client/client.h"
#include "server/server.h"

namespace modelstate::testing_support {

// Reads a file from the source tree (path relative to the repository root).
std::string ReadSourceFile(const std::string& relative_path);

// Starts an in-process server on 127.0.0.1:0 (no demo model, RPC logging off
// unless asked).
std::unique_ptr<Server> StartServer(ServerOptions options = {});

// A client of `server` over plaintext loopback.
std::unique_ptr<Client> ConnectTo(const Server& server);

// modelstated as a child process. The destructor kills it (SIGKILL) if it still
// runs.
class Daemon {
 public:
  // Starts the daemon binary with `args` (plus --listen=127.0.0.1:0 unless
  // given) and waits until it prints its port. Fails the test if it does not
  // start within 60 s.
  explicit Daemon(std::vector<std::string> args);
  ~Daemon();

  int port() const { return port_; }
  std::string address() const { return "127.0.0.1:" + std::to_string(port_); }
  // Sends `signal` and waits up to `timeout_seconds` for the exit; returns the
  // exit status (as from waitpid) or -1 if it did not exit in time.
  int Stop(int signal, int timeout_seconds);
  // Everything the daemon wrote to stderr so far.
  std::string Log();

 private:
  pid_t pid_ = -1;
  int port_ = 0;
  int stderr_fd_ = -1;
  std::string log_;
};

struct CommandResult {
  int exit_code = -1;
  std::string output;  // stdout and stderr together.
};

// Runs `command` through /bin/sh and returns its exit code and output.
CommandResult RunCommand(const std::string& command);

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

}  // namespace modelstate::testing_support

#endif  // MODELSTATE_TESTS_TEST_SUPPORT_H_

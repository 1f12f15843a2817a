#include "tests/test_support.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"

namespace modelstate::testing_support {

std::string ReadSourceFile(const std::string& relative_path) {
  std::ifstream in(std::string(MODELSTATE_SOURCE_DIR) + "/" + relative_path);
  EXPECT_TRUE(in.good()) << relative_path;
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

std::unique_ptr<Server> StartServer(ServerOptions options) {
  options.listen = "127.0.0.1:0";
  options.log_rpcs = false;
  absl::StatusOr<std::unique_ptr<Server>> server =
      Server::BuildAndStart(options);
  EXPECT_TRUE(server.ok()) << server.status();
  return server.ok() ? *std::move(server) : nullptr;
}

std::unique_ptr<Client> ConnectTo(const Server& server) {
  return Client::Connect("127.0.0.1:" + std::to_string(server.port())).value();
}

StateDict FilledLike(const StateDict& shape, float value) {
  StateDict out;
  for (const auto& entry : shape.entries()) {
    std::vector<float> values(entry.tensor.num_elements(), value);
    Tensor f =
        Tensor::FromBytes(DType::kFloat32, entry.tensor.shape(),
                          {reinterpret_cast<const uint8_t*>(values.data()),
                           values.size() * sizeof(float)})
            .value();
    out.Set(entry.key, f.CastTo(entry.tensor.dtype()).value(), entry.kind);
  }
  return out;
}

std::string DaemonPath() { return MODELSTATED_PATH; }
std::string CtlPath() { return MODELSTATECTL_PATH; }

Daemon::Daemon(std::vector<std::string> args) {
  bool has_listen = false;
  for (const std::string& arg : args)
    has_listen |= arg.rfind("--listen", 0) == 0;
  if (!has_listen) args.push_back("--listen=127.0.0.1:0");
  int pipe_fds[2];
  if (pipe(pipe_fds) != 0) {
    ADD_FAILURE() << "pipe failed";
    return;
  }
  pid_ = fork();
  if (pid_ == 0) {
    dup2(pipe_fds[1], STDERR_FILENO);
    close(pipe_fds[0]);
    close(pipe_fds[1]);
    std::vector<char*> argv;
    std::string path = DaemonPath();
    argv.push_back(path.data());
    for (std::string& arg : args) argv.push_back(arg.data());
    argv.push_back(nullptr);
    execv(path.c_str(), argv.data());
    _exit(127);
  }
  close(pipe_fds[1]);
  stderr_fd_ = pipe_fds[0];
  fcntl(stderr_fd_, F_SETFL, O_NONBLOCK);
  const auto deadline =
      std::chrono::steady_clock::now() + std::chrono::seconds(60);
  const std::string marker = "serving on port ";
  while (std::chrono::steady_clock::now() < deadline) {
    Log();
    const size_t at = log_.find(marker);
    if (at != std::string::npos) {
      const size_t end =
          log_.find_first_not_of("0123456789", at + marker.size());
      if (end != std::string::npos &&
          absl::SimpleAtoi(
              log_.substr(at + marker.size(), end - at - marker.size()),
              &port_)) {
        return;
      }
    }
    int status;
    if (waitpid(pid_, &status, WNOHANG) == pid_) {
      pid_ = -1;
      ADD_FAILURE() << "modelstated exited early: " << log_;
      return;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  ADD_FAILURE() << "modelstated did not start: " << log_;
}

Daemon::~Daemon() {
  if (pid_ > 0) {
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
  }
  if (stderr_fd_ >= 0) close(stderr_fd_);
}

std::string Daemon::Log() {
  char buffer[4096];
  ssize_t got;
  while (stderr_fd_ >= 0 &&
         (got = read(stderr_fd_, buffer, sizeof buffer)) > 0) {
    log_.append(buffer, got);
  }
  return log_;
}

int Daemon::Stop(int signal, int timeout_seconds) {
  if (pid_ <= 0) return -1;
  kill(pid_, signal);
  const auto deadline =
      std::chrono::steady_clock::now() + std::chrono::seconds(timeout_seconds);
  while (std::chrono::steady_clock::now() < deadline) {
    int status;
    if (waitpid(pid_, &status, WNOHANG) == pid_) {
      pid_ = -1;
      Log();
      return status;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return -1;
}

CommandResult RunCommand(const std::string& command) {
  CommandResult result;
  FILE* pipe = popen((command + " 2>&1").c_str(), "r");
  if (pipe == nullptr) return result;
  char buffer[4096];
  size_t got;
  while ((got = fread(buffer, 1, sizeof buffer, pipe)) > 0)
    result.output.append(buffer, got);
  const int status = pclose(pipe);
  result.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return result;
}

Certificates MakeCertificates() {
  Certificates c;
  c.dir = ::testing::TempDir() + "/pki." + std::to_string(getpid());
  c.ca = c.dir + "/ca.pem";
  c.server_cert = c.dir + "/server.pem";
  c.server_key = c.dir + "/server.key";
  c.client_cert = c.dir + "/client.pem";
  c.client_key = c.dir + "/client.key";
  c.rogue_cert = c.dir + "/rogue.pem";
  c.rogue_key = c.dir + "/rogue.key";
  const std::string d = c.dir;
  const std::string script = absl::StrCat(
      "set -e; rm -rf ", d, "; mkdir -p ", d, "; cd ", d, ";",
      "openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "
      "/CN=modelstate-test-ca "
      "-keyout ca.key -out ca.pem;",
      "printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\\n' > server.ext;",
      "openssl req -newkey rsa:2048 -nodes -subj /CN=localhost -keyout "
      "server.key -out server.csr;",
      "openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key "
      "-CAcreateserial -days 2 "
      "-extfile server.ext -out server.pem;",
      "openssl req -newkey rsa:2048 -nodes -subj /CN=worker -keyout client.key "
      "-out client.csr;",
      "openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key "
      "-CAcreateserial -days 2 "
      "-out client.pem;",
      "openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=rogue "
      "-keyout rogue.key -out rogue.pem");
  const std::string script_path = c.dir + ".sh";
  std::ofstream(script_path) << script << "\n";
  CommandResult made = RunCommand("sh " + script_path);
  EXPECT_EQ(made.exit_code, 0) << made.output;
  return c;
}

}  // namespace modelstate::testing_support

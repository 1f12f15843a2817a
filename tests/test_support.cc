#include "tests/test_support.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <system_error>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "gtest/gtest.h"
#include "tests/proxy.h"

namespace modelstate::testing_support {

std::string ReadSourceFile(const std::string& relative_path) {
  std::ifstream in(std::string(MODELSTATE_SOURCE_DIR) + "/" + relative_path);
  EXPECT_TRUE(in.good()) << relative_path;
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

StateDict CoreState(Server& server, const std::string& model,
                    const StateDictOptions& options) {
  return GetStateDict(server.store().GetSnapshot(model).value().root, options)
      .value();
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
  return ConnectTo("127.0.0.1:" + std::to_string(server.port()));
}

std::unique_ptr<Client> ConnectTo(const std::string& address) {
  ClientOptions options;
  options.timeout = kCallTimeout;
  return Client::Connect(address, options).value();
}

std::shared_ptr<grpc::Channel> PingingChannel(const std::string& address,
                                              absl::Duration interval) {
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_KEEPALIVE_TIME_MS,
              static_cast<int>(absl::ToInt64Milliseconds(interval)));
  args.SetInt(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 20000);
  args.SetInt(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  args.SetInt(GRPC_ARG_HTTP2_MAX_PINGS_WITHOUT_DATA, 0);
  // Its own connection, not one shared with the test's other channels.
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  return grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(),
                                   args);
}

namespace {

// Writes an HTTP/2 frame header and payload; false on a broken connection.
bool SendFrame(int fd, uint8_t type, uint8_t flags,
               const std::string& payload) {
  std::string frame(9, '\0');
  frame[0] = static_cast<char>(payload.size() >> 16);
  frame[1] = static_cast<char>(payload.size() >> 8);
  frame[2] = static_cast<char>(payload.size());
  frame[3] = static_cast<char>(type);
  frame[4] = static_cast<char>(flags);
  frame += payload;
  return send(fd, frame.data(), frame.size(), MSG_NOSIGNAL) ==
         static_cast<ssize_t>(frame.size());
}

// Reads what has arrived into `in` and answers SETTINGS with an ack. Returns
// the GOAWAY's error code, kFloodClosedWithoutGoaway at EOF, or
// kFloodStillOpen.
int DrainFrames(int fd, std::string* in) {
  char buffer[4096];
  const ssize_t n = recv(fd, buffer, sizeof(buffer), MSG_DONTWAIT);
  if (n == 0) return kFloodClosedWithoutGoaway;
  if (n < 0) {
    return errno == EAGAIN || errno == EWOULDBLOCK ? kFloodStillOpen
                                                   : kFloodClosedWithoutGoaway;
  }
  in->append(buffer, n);
  while (in->size() >= 9) {
    const auto byte = [&](size_t i) { return static_cast<uint8_t>((*in)[i]); };
    const size_t length = (byte(0) << 16) | (byte(1) << 8) | byte(2);
    if (in->size() < 9 + length) break;
    const uint8_t type = byte(3), flags = byte(4);
    if (type == 7 && length >= 8) {  // GOAWAY: last stream id, error code.
      return (byte(13) << 24) | (byte(14) << 16) | (byte(15) << 8) | byte(16);
    }
    if (type == 4 && (flags & 1) == 0) SendFrame(fd, 4, 1, "");
    in->erase(0, 9 + length);
  }
  return kFloodStillOpen;
}

}  // namespace

int PingFlood(int port, absl::Duration interval, absl::Duration timeout) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_port = htons(static_cast<uint16_t>(port));
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  int result = kFloodClosedWithoutGoaway;
  if (connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) ==
      0) {
    const std::string preface = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    send(fd, preface.data(), preface.size(), MSG_NOSIGNAL);
    SendFrame(fd, 4, 0, "");  // Empty SETTINGS.
    std::string in;
    const absl::Time deadline = absl::Now() + timeout;
    result = kFloodStillOpen;
    for (uint64_t ping = 1; result == kFloodStillOpen; ++ping) {
      if (absl::Now() >= deadline) break;
      std::string payload(8, '\0');
      std::memcpy(payload.data(), &ping, sizeof(ping));
      if (!SendFrame(fd, 6, 0, payload)) {
        // The server may have closed after its GOAWAY: read it.
        result = DrainFrames(fd, &in);
        if (result == kFloodStillOpen) result = kFloodClosedWithoutGoaway;
        break;
      }
      absl::SleepFor(interval);
      result = DrainFrames(fd, &in);
    }
  }
  close(fd);
  return result;
}

ScratchDir::ScratchDir() {
  std::string pattern = ::testing::TempDir() + "/modelstate-test-XXXXXX";
  if (mkdtemp(pattern.data()) == nullptr) {
    ADD_FAILURE() << "mkdtemp " << pattern << ": " << std::strerror(errno);
  }
  path_ = pattern;
}

ScratchDir::~ScratchDir() {
  std::error_code ignored;
  std::filesystem::remove_all(path_, ignored);
}

std::string ScratchDir::file(const std::string& name) const {
  return path_ + "/" + name;
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
  args.insert(args.begin(), DaemonPath());
  // stderr goes to a pipe that is drained as it fills: a daemon logging every
  // RPC must never block on a full pipe that the test does not read.
  SubprocessOptions options;
  options.stderr_to = OutputTarget::Pipe();
  absl::StatusOr<std::unique_ptr<Subprocess>> spawned =
      Subprocess::Spawn(args, options);
  if (!spawned.ok()) {
    ADD_FAILURE() << spawned.status();
    return;
  }
  process_ = *std::move(spawned);
  const std::string marker = "serving on port ";
  absl::StatusOr<std::string> line = process_->WaitForLine(
      Subprocess::Stream::kStderr, marker, absl::Seconds(60));
  if (!line.ok() ||
      !absl::SimpleAtoi(line->substr(line->find(marker) + marker.size()),
                        &port_)) {
    port_ = 0;
    ADD_FAILURE() << "modelstated did not start (" << line.status()
                  << "): " << Log();
  }
}

bool Daemon::Signal(int signal) {
  return process_ != nullptr && process_->Signal(signal).ok();
}

int Daemon::WaitForExit(absl::Duration timeout) {
  if (process_ == nullptr) return -1;
  absl::StatusOr<int> status = process_->Wait(timeout);
  return status.ok() ? *status : -1;
}

int Daemon::Stop(int signal, int timeout_seconds) {
  if (!Signal(signal)) return -1;
  return WaitForExit(absl::Seconds(timeout_seconds));
}

bool Daemon::WaitForLog(const std::string& needle, absl::Duration timeout) {
  return process_ != nullptr &&
         process_->WaitForLine(Subprocess::Stream::kStderr, needle, timeout)
             .ok();
}

std::string Daemon::Log() const {
  return process_ == nullptr ? ""
                             : process_->Output(Subprocess::Stream::kStderr);
}

CommandResult RunCommand(const std::string& command, absl::Duration timeout) {
  CommandResult result;
  SubprocessOptions options;
  options.stdout_to = OutputTarget::Pipe();
  options.stderr_to = OutputTarget::SameAsStdout();
  absl::StatusOr<std::unique_ptr<Subprocess>> shell =
      Subprocess::Spawn({"/bin/sh", "-c", command}, options);
  if (!shell.ok()) {
    result.output = shell.status().ToString();
    return result;
  }
  absl::StatusOr<int> status = (*shell)->Wait(timeout);
  // Whatever the shell left running goes too, so its output pipe closes.
  (*shell)->Kill();
  absl::Status drained = (*shell)->WaitForEndOfOutput(absl::Seconds(10));
  result.output = (*shell)->Output(Subprocess::Stream::kStdout);
  if (!status.ok()) {
    absl::StrAppend(&result.output,
                    "\n[RunCommand: ", status.status().ToString(),
                    "; killed]\n");
  } else if (WIFEXITED(*status)) {
    result.exit_code = WEXITSTATUS(*status);
  }
  if (!drained.ok()) {
    absl::StrAppend(&result.output, "\n[RunCommand: ", drained.ToString(),
                    "]\n");
  }
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

std::string HttpGet(int port, const std::string& path) {
  const int fd = ConnectToLoopback(port);
  if (fd < 0) return "";
  timeval timeout{10, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
  std::string response;
  const std::string request = "GET " + path + " HTTP/1.0\r\n\r\n";
  if (SendAll(fd, request.data(), request.size())) {
    char buffer[4096];
    ssize_t got;
    while ((got = read(fd, buffer, sizeof buffer)) > 0)
      response.append(buffer, got);
  }
  close(fd);
  return response;
}

int MetricsPort(Daemon& daemon) {
  if (!daemon.WaitForLog("metrics on port", absl::Seconds(60))) return 0;
  const std::string log = daemon.Log();
  const std::string marker = "metrics on port ";
  const size_t at = log.find(marker);
  if (at == std::string::npos) return 0;
  const size_t start = at + marker.size();
  int port = 0;
  if (!absl::SimpleAtoi(log.substr(start, log.find('\n', start) - start),
                        &port)) {
    return 0;
  }
  return port;
}

double MetricValue(int port, const std::string& name) {
  const std::string page = HttpGet(port, "/metrics");
  const size_t at = page.find("\n" + name + " ");
  if (at == std::string::npos) return -1;
  const size_t start = at + name.size() + 2;
  double value = -1;
  if (!absl::SimpleAtod(page.substr(start, page.find('\n', start) - start),
                        &value)) {
    return -1;
  }
  return value;
}

bool WaitUntil(const std::function<bool()>& done, absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  while (!done()) {
    if (absl::Now() > deadline) return false;
    absl::SleepFor(absl::Milliseconds(10));
  }
  return true;
}

}  // namespace modelstate::testing_support

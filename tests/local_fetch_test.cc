// The same-host shared-memory fetch (modelstated --local_socket): bit for bit
// what the gRPC path gives, immutable under concurrent loads, refused for
// unknown models and malformed requests without harming the daemon, nothing
// left behind by a client killed mid-fetch, and TCP when there is no socket.
// Against an in-process server whose socket lives in the test's scratch dir.
#include "client/local_fetch.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <fstream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/time/clock.h"
#include "client/client.h"
#include "common/limits.h"
#include "common/status_macros.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "proto/convert.h"
#include "proto/local_frame.h"
#include "store/memfd_export.h"
#include "tests/test_support.h"

namespace modelstate {
namespace {

using ::testing::HasSubstr;
using testing_support::ConnectTo;
using testing_support::CoreState;
using testing_support::Daemon;
using testing_support::FilledLike;
using testing_support::kCallTimeout;
using testing_support::MetricsPort;
using testing_support::MetricValue;
using testing_support::ReadSourceFile;
using testing_support::ScratchDir;
using testing_support::StartServer;

constexpr absl::Duration kSettle = absl::Seconds(10);

// A server with a local socket in `dir`.
std::unique_ptr<Server> StartLocalServer(const ScratchDir& dir,
                                         ServerOptions options = {}) {
  options.local_socket = dir.file("modelstated.local");
  return StartServer(std::move(options));
}

std::unique_ptr<Client> LocalClient(const Server& server,
                                    const std::string& socket) {
  ClientOptions options;
  options.timeout = kCallTimeout;
  options.local_socket = socket;
  return Client::Connect("127.0.0.1:" + std::to_string(server.port()), options)
      .value();
}

// A state dict of `count` float32 tensors of `floats` elements, each element
// `value`.
StateDict Uniform(int count, int64_t floats, float value) {
  StateDict state;
  for (int i = 0; i < count; ++i) {
    std::vector<float> data(static_cast<size_t>(floats), value);
    Tensor tensor =
        Tensor::FromBytes(DType::kFloat32, {floats},
                          {reinterpret_cast<const uint8_t*>(data.data()),
                           data.size() * sizeof(float)})
            .value();
    EXPECT_TRUE(state
                    .Insert("w" + std::to_string(i), std::move(tensor),
                            TensorKind::kParameter)
                    .ok());
  }
  return state;
}

void LoadUniform(Server& server, const std::string& model, int count,
                 int64_t floats, float value) {
  LoadRequest load(model);
  load.create_if_missing = true;
  ASSERT_TRUE(server.store().Load(load, Uniform(count, floats, value)).ok());
}

// True when every element of every tensor of `state` is `value`.
bool AllEqual(const StateDict& state, float value) {
  for (const auto& entry : state.entries()) {
    const float* data = reinterpret_cast<const float*>(entry.tensor.data());
    for (int64_t i = 0; i < entry.tensor.num_elements(); ++i)
      if (data[i] != value) return false;
  }
  return true;
}

void ExpectSameState(const StateDict& actual, const StateDict& expected) {
  ASSERT_EQ(actual.Keys(), expected.Keys());
  for (size_t i = 0; i < expected.size(); ++i) {
    const Tensor& a = actual.entries()[i].tensor;
    const Tensor& e = expected.entries()[i].tensor;
    SCOPED_TRACE(expected.entries()[i].key);
    EXPECT_EQ(actual.entries()[i].kind, expected.entries()[i].kind);
    EXPECT_EQ(a.dtype(), e.dtype());
    EXPECT_EQ(a.shape(), e.shape());
    ASSERT_EQ(a.num_bytes(), e.num_bytes());
    EXPECT_EQ(std::memcmp(a.data(), e.data(), e.num_bytes()), 0);
  }
}

int OpenFds() {
  int count = 0;
  DIR* dir = opendir("/proc/self/fd");
  while (readdir(dir) != nullptr) ++count;
  closedir(dir);
  return count;
}

// The store's live bytes without the local socket's exports.
int64_t LiveWithoutExports(Server& server) {
  return server.store().live_bytes() -
         static_cast<int64_t>(server.local_transfer()->export_bytes());
}

// This process's descriptors without the exports' (one each).
int FdsWithoutExports(Server& server) {
  return OpenFds() - static_cast<int>(server.local_transfer()->exports());
}

// Polls `done` until it holds or kSettle passes.
template <typename Predicate>
bool Eventually(Predicate done) {
  const absl::Time end = absl::Now() + kSettle;
  while (!done()) {
    if (absl::Now() > end) return false;
    absl::SleepFor(absl::Milliseconds(5));
  }
  return true;
}

// A hand-driven local connection, for requests no client would send. Each
// wait for the daemon is bounded by `timeout`.
class RawConnection {
 public:
  explicit RawConnection(const std::string& path,
                         absl::Duration timeout = kCallTimeout) {
    fd_ = UniqueFd(socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    sockaddr_un address{};
    address.sun_family = AF_UNIX;
    std::strncpy(address.sun_path, path.c_str(), sizeof(address.sun_path) - 1);
    EXPECT_EQ(connect(fd_.get(), reinterpret_cast<sockaddr*>(&address),
                      sizeof(address)),
              0);
    EXPECT_TRUE(SetSocketTimeouts(fd_.get(), timeout).ok());
  }
  int fd() const { return fd_.get(); }

  void Send(const v1::LocalRequest& request, int fd_to_pass = -1) {
    ASSERT_TRUE(WriteLocalFrame(fd_.get(), request, fd_to_pass).ok());
  }
  void SendBytes(const std::string& bytes) {
    ASSERT_EQ(write(fd_.get(), bytes.data(), bytes.size()),
              static_cast<ssize_t>(bytes.size()));
  }
  // The next response; an OutOfRange status when the daemon closed.
  absl::StatusOr<v1::LocalResponse> Receive() {
    v1::LocalResponse response;
    absl::Status read =
        ReadLocalFrame(fd_.get(), kMaxLocalFrameBytes, &response, nullptr);
    if (!read.ok()) return read;
    return response;
  }

 private:
  UniqueFd fd_;
};

v1::LocalRequest FetchOf(const std::string& model,
                         const std::string& token = "") {
  v1::LocalRequest request;
  request.mutable_fetch()->mutable_request()->set_model(model);
  request.mutable_fetch()->set_token(token);
  return request;
}

v1::LocalRequest RegionOf(uint64_t size) {
  v1::LocalRequest request;
  request.mutable_region()->set_size(size);
  return request;
}

// A memfd of `size` bytes with `seals` added.
UniqueFd Memfd(uint64_t size, int seals) {
  UniqueFd fd(memfd_create("test-region", MFD_CLOEXEC | MFD_ALLOW_SEALING));
  EXPECT_EQ(ftruncate(fd.get(), static_cast<off_t>(size)), 0);
  if (seals != 0) {
    EXPECT_EQ(fcntl(fd.get(), F_ADD_SEALS, seals), 0);
  }
  return fd;
}

TEST(LocalFetchTest, BitExactWithTcpForEveryParityModelAndSelection) {
  ScratchDir dir;
  auto server = StartLocalServer(dir);
  auto tcp = ConnectTo(*server);
  auto local = LocalClient(*server, dir.file("modelstated.local"));
  int64_t served = 0;
  for (const char* name : {"mlp", "cnn", "transformer", "gpt2", "llama"}) {
    SCOPED_TRACE(name);
    ASSERT_TRUE(
        tcp->CreateModel(name, ReadSourceFile(std::string("tests/models/") +
                                              name + ".json"))
            .ok());
    FetchRequest bf16(name);
    bf16.dtype = DType::kBFloat16;
    FetchRequest params_only(name);
    params_only.include_buffers = false;
    for (const FetchRequest& request :
         {FetchRequest(name), bf16, params_only}) {
      absl::StatusOr<FetchedStateDict> via_tcp = tcp->StateDict(request);
      absl::StatusOr<FetchedStateDict> via_shm = local->StateDict(request);
      ASSERT_TRUE(via_tcp.ok()) << via_tcp.status();
      ASSERT_TRUE(via_shm.ok()) << via_shm.status();
      EXPECT_EQ(via_shm->version, via_tcp->version);
      ExpectSameState(via_shm->state, via_tcp->state);
      ++served;
      EXPECT_EQ(server->local_transfer()->fetches_served(), served);
    }
  }
}

TEST(LocalFetchTest, StateDictIntoFillsCallerMemoryCastingAsTcpDoes) {
  ScratchDir dir;
  auto server = StartLocalServer(dir);
  auto tcp = ConnectTo(*server);
  auto local = LocalClient(*server, dir.file("modelstated.local"));
  ASSERT_TRUE(
      tcp->CreateModel("cnn", ReadSourceFile("tests/models/cnn.json")).ok());
  const StateDict expected = CoreState(*server, "cnn");
  for (DType dtype : {DType::kFloat32, DType::kBFloat16}) {
    SCOPED_TRACE(TorchName(dtype));
    std::vector<std::vector<uint8_t>> via_tcp, via_shm;
    for (auto* memory : {&via_tcp, &via_shm}) {
      std::vector<Destination> destinations;
      for (const auto& entry : expected.entries()) {
        const DType target = IsFloatingPoint(entry.tensor.dtype())
                                 ? dtype
                                 : entry.tensor.dtype();
        memory->emplace_back(NumBytes(target, entry.tensor.shape()).value(),
                             0xA5);
        destinations.push_back(
            {entry.key, target, entry.tensor.shape(), memory->back().data()});
      }
      Client& client = memory == &via_tcp ? *tcp : *local;
      std::vector<std::string> written;
      IntoOptions into;
      into.written_keys = &written;
      absl::StatusOr<int64_t> version =
          client.StateDictInto({"cnn"}, destinations, {}, into);
      ASSERT_TRUE(version.ok()) << version.status();
      EXPECT_EQ(*version, 1);
      EXPECT_EQ(written, expected.Keys());
    }
    EXPECT_EQ(via_shm, via_tcp);
  }
  EXPECT_EQ(server->local_transfer()->fetches_served(), 2);
}

TEST(LocalFetchTest, UnixTargetUsesTheLocalSocketBesideIt) {
  ScratchDir dir;
  ServerOptions options;
  options.listen = "unix:" + dir.file("grpc.sock");
  options.local_socket = dir.file("grpc.sock.local");
  options.log_rpcs = false;
  absl::StatusOr<std::unique_ptr<Server>> started =
      Server::BuildAndStart(options);
  ASSERT_TRUE(started.ok()) << started.status();
  std::unique_ptr<Server> server = std::move(*started);
  LoadUniform(*server, "m", 4, 1000, 3.0f);
  ClientOptions client_options;
  client_options.timeout = kCallTimeout;
  auto client =
      Client::Connect("unix:" + dir.file("grpc.sock"), client_options).value();
  absl::StatusOr<FetchedStateDict> fetched = client->StateDict({"m"});
  ASSERT_TRUE(fetched.ok()) << fetched.status();
  EXPECT_TRUE(AllEqual(fetched->state, 3.0f));
  EXPECT_EQ(server->local_transfer()->fetches_served(), 1);
  EXPECT_EQ(LocalSocketFor("unix:///run/m.sock", ""), "/run/m.sock.local");
  EXPECT_EQ(LocalSocketFor("127.0.0.1:1", ""), "");
  EXPECT_EQ(LocalSocketFor("127.0.0.1:1", "/x"), "/x");
}

// --local_max_connections_per_uid reaches the socket: with 1, a second
// connection of this uid is refused (the default would take 16).
TEST(LocalFetchTest, TheDaemonTakesItsPerUidCap) {
  ScratchDir dir;
  const std::string socket = dir.file("modelstated.local");
  Daemon daemon({"--local_socket=" + socket, "--demo_model=demo",
                 "--local_max_connections_per_uid=1"});
  ASSERT_NE(daemon.port(), 0);
  RawConnection first(socket);
  first.Send(FetchOf("demo"));
  absl::StatusOr<v1::LocalResponse> served = first.Receive();
  ASSERT_TRUE(served.ok()) << served.status();
  EXPECT_TRUE(served->has_manifest());
  RawConnection second(socket);
  absl::StatusOr<v1::LocalResponse> refused = second.Receive();
  ASSERT_TRUE(refused.ok()) << refused.status();
  const absl::Status status = FromLocalStatus(refused->error());
  EXPECT_EQ(status.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(status.message(), HasSubstr("at most 1"));
}

TEST(LocalFetchTest, SocketIsGroupOnly) {
  ScratchDir dir;
  auto server = StartLocalServer(dir);
  struct stat info {};
  ASSERT_EQ(stat(dir.file("modelstated.local").c_str(), &info), 0);
  EXPECT_TRUE(S_ISSOCK(info.st_mode));
  EXPECT_EQ(info.st_mode & 0777, 0660u);
  server.reset();
  EXPECT_NE(access(dir.file("modelstated.local").c_str(), F_OK), 0)
      << "the socket file outlived the server";
}

TEST(LocalFetchTest, FallsBackToTcpWhenTheSocketIsAbsent) {
  ScratchDir dir;
  auto server = StartServer();
  LoadUniform(*server, "m", 3, 100, 2.0f);
  auto client = LocalClient(*server, dir.file("nobody-listens-here"));
  absl::StatusOr<FetchedStateDict> fetched = client->StateDict({"m"});
  ASSERT_TRUE(fetched.ok()) << fetched.status();
  EXPECT_TRUE(AllEqual(fetched->state, 2.0f));
  std::vector<float> memory(100, 0.0f);
  FetchRequest one("m");
  one.keys = {"w1"};
  ASSERT_TRUE(
      client
          ->StateDictInto(one, {{"w1", DType::kFloat32, {100}, memory.data()}})
          .ok());
  EXPECT_EQ(memory, std::vector<float>(100, 2.0f));
}

TEST(LocalFetchTest, RequestsLargerThanTheSocketReadsGoThroughTcp) {
  ScratchDir dir;
  auto server = StartLocalServer(dir);
  constexpr int kTensors = 3000;  // Their keys alone pass the request bound.
  LoadUniform(*server, "m", kTensors, 1, 6.0f);
  auto client = LocalClient(*server, dir.file("modelstated.local"));
  FetchRequest every_key("m");
  for (int i = 0; i < kTensors; ++i)
    every_key.keys.push_back("w" + std::to_string(i));
  FetchRequest few_keys("m");
  few_keys.keys = {"w0", "w1"};
  absl::StatusOr<FetchedStateDict> large = client->StateDict(every_key);
  ASSERT_TRUE(large.ok()) << large.status();
  EXPECT_EQ(large->state.size(), static_cast<size_t>(kTensors));
  EXPECT_TRUE(AllEqual(large->state, 6.0f));
  EXPECT_EQ(server->local_transfer()->fetches_served(), 0);
  absl::StatusOr<FetchedStateDict> small = client->StateDict(few_keys);
  ASSERT_TRUE(small.ok()) << small.status();
  EXPECT_EQ(small->state.Keys(), few_keys.keys);
  EXPECT_EQ(server->local_transfer()->fetches_served(), 1);
}

TEST(LocalFetchTest, UnknownModelIsNotFoundAndNothingIsServed) {
  ScratchDir dir;
  auto server = StartLocalServer(dir);
  auto client = LocalClient(*server, dir.file("modelstated.local"));
  absl::StatusOr<FetchedStateDict> fetched = client->StateDict({"nope"});
  EXPECT_EQ(fetched.status().code(), absl::StatusCode::kNotFound)
      << fetched.status();
  float memory = 0;
  EXPECT_EQ(
      client->StateDictInto({"nope"}, {{"w", DType::kFloat32, {}, &memory}})
          .status()
          .code(),
      absl::StatusCode::kNotFound);
  EXPECT_EQ(server->local_transfer()->fetches_served(), 0);
}

TEST(LocalFetchTest, AuthorizerSeesPeerAndTokenAndCanRefuse) {
  ScratchDir dir;
  ServerOptions options;
  std::atomic<int> checks{0};
  options.local_authorize = [&](const LocalPeer& peer, const std::string& token,
                                const FetchRequest& request) {
    ++checks;
    EXPECT_EQ(peer.pid, getpid());
    EXPECT_EQ(peer.uid, getuid());
    if (request.model == "secret" && token != "let-me-in")
      return absl::PermissionDeniedError("no access to secret");
    return absl::OkStatus();
  };
  auto server = StartLocalServer(dir, options);
  LoadUniform(*server, "secret", 1, 10, 1.0f);
  RawConnection raw(dir.file("modelstated.local"));
  raw.Send(FetchOf("secret", "wrong"));
  absl::StatusOr<v1::LocalResponse> refused = raw.Receive();
  ASSERT_TRUE(refused.ok()) << refused.status();
  EXPECT_EQ(FromLocalStatus(refused->error()).code(),
            absl::StatusCode::kPermissionDenied);
  // The same connection goes on serving after a refusal.
  raw.Send(FetchOf("secret", "let-me-in"));
  absl::StatusOr<v1::LocalResponse> allowed = raw.Receive();
  ASSERT_TRUE(allowed.ok()) << allowed.status();
  EXPECT_TRUE(allowed->has_manifest());
  EXPECT_EQ(checks.load(), 2);
  auto client = LocalClient(*server, dir.file("modelstated.local"));
  EXPECT_EQ(client->StateDict({"secret"}).status().code(),
            absl::StatusCode::kPermissionDenied);
}

// Runs one malformed exchange; returns the daemon's error (or the status of
// reading it when the daemon just closed).
using Answer = absl::StatusOr<v1::LocalResponse>;
using Exchange = std::function<Answer(RawConnection&, uint64_t region_bytes)>;

absl::StatusOr<v1::LocalResponse> AfterManifest(RawConnection& raw) {
  raw.Send(FetchOf("m"));
  absl::StatusOr<v1::LocalResponse> manifest = raw.Receive();
  if (!manifest.ok() || !manifest->has_manifest())
    return absl::InternalError("no manifest");
  return manifest;
}

TEST(LocalFetchTest, MalformedRequestsAreRefusedAndTheDaemonKeepsServing) {
  ScratchDir dir;
  auto server = StartLocalServer(dir);
  LoadUniform(*server, "m", 4, 1000, 5.0f);
  const std::string path = dir.file("modelstated.local");
  auto client = LocalClient(*server, path);
  ASSERT_TRUE(client->StateDict({"m"}).ok());  // Warms up lazy fds.
  ASSERT_TRUE(Eventually(
      [&] { return server->local_transfer()->active_connections() == 0; }));
  const int baseline_fds = OpenFds();
  const uint64_t region =
      LayOutLocalRegion({4000, 4000, 4000, 4000}).value().region_bytes;
  struct Case {
    const char* name;
    Exchange exchange;
  };
  const std::vector<Case> cases = {
      {"frame length over the limit",
       [](RawConnection& raw, uint64_t) -> Answer {
         raw.SendBytes(std::string("\xff\xff\xff\x7f", 4));
         return raw.Receive();
       }},
      {"bytes that do not parse",
       [](RawConnection& raw, uint64_t) -> Answer {
         raw.SendBytes(std::string("\x03\x00\x00\x00\xff\xff\xff", 7));
         return raw.Receive();
       }},
      {"a region before any fetch",
       [](RawConnection& raw, uint64_t size) -> Answer {
         UniqueFd fd = Memfd(size, F_SEAL_SHRINK);
         raw.Send(RegionOf(size), fd.get());
         return raw.Receive();
       }},
      {"a descriptor on the fetch request",
       [](RawConnection& raw, uint64_t size) -> Answer {
         UniqueFd fd = Memfd(size, F_SEAL_SHRINK);
         raw.Send(FetchOf("m"), fd.get());
         return raw.Receive();
       }},
      {"a region without a descriptor",
       [](RawConnection& raw, uint64_t size) -> Answer {
         RETURN_IF_ERROR(AfterManifest(raw).status());
         raw.Send(RegionOf(size));
         return raw.Receive();
       }},
      {"a fetch instead of the region",
       [](RawConnection& raw, uint64_t) -> Answer {
         RETURN_IF_ERROR(AfterManifest(raw).status());
         raw.Send(FetchOf("m"));
         return raw.Receive();
       }},
      {"a memfd not sealed against shrinking",
       [](RawConnection& raw, uint64_t size) -> Answer {
         RETURN_IF_ERROR(AfterManifest(raw).status());
         UniqueFd fd = Memfd(size, 0);
         raw.Send(RegionOf(size), fd.get());
         return raw.Receive();
       }},
      {"a region of the wrong size",
       [](RawConnection& raw, uint64_t size) -> Answer {
         RETURN_IF_ERROR(AfterManifest(raw).status());
         UniqueFd fd = Memfd(size - 1, F_SEAL_SHRINK);
         raw.Send(RegionOf(size - 1), fd.get());
         return raw.Receive();
       }},
      {"a region that says one size and has another",
       [](RawConnection& raw, uint64_t size) -> Answer {
         RETURN_IF_ERROR(AfterManifest(raw).status());
         UniqueFd fd = Memfd(size + 4096, F_SEAL_SHRINK);
         raw.Send(RegionOf(size), fd.get());
         return raw.Receive();
       }},
      {"a write-sealed memfd",
       [](RawConnection& raw, uint64_t size) -> Answer {
         RETURN_IF_ERROR(AfterManifest(raw).status());
         UniqueFd fd = Memfd(size, F_SEAL_SHRINK | F_SEAL_WRITE);
         raw.Send(RegionOf(size), fd.get());
         return raw.Receive();
       }},
      {"a pipe instead of a memfd",
       [](RawConnection& raw, uint64_t size) -> Answer {
         RETURN_IF_ERROR(AfterManifest(raw).status());
         int ends[2];
         EXPECT_EQ(pipe2(ends, O_CLOEXEC), 0);
         UniqueFd read_end(ends[0]), write_end(ends[1]);
         raw.Send(RegionOf(size), read_end.get());
         return raw.Receive();
       }},
  };
  for (const Case& test : cases) {
    SCOPED_TRACE(test.name);
    {
      RawConnection raw(path);
      absl::StatusOr<v1::LocalResponse> answer = test.exchange(raw, region);
      ASSERT_TRUE(answer.ok()) << answer.status();
      ASSERT_TRUE(answer->has_error());
      const absl::Status error = FromLocalStatus(answer->error());
      EXPECT_TRUE(error.code() == absl::StatusCode::kInvalidArgument ||
                  error.code() == absl::StatusCode::kResourceExhausted)
          << error;
    }
    EXPECT_TRUE(Eventually([&] {
      return server->local_transfer()->active_connections() == 0 &&
             OpenFds() == baseline_fds;
    })) << OpenFds()
        << " fds open, " << baseline_fds << " before";
    absl::StatusOr<FetchedStateDict> fetched = client->StateDict({"m"});
    ASSERT_TRUE(fetched.ok()) << fetched.status();
    EXPECT_TRUE(AllEqual(fetched->state, 5.0f));
  }
  // A frame cut short: the daemon just closes.
  {
    RawConnection raw(path);
    raw.SendBytes(std::string("\x10\x00\x00\x00\x0a", 5));
  }
  EXPECT_TRUE(Eventually(
      [&] { return server->local_transfer()->active_connections() == 0; }));
  EXPECT_TRUE(client->StateDict({"m"}).ok());
}

TEST(LocalFetchTest, LoadDuringAFetchDoesNotChangeTheBytesReceived) {
  ScratchDir dir;
  auto server = StartLocalServer(dir);
  LoadUniform(*server, "m", 4, 1000, 1.0f);
  // The daemon has answered with version 1's manifest; a load commits
  // version 2 before the region arrives.
  RawConnection raw(dir.file("modelstated.local"));
  absl::StatusOr<v1::LocalResponse> manifest = AfterManifest(raw);
  ASSERT_TRUE(manifest.ok());
  LoadUniform(*server, "m", 4, 1000, 2.0f);
  const uint64_t size = manifest->manifest().region_bytes();
  UniqueFd region = Memfd(size, F_SEAL_SHRINK);
  raw.Send(RegionOf(size), region.get());
  absl::StatusOr<v1::LocalResponse> filled = raw.Receive();
  ASSERT_TRUE(filled.ok() && filled->has_filled());
  EXPECT_EQ(manifest->manifest().manifest().version(), 1);
  std::vector<float> bytes(size / sizeof(float));
  ASSERT_EQ(pread(region.get(), bytes.data(), size, 0),
            static_cast<ssize_t>(size));
  for (int i = 0; i < 4; ++i) {
    const uint64_t offset = manifest->manifest().offsets(i) / sizeof(float);
    for (int j = 0; j < 1000; ++j) ASSERT_EQ(bytes[offset + j], 1.0f);
  }
}

TEST(LocalFetchTest, FetchesStayWholeVersionsUnderConcurrentLoads) {
  ScratchDir dir;
  auto server = StartLocalServer(dir);
  LoadUniform(*server, "m", 8, 64 * 1024, 0.0f);
  auto client = LocalClient(*server, dir.file("modelstated.local"));
  std::atomic<bool> stop{false};
  std::thread loader([&] {
    for (int v = 1; !stop.load() && v < 10000; ++v)
      LoadUniform(*server, "m", 8, 64 * 1024, static_cast<float>(v));
  });
  std::vector<FetchedStateDict> kept;
  for (int i = 0; i < 40; ++i) {
    absl::StatusOr<FetchedStateDict> fetched = client->StateDict({"m"});
    EXPECT_TRUE(fetched.ok()) << fetched.status();
    if (!fetched.ok()) break;  // The loader must still be joined.
    const float value = reinterpret_cast<const float*>(
        fetched->state.entries()[0].tensor.data())[0];
    EXPECT_TRUE(AllEqual(fetched->state, value)) << "torn version";
    EXPECT_EQ(static_cast<int64_t>(value) + 1, fetched->version);
    kept.push_back(std::move(*fetched));
  }
  stop = true;
  loader.join();
  // What was received earlier never changes afterwards.
  for (const FetchedStateDict& fetched : kept)
    EXPECT_TRUE(
        AllEqual(fetched.state, static_cast<float>(fetched.version - 1)));
}

TEST(LocalFetchTest, LaterFetchesMapOneSealedExportCountedAsLiveBytes) {
  ScratchDir dir;
  auto server = StartLocalServer(dir);
  LoadUniform(*server, "m", 4, 1000, 7.0f);
  const int64_t model_bytes = server->store().live_bytes();
  auto client = LocalClient(*server, dir.file("modelstated.local"));
  FetchRequest some("m");
  some.keys = {"w3", "w1"};
  for (const FetchRequest& request : {FetchRequest("m"), some}) {
    for (int i = 0; i < 2; ++i) {
      absl::StatusOr<FetchedStateDict> fetched = client->StateDict(request);
      ASSERT_TRUE(fetched.ok()) << fetched.status();
      EXPECT_TRUE(AllEqual(fetched->state, 7.0f));
      EXPECT_EQ(fetched->state.size(), request.keys.empty() ? 4u : 2u);
      if (!request.keys.empty()) {
        EXPECT_EQ(fetched->state.Keys(), some.keys);
      }
    }
  }
  const LocalTransferServer& local = *server->local_transfer();
  EXPECT_EQ(local.fetches_served(), 4);
  EXPECT_EQ(local.fetches_from_exports(), 4);
  // The first fetch made it; the subset's tensors are in it too.
  EXPECT_EQ(local.exports(), 1u);
  const uint64_t region =
      LayOutLocalRegion({4000, 4000, 4000, 4000}).value().region_bytes;
  EXPECT_EQ(local.export_bytes(), region);
  EXPECT_EQ(server->store().live_bytes(),
            model_bytes + static_cast<int64_t>(region));
}

// The daemon's flag reaches the exports: with the default bound a local fetch
// leaves an export counted as live bytes, with --local_export_bytes=0 none.
TEST(LocalFetchTest, DaemonFlagLocalExportBytesBoundsTheExports) {
  const uint64_t region =
      LayOutLocalRegion({4000, 4000, 4000, 4000}).value().region_bytes;
  for (const char* bound : {"", "--local_export_bytes=0"}) {
    SCOPED_TRACE(bound);
    ScratchDir dir;
    std::vector<std::string> args = {"--demo_model=", "--log_rpcs=false",
                                     "--metrics_listen=127.0.0.1:0",
                                     "--local_socket=" + dir.file("d.local")};
    if (*bound != '\0') args.push_back(bound);
    Daemon daemon(args);
    const int metrics = MetricsPort(daemon);
    ASSERT_GT(metrics, 0);
    ClientOptions options;
    options.timeout = kCallTimeout;
    options.local_socket = dir.file("d.local");
    auto client = Client::Connect(daemon.address(), options).value();
    LoadRequest create("m");
    create.create_if_missing = true;
    ASSERT_TRUE(client->LoadStateDict(create, Uniform(4, 1000, 5.0f)).ok());
    const double model_bytes =
        MetricValue(metrics, "modelstate_memory_live_bytes");
    for (int i = 0; i < 2; ++i) {
      absl::StatusOr<FetchedStateDict> fetched = client->StateDict({"m"});
      ASSERT_TRUE(fetched.ok()) << fetched.status();
      EXPECT_TRUE(AllEqual(fetched->state, 5.0f));
    }
    const double exported = *bound == '\0' ? static_cast<double>(region) : 0;
    EXPECT_EQ(MetricValue(metrics, "modelstate_memory_live_bytes"),
              model_bytes + exported);
  }
}

TEST(LocalFetchTest, ExportGoesWithItsVersionAndMappingsOutliveIt) {
  ScratchDir dir;
  ServerOptions options;
  options.retain_versions = 2;
  auto server = StartLocalServer(dir, options);
  auto client = LocalClient(*server, dir.file("modelstated.local"));
  const LocalTransferServer& local = *server->local_transfer();
  LoadUniform(*server, "m", 4, 1000, 1.0f);
  const int64_t one_version = server->store().live_bytes();
  absl::StatusOr<FetchedStateDict> first = client->StateDict({"m"});
  ASSERT_TRUE(first.ok()) << first.status();
  // Version 1 is retained, and so is its export, which serves it again.
  LoadUniform(*server, "m", 4, 1000, 2.0f);
  FetchRequest old("m");
  old.version = 1;
  absl::StatusOr<FetchedStateDict> again = client->StateDict(old);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_TRUE(AllEqual(again->state, 1.0f));
  EXPECT_EQ(local.fetches_from_exports(), 2);
  EXPECT_EQ(local.exports(), 1u);
  // Version 3 pushes version 1 out: its export goes within a second.
  LoadUniform(*server, "m", 4, 1000, 3.0f);
  EXPECT_TRUE(Eventually([&] {
    return local.exports() == 0 &&
           server->store().live_bytes() == 2 * one_version;
  })) << local.exports()
      << " exports, live " << server->store().live_bytes();
  // What clients mapped stays theirs, unchanged.
  EXPECT_TRUE(AllEqual(first->state, 1.0f));
  EXPECT_TRUE(AllEqual(again->state, 1.0f));
  absl::StatusOr<FetchedStateDict> now = client->StateDict({"m"});
  ASSERT_TRUE(now.ok()) << now.status();
  EXPECT_TRUE(AllEqual(now->state, 3.0f));
  EXPECT_EQ(local.exports(), 1u);
  // With no connection since, loads that push version 3 out drop its export.
  LoadUniform(*server, "m", 4, 1000, 4.0f);
  LoadUniform(*server, "m", 4, 1000, 5.0f);
  EXPECT_TRUE(Eventually([&] { return local.exports() == 0; }));
  EXPECT_TRUE(AllEqual(now->state, 3.0f));
}

TEST(LocalFetchTest, ExportBytesBoundKeepsTheMostRecentlyUsed) {
  ScratchDir dir;
  const uint64_t big =
      LayOutLocalRegion({4000, 4000, 4000, 4000}).value().region_bytes;
  const uint64_t small =
      LayOutLocalRegion({2000, 2000, 2000, 2000}).value().region_bytes;
  ServerOptions options;
  options.local_export_bytes = big;
  auto server = StartLocalServer(dir, options);
  LoadUniform(*server, "big", 4, 1000, 1.0f);
  LoadUniform(*server, "small", 4, 500, 2.0f);
  LoadUniform(*server, "huge", 4, 2000, 3.0f);
  auto client = LocalClient(*server, dir.file("modelstated.local"));
  const LocalTransferServer& local = *server->local_transfer();
  const auto fetch = [&](const char* model, float value) {
    absl::StatusOr<FetchedStateDict> fetched = client->StateDict({model});
    ASSERT_TRUE(fetched.ok()) << fetched.status();
    EXPECT_TRUE(AllEqual(fetched->state, value));
  };
  fetch("big", 1.0f);
  EXPECT_EQ(local.export_bytes(), big);
  fetch("small", 2.0f);  // Both do not fit: big's export goes.
  EXPECT_EQ(local.export_bytes(), small);
  fetch("huge", 3.0f);  // Over the bound alone: the client's region is filled.
  EXPECT_EQ(local.export_bytes(), small);
  EXPECT_EQ(local.fetches_from_exports(), 2);
  EXPECT_EQ(local.fetches_served(), 3);

  ScratchDir none_dir;
  options.local_export_bytes = 0;
  auto no_exports = StartLocalServer(none_dir, options);
  LoadUniform(*no_exports, "m", 4, 1000, 4.0f);
  auto other = LocalClient(*no_exports, none_dir.file("modelstated.local"));
  for (int i = 0; i < 2; ++i) {
    absl::StatusOr<FetchedStateDict> fetched = other->StateDict({"m"});
    ASSERT_TRUE(fetched.ok()) << fetched.status();
    EXPECT_TRUE(AllEqual(fetched->state, 4.0f));
  }
  EXPECT_EQ(no_exports->local_transfer()->fetches_served(), 2);
  EXPECT_EQ(no_exports->local_transfer()->fetches_from_exports(), 0);
  EXPECT_EQ(no_exports->local_transfer()->exports(), 0u);
}

TEST(LocalFetchTest, AnExportOverTheMemoryLimitIsNotMadeAndTheRegionIsFilled) {
  ScratchDir dir;
  ServerOptions options;
  options.memory_limit_bytes = 6 << 20;
  auto server = StartLocalServer(dir, options);
  LoadUniform(*server, "m", 4, 256 * 1024, 5.0f);  // 4 MiB.
  const int64_t model_bytes = server->store().live_bytes();
  auto client = LocalClient(*server, dir.file("modelstated.local"));
  const LocalTransferServer& local = *server->local_transfer();
  absl::StatusOr<FetchedStateDict> whole = client->StateDict({"m"});
  ASSERT_TRUE(whole.ok()) << whole.status();
  EXPECT_TRUE(AllEqual(whole->state, 5.0f));
  EXPECT_EQ(local.fetches_from_exports(), 0);
  EXPECT_EQ(local.exports(), 0u);
  EXPECT_EQ(server->store().live_bytes(), model_bytes);
  // One tensor's export fits, and counts.
  FetchRequest one("m");
  one.keys = {"w2"};
  absl::StatusOr<FetchedStateDict> part = client->StateDict(one);
  ASSERT_TRUE(part.ok()) << part.status();
  EXPECT_TRUE(AllEqual(part->state, 5.0f));
  EXPECT_EQ(local.fetches_from_exports(), 1);
  EXPECT_EQ(server->store().live_bytes(), model_bytes + (1 << 20));
}

TEST(LocalFetchTest, OldRequestsGetTheRegionAndNewOnesTheSealedExport) {
  ScratchDir dir;
  auto server = StartLocalServer(dir);
  LoadUniform(*server, "m", 4, 1000, 3.0f);
  auto client = LocalClient(*server, dir.file("modelstated.local"));
  ASSERT_TRUE(client->StateDict({"m"}).ok());  // Makes the export.
  ASSERT_EQ(server->local_transfer()->exports(), 1u);
  const auto expect_threes = [](int fd, const v1::LocalManifest& manifest) {
    for (int i = 0; i < 4; ++i) {
      std::vector<float> values(1000);
      ASSERT_EQ(pread(fd, values.data(), 4000,
                      static_cast<off_t>(manifest.offsets(i))),
                4000);
      EXPECT_EQ(values, std::vector<float>(1000, 3.0f));
    }
  };
  RawConnection raw(dir.file("modelstated.local"));
  // A client that predates exports: no descriptor on the manifest (Receive
  // refuses one), and its own region is filled.
  absl::StatusOr<v1::LocalResponse> manifest = AfterManifest(raw);
  ASSERT_TRUE(manifest.ok()) << manifest.status();
  EXPECT_FALSE(manifest->manifest().shared_export());
  const uint64_t size = manifest->manifest().region_bytes();
  UniqueFd region = Memfd(size, F_SEAL_SHRINK);
  raw.Send(RegionOf(size), region.get());
  absl::StatusOr<v1::LocalResponse> filled = raw.Receive();
  ASSERT_TRUE(filled.ok() && filled->has_filled());
  expect_threes(region.get(), manifest->manifest());
  // One that accepts exports gets the daemon's, sealed for good.
  v1::LocalRequest request = FetchOf("m");
  request.mutable_fetch()->set_accept_export(true);
  raw.Send(request);
  v1::LocalResponse answer;
  UniqueFd exported;
  ASSERT_TRUE(
      ReadLocalFrame(raw.fd(), kMaxLocalFrameBytes, &answer, &exported).ok());
  ASSERT_TRUE(answer.has_manifest() && answer.manifest().shared_export());
  ASSERT_TRUE(exported.valid());
  EXPECT_EQ(fcntl(exported.get(), F_GET_SEALS), kExportSeals);
  expect_threes(exported.get(), answer.manifest());
  const float four = 4.0f;
  EXPECT_EQ(pwrite(exported.get(), &four, sizeof(four), 0), -1);
  EXPECT_EQ(mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED,
                 exported.get(), 0),
            MAP_FAILED);
  EXPECT_EQ(server->local_transfer()->fetches_from_exports(), 2);
  EXPECT_EQ(server->local_transfer()->fetches_served(), 3);
  // The client can still ask for the copy into its own memory.
  LocalFetchSettings settings;
  settings.socket_path = dir.file("modelstated.local");
  settings.timeout = kCallTimeout;
  settings.accept_exports = false;
  v1::StateDictRequest whole;
  whole.set_model("m");
  absl::StatusOr<absl::optional<LocalFetched>> copied =
      FetchLocally(settings, whole);
  ASSERT_TRUE(copied.ok()) << copied.status();
  ASSERT_TRUE(copied->has_value());
  ASSERT_EQ((*copied)->tensors.size(), 4u);
  for (const Tensor& tensor : (*copied)->tensors) {
    ASSERT_EQ(tensor.num_bytes(), 4000u);
    EXPECT_EQ(tensor.data_as<float>()[999], 3.0f);
  }
  EXPECT_EQ(server->local_transfer()->fetches_from_exports(), 2);
  EXPECT_EQ(server->local_transfer()->fetches_served(), 4);
}

TEST(LocalFetchTest, AWorkerWritingItsTensorsChangesNothingForOthers) {
  ScratchDir dir;
  auto server = StartLocalServer(dir);
  LoadUniform(*server, "m", 2, 4096, 4.0f);
  auto client = LocalClient(*server, dir.file("modelstated.local"));
  absl::StatusOr<FetchedStateDict> mine = client->StateDict({"m"});
  absl::StatusOr<FetchedStateDict> theirs = client->StateDict({"m"});
  ASSERT_TRUE(mine.ok() && theirs.ok());
  // As a worker that hands its tensors' memory to code that writes it
  // would: the mapping is private, so the write copies the page.
  float* data =
      const_cast<float*>(mine->state.entries()[1].tensor.data_as<float>());
  data[0] = -1.0f;
  data[4095] = -1.0f;
  EXPECT_EQ(mine->state.entries()[1].tensor.data_as<float>()[4095], -1.0f);
  EXPECT_TRUE(AllEqual(theirs->state, 4.0f));
  absl::StatusOr<FetchedStateDict> later = client->StateDict({"m"});
  ASSERT_TRUE(later.ok()) << later.status();
  EXPECT_TRUE(AllEqual(later->state, 4.0f));
  EXPECT_EQ(server->local_transfer()->fetches_from_exports(), 3);
}

// A stand-in daemon that answers one fetch on `listener` with an export of
// one float32 tensor of four 1.0s, sealed with `seals`, whose manifest
// checksum is off by one when `corrupt`.
void ServeOneExport(int listener, int seals, bool corrupt) {
  UniqueFd connection(accept4(listener, nullptr, nullptr, SOCK_CLOEXEC));
  ASSERT_TRUE(connection.valid());
  ASSERT_TRUE(SetSocketTimeouts(connection.get(), kCallTimeout).ok());
  v1::LocalRequest request;
  ASSERT_TRUE(
      ReadLocalFrame(connection.get(), kMaxLocalFrameBytes, &request, nullptr)
          .ok());
  EXPECT_TRUE(request.fetch().accept_export());
  StateDict state = Uniform(1, 4, 1.0f);
  UniqueFd memfd = Memfd(0, 0);
  const Tensor& tensor = state.entries()[0].tensor;
  ASSERT_EQ(pwrite(memfd.get(), tensor.data(), 16, 0), 16);
  ASSERT_EQ(fcntl(memfd.get(), F_ADD_SEALS, seals), 0);
  FetchPlan plan;
  plan.model = "m";
  plan.version = 1;
  plan.state = std::make_shared<const StateDict>(state);
  v1::LocalResponse response;
  v1::LocalManifest* manifest = response.mutable_manifest();
  *manifest->mutable_manifest() = ToManifest(plan, 16);
  v1::TensorInfo* info = manifest->mutable_manifest()->mutable_tensors(0);
  info->set_xxh3_64(info->xxh3_64() + (corrupt ? 1 : 0));
  manifest->add_offsets(0);
  manifest->set_region_bytes(16);
  manifest->set_shared_export(true);
  EXPECT_TRUE(WriteLocalFrame(connection.get(), response, memfd.get()).ok());
}

TEST(LocalFetchTest, VerifyingClientsRefuseACorruptExportAndNoneAnUnsealedOne) {
  ScratchDir dir;
  const std::string path = dir.file("stand-in.local");
  struct Case {
    const char* name;
    int seals;
    bool corrupt;
    bool verify;
    absl::StatusCode expected;
  };
  const std::vector<Case> cases = {
      {"a sealed export, trusted", kExportSeals, true, false,
       absl::StatusCode::kOk},
      {"a sealed export, verified", kExportSeals, false, true,
       absl::StatusCode::kOk},
      {"a corrupt export, verified", kExportSeals, true, true,
       absl::StatusCode::kDataLoss},
      {"an export that could still be written", kExportSeals & ~F_SEAL_WRITE,
       false, false, absl::StatusCode::kDataLoss},
      {"an export that could still be unsealed", kExportSeals & ~F_SEAL_SEAL,
       false, false, absl::StatusCode::kDataLoss},
  };
  for (const Case& test : cases) {
    SCOPED_TRACE(test.name);
    unlink(path.c_str());
    UniqueFd listener(socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    sockaddr_un address{};
    address.sun_family = AF_UNIX;
    std::strncpy(address.sun_path, path.c_str(), sizeof(address.sun_path) - 1);
    ASSERT_EQ(bind(listener.get(), reinterpret_cast<sockaddr*>(&address),
                   sizeof(address)),
              0);
    ASSERT_EQ(listen(listener.get(), 1), 0);
    std::thread daemon(
        [&] { ServeOneExport(listener.get(), test.seals, test.corrupt); });
    ClientOptions options;
    options.timeout = kCallTimeout;
    options.local_socket = path;
    options.verify_shared_memory = test.verify;
    // Nothing listens on TCP port 1: only the stand-in can answer.
    auto client = Client::Connect("127.0.0.1:1", options).value();
    absl::StatusOr<FetchedStateDict> fetched = client->StateDict({"m"});
    daemon.join();
    EXPECT_EQ(fetched.status().code(), test.expected) << fetched.status();
    if (fetched.ok()) {
      EXPECT_TRUE(AllEqual(fetched->state, 1.0f));
    }
  }
}

// What a killed client had sent when it died. kExport: it asked for an
// export and its manifest (with the descriptor) was on its way.
enum class KilledAfter { kFetch, kManifest, kRegion, kExport };

// Forks a client that speaks the protocol with raw system calls only (the
// child of a threaded process may not allocate), stops after `stage`, and is
// killed with SIGKILL.
void RunKilledClient(const std::string& path, uint64_t region_bytes,
                     KilledAfter stage,
                     const std::function<void()>& meanwhile) {
  std::string fetch_frame, region_frame;
  v1::LocalRequest fetch = FetchOf("m");
  fetch.mutable_fetch()->set_accept_export(stage == KilledAfter::kExport);
  for (auto [request, frame] :
       {std::make_pair(fetch, &fetch_frame),
        std::make_pair(RegionOf(region_bytes), &region_frame)}) {
    const std::string body = request.SerializeAsString();
    const uint32_t size = static_cast<uint32_t>(body.size());
    *frame = std::string(reinterpret_cast<const char*>(&size), 4) + body;
  }
  sockaddr_un address{};
  address.sun_family = AF_UNIX;
  std::strncpy(address.sun_path, path.c_str(), sizeof(address.sun_path) - 1);
  int ready[2];
  ASSERT_EQ(pipe(ready), 0);
  const pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    close(ready[0]);
    const int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    if (connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)))
      _exit(1);
    if (write(fd, fetch_frame.data(), fetch_frame.size()) < 0) _exit(1);
    if (stage != KilledAfter::kFetch) {
      char byte;
      if (read(fd, &byte, 1) != 1) _exit(1);  // The manifest is coming.
    }
    if (stage == KilledAfter::kRegion) {
      const int region = memfd_create("killed", MFD_ALLOW_SEALING);
      if (ftruncate(region, static_cast<off_t>(region_bytes)) ||
          fcntl(region, F_ADD_SEALS, F_SEAL_SHRINK))
        _exit(1);
      iovec iov{region_frame.data(), region_frame.size()};
      alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
      msghdr header{};
      header.msg_iov = &iov;
      header.msg_iovlen = 1;
      header.msg_control = control;
      header.msg_controllen = sizeof(control);
      cmsghdr* attached = CMSG_FIRSTHDR(&header);
      attached->cmsg_level = SOL_SOCKET;
      attached->cmsg_type = SCM_RIGHTS;
      attached->cmsg_len = CMSG_LEN(sizeof(int));
      std::memcpy(CMSG_DATA(attached), &region, sizeof(int));
      if (sendmsg(fd, &header, 0) < 0) _exit(1);
    }
    if (write(ready[1], "x", 1) != 1) _exit(1);
    pause();
    _exit(0);
  }
  close(ready[1]);
  char byte;
  EXPECT_EQ(read(ready[0], &byte, 1), 1) << "the client did not get going";
  close(ready[0]);
  meanwhile();
  kill(child, SIGKILL);
  int status = 0;
  EXPECT_EQ(waitpid(child, &status, 0), child);
}

TEST(LocalFetchTest, ClientKilledMidFetchLeavesNothingBehind) {
  ScratchDir dir;
  auto server = StartLocalServer(dir);
  constexpr int64_t kFloats = 4 << 20;  // 16 MiB per tensor, 256 MiB in all.
  LoadUniform(*server, "m", 16, kFloats, 1.0f);
  const std::string path = dir.file("modelstated.local");
  auto client = LocalClient(*server, path);
  FetchRequest small("m");
  small.keys = {"w0"};
  ASSERT_TRUE(client->StateDict(small).ok());  // Warms up lazy fds.
  ASSERT_TRUE(Eventually(
      [&] { return server->local_transfer()->active_connections() == 0; }));
  // The daemon's exports (one descriptor each, their bytes live) come and go
  // with versions; what a killed client held must not stay.
  const int baseline_fds = FdsWithoutExports(*server);
  const int64_t one_version = LiveWithoutExports(*server);
  const uint64_t region_bytes = 16 * kFloats * sizeof(float);
  float value = 1.0f;
  for (KilledAfter stage : {KilledAfter::kFetch, KilledAfter::kManifest,
                            KilledAfter::kRegion, KilledAfter::kExport}) {
    SCOPED_TRACE(static_cast<int>(stage));
    RunKilledClient(path, region_bytes, stage, [&] {
      // A client that has its manifest pins the snapshot while it lives: a
      // load now keeps two versions alive. (With the region sent, the
      // daemon may already be done, and then holds only the descriptor.)
      if (stage == KilledAfter::kFetch) return;
      value += 1.0f;
      LoadUniform(*server, "m", 16, kFloats, value);
      if (stage == KilledAfter::kManifest) {
        EXPECT_GE(LiveWithoutExports(*server), 2 * one_version);
      }
    });
    EXPECT_TRUE(Eventually([&] {
      return server->local_transfer()->active_connections() == 0 &&
             FdsWithoutExports(*server) == baseline_fds &&
             LiveWithoutExports(*server) == one_version;
    })) << "fds "
        << FdsWithoutExports(*server) << " (before " << baseline_fds
        << "), live " << LiveWithoutExports(*server) << " (one version "
        << one_version << "), connections "
        << server->local_transfer()->active_connections();
  }
  absl::StatusOr<FetchedStateDict> fetched = client->StateDict({"m"});
  ASSERT_TRUE(fetched.ok()) << fetched.status();
  EXPECT_TRUE(AllEqual(fetched->state, value));
}

}  // namespace
}  // namespace modelstate

namespace modelstate {
namespace {

// LocalTransferServer on its own, with options a Server does not set.
class LocalTransferServerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    LoadRequest load("m");
    load.create_if_missing = true;
    ASSERT_TRUE(store_.Load(load, Uniform(2, 1000, 4.0f)).ok());
  }

  std::unique_ptr<LocalTransferServer> Start(LocalTransferOptions options) {
    options.path = dir_.file("local");
    absl::StatusOr<std::unique_ptr<LocalTransferServer>> server =
        LocalTransferServer::Start(&store_, std::move(options));
    EXPECT_TRUE(server.ok()) << server.status();
    return server.ok() ? std::move(*server) : nullptr;
  }

  ScratchDir dir_;
  ModelStore store_;
};

TEST_F(LocalTransferServerTest, SocketGetsTheModeAsked) {
  LocalTransferOptions options;
  options.socket_mode = 0600;
  auto server = Start(options);
  struct stat info {};
  ASSERT_EQ(stat(dir_.file("local").c_str(), &info), 0);
  EXPECT_EQ(info.st_mode & 0777, 0600u);
}

TEST_F(LocalTransferServerTest, ConnectionsBeyondTheLimitAreRefused) {
  LocalTransferOptions options;
  options.max_connections = 1;
  auto server = Start(options);
  RawConnection first(dir_.file("local"));
  ASSERT_TRUE(AfterManifest(first).ok());  // Being served.
  RawConnection second(dir_.file("local"));
  absl::StatusOr<v1::LocalResponse> refused = second.Receive();
  ASSERT_TRUE(refused.ok()) << refused.status();
  EXPECT_EQ(FromLocalStatus(refused->error()).code(),
            absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(server->active_connections(), 1);
}

TEST_F(LocalTransferServerTest, IdleConnectionIsClosedAndReleasesItsVersion) {
  LocalTransferOptions options;
  options.idle_timeout = absl::Milliseconds(200);
  auto server = Start(options);
  const int64_t one_version = store_.live_bytes();
  RawConnection idle(dir_.file("local"));
  ASSERT_TRUE(AfterManifest(idle).ok());  // Holds version 1 from here.
  LoadRequest load("m");
  ASSERT_TRUE(store_.Load(load, Uniform(2, 1000, 5.0f)).ok());
  EXPECT_EQ(store_.live_bytes(), 2 * one_version);
  EXPECT_TRUE(Eventually([&] {
    return server->active_connections() == 0 &&
           store_.live_bytes() == one_version;
  })) << store_.live_bytes();
  EXPECT_EQ(idle.Receive().status().code(), absl::StatusCode::kOutOfRange);
}

TEST_F(LocalTransferServerTest, BadOptionsAreRefused) {
  for (auto change : std::vector<std::function<void(LocalTransferOptions&)>>{
           [](LocalTransferOptions& o) { o.max_connections = 0; },
           [](LocalTransferOptions& o) { o.max_connections_per_uid = -1; },
           [](LocalTransferOptions& o) {
             o.idle_timeout = absl::ZeroDuration();
           },
           [](LocalTransferOptions& o) {
             o.request_timeout = absl::ZeroDuration();
           },
           [](LocalTransferOptions& o) {
             o.authorization_timeout = absl::ZeroDuration();
           },
           [](LocalTransferOptions& o) { o.path = std::string(200, 'x'); },
       }) {
    LocalTransferOptions options;
    options.path = dir_.file("local");
    change(options);
    EXPECT_EQ(LocalTransferServer::Start(&store_, options).status().code(),
              absl::StatusCode::kInvalidArgument);
  }
}

// Hostile peers of a daemon whose bounds are small enough to watch act:
// each case says what its peer got, or what went wrong.
constexpr absl::Duration kRequestTimeout = absl::Seconds(1);
constexpr absl::Duration kAuthorizationTimeout = absl::Seconds(2);
constexpr int kSlotsPerUid = 3;
// How long a hostile peer waits for the daemon to act: well past the bounds
// above, well short of the idle timeout (the default, 60 s), so a peer that
// is cut off was cut off by a bound that counts total time.
constexpr absl::Duration kPatience = absl::Seconds(5);
// Resident memory that may come and go in this process while a case runs
// (other threads, allocator caches): far less than any case's frames.
constexpr int64_t kResidentNoise = int64_t{8} << 20;

// This process's resident memory (VmRSS): it is the daemon's.
int64_t ResidentBytes() {
  std::ifstream status("/proc/self/status");
  for (std::string line; std::getline(status, line);) {
    if (absl::StartsWith(line, "VmRSS:"))
      return std::stoll(line.substr(6)) * 1024;  // Given in kB.
  }
  return -1;
}

// A frame's 4-byte length header announcing `size` bytes, and no body.
std::string LengthOnly(uint32_t size) {
  return std::string(reinterpret_cast<const char*>(&size), 4);
}

// The bytes of `request` as one frame.
std::string FrameOf(const v1::LocalRequest& request) {
  const std::string body = request.SerializeAsString();
  return LengthOnly(static_cast<uint32_t>(body.size())) + body;
}

// OK when the daemon answered with an error of `code` whose message has
// `text`.
absl::Status ExpectError(const absl::StatusOr<v1::LocalResponse>& answer,
                         absl::StatusCode code, absl::string_view text = "") {
  if (!answer.ok()) return answer.status();
  const absl::Status error = FromLocalStatus(answer->error());
  if (!answer->has_error() || error.code() != code ||
      !absl::StrContains(error.message(), text))
    return absl::InternalError("unexpected answer: " + answer->DebugString());
  return absl::OkStatus();
}

// OK when the daemon has closed `peer` (or closes it within the peer's
// timeout), sending nothing more.
absl::Status ExpectClosed(RawConnection& peer) {
  const absl::StatusCode code = peer.Receive().status().code();
  if (code == absl::StatusCode::kOutOfRange ||
      code == absl::StatusCode::kUnavailable)
    return absl::OkStatus();
  return absl::InternalError(
      absl::StrCat("the daemon did not close the connection: ",
                   absl::StatusCodeToString(code)));
}

// Has `peer` make one authorized fetch (of the export, which ends it): the
// connection then counts as authorized and is governed by the idle timeout.
absl::Status FetchAuthorized(RawConnection& peer) {
  v1::LocalRequest request = FetchOf("m", "right");
  request.mutable_fetch()->set_accept_export(true);
  peer.Send(request);
  v1::LocalResponse answer;
  UniqueFd exported;
  absl::Status read =
      ReadLocalFrame(peer.fd(), kMaxLocalFrameBytes, &answer, &exported);
  if (read.ok() && !answer.has_manifest())
    return absl::InternalError("no manifest: " + answer.DebugString());
  return read;
}

// Announces frames of `size` bytes from `peers` connections at once; OK when
// each is refused as too large and the daemon's memory did not grow by them.
absl::Status AnnounceFrames(const std::string& path, int peers, uint32_t size) {
  const int64_t before = ResidentBytes();
  std::vector<std::unique_ptr<RawConnection>> connections;
  for (int i = 0; i < peers; ++i) {
    connections.push_back(std::make_unique<RawConnection>(path, kPatience));
    connections.back()->SendBytes(LengthOnly(size));
  }
  absl::Status refused;
  for (auto& peer : connections) {
    const absl::Status answer = ExpectError(
        peer->Receive(), absl::StatusCode::kInvalidArgument, "limit");
    if (refused.ok()) refused = answer;
  }
  const int64_t grown = ResidentBytes() - before;
  if (grown > kResidentNoise) {
    return absl::InternalError(absl::StrCat("resident memory grew by ", grown,
                                            " bytes; ", refused.ToString()));
  }
  return refused;
}

// Sends the next request one byte every 200 ms on a connection past its
// authorization, so that only the request bound can stop it.
absl::Status TrickleARequest(const std::string& path) {
  RawConnection peer(path, kPatience);
  RETURN_IF_ERROR(FetchAuthorized(peer));
  const std::string frame = FrameOf(FetchOf("m", std::string(40, 't')));
  const absl::Time start = absl::Now();
  for (char byte : frame) {
    if (send(peer.fd(), &byte, 1, MSG_NOSIGNAL) != 1) {
      const absl::Duration took = absl::Now() - start;
      if (took < kRequestTimeout || took > kPatience)
        return absl::InternalError(
            absl::StrCat("cut off after ", absl::FormatDuration(took)));
      return absl::OkStatus();
    }
    absl::SleepFor(absl::Milliseconds(200));
  }
  return absl::InternalError(
      absl::StrCat("a request trickled in over ",
                   absl::FormatDuration(absl::Now() - start)));
}

// Connects and sends nothing: closed once unauthorized for too long, long
// before the idle timeout.
absl::Status StaySilent(const std::string& path) {
  const absl::Time start = absl::Now();  // No later than the accept.
  RawConnection peer(path, kPatience);
  RETURN_IF_ERROR(ExpectClosed(peer));
  if (absl::Now() - start < kAuthorizationTimeout)
    return absl::InternalError("closed before the authorization timeout");
  return absl::OkStatus();
}

// Keeps sending requests that are refused, each in good time: the connection
// still goes once it has been unauthorized for too long.
absl::Status KeepBeingRefused(const std::string& path) {
  RawConnection peer(path, kPatience);
  const std::string refused = FrameOf(FetchOf("m", "wrong"));
  const absl::Time give_up = absl::Now() + kPatience;
  while (absl::Now() < give_up) {
    if (send(peer.fd(), refused.data(), refused.size(), MSG_NOSIGNAL) < 0)
      return absl::OkStatus();  // Closed before this request.
    absl::StatusOr<v1::LocalResponse> answer = peer.Receive();
    if (!answer.ok()) return ExpectClosed(peer);
    RETURN_IF_ERROR(
        ExpectError(answer, absl::StatusCode::kPermissionDenied, "token"));
    absl::SleepFor(absl::Milliseconds(300));
  }
  return absl::InternalError("refused requests kept the connection open");
}

// Takes every slot its uid may have (with authorized connections, which the
// idle timeout alone would end) and asks for one more: refused by the per-uid
// cap while the server has slots free, and a client falls back to gRPC.
absl::Status TakeEverySlotOfTheUid(const std::string& path,
                                   const LocalTransferServer& server) {
  std::vector<std::unique_ptr<RawConnection>> held;
  for (int i = 0; i < kSlotsPerUid; ++i) {
    held.push_back(std::make_unique<RawConnection>(path, kPatience));
    RETURN_IF_ERROR(FetchAuthorized(*held.back()));
  }
  RawConnection extra(path, kPatience);
  RETURN_IF_ERROR(ExpectError(extra.Receive(),
                              absl::StatusCode::kResourceExhausted,
                              absl::StrCat("uid ", getuid())));
  if (server.active_connections() != kSlotsPerUid)
    return absl::InternalError("the cap was not what refused");
  LocalFetchSettings settings;
  settings.socket_path = path;
  settings.token = "right";
  settings.timeout = kPatience;
  v1::StateDictRequest whole;
  whole.set_model("m");
  ASSIGN_OR_RETURN(absl::optional<LocalFetched> fetched,
                   FetchLocally(settings, whole));
  if (fetched.has_value())
    return absl::InternalError("a fetch got a slot past the cap");
  return absl::OkStatus();
}

TEST_F(LocalTransferServerTest, HostilePeersAreCutOffAndRealFetchesGoOn) {
  LocalTransferOptions options;
  options.authorize = [](const LocalPeer&, const std::string& token,
                         const FetchRequest&) {
    return token == "right" ? absl::OkStatus()
                            : absl::PermissionDeniedError("wrong token");
  };
  options.max_connections = 8;
  options.max_connections_per_uid = kSlotsPerUid;
  options.request_timeout = kRequestTimeout;
  options.authorization_timeout = kAuthorizationTimeout;
  auto server = Start(options);
  ASSERT_NE(server, nullptr);
  const std::string path = dir_.file("local");
  LocalFetchSettings settings;
  settings.socket_path = path;
  settings.token = "right";
  settings.timeout = kCallTimeout;
  settings.accept_exports = false;  // Both request frames of a fetch.
  v1::StateDictRequest whole;
  whole.set_model("m");
  struct Case {
    const char* name;
    std::function<absl::Status()> peer;
  };
  const std::vector<Case> cases = {
      {"announces a 1 GiB frame",
       [&] { return AnnounceFrames(path, 1, 1u << 30); }},
      {"announces 16 MiB frames from every slot of its uid",
       [&] { return AnnounceFrames(path, kSlotsPerUid, 16u << 20); }},
      {"announces a frame just past the request bound",
       [&] { return AnnounceFrames(path, 1, kMaxLocalRequestBytes + 1); }},
      {"trickles a request, a byte every 200 ms",
       [&] { return TrickleARequest(path); }},
      {"connects and sends nothing", [&] { return StaySilent(path); }},
      {"keeps sending refused requests",
       [&] { return KeepBeingRefused(path); }},
      {"takes every slot of its uid and asks for one more",
       [&] { return TakeEverySlotOfTheUid(path, *server); }},
  };
  for (const Case& test : cases) {
    SCOPED_TRACE(test.name);
    // The last case's real fetch may still hold its slot for a moment.
    ASSERT_TRUE(Eventually([&] { return server->active_connections() == 0; }));
    const absl::Status outcome = test.peer();
    EXPECT_TRUE(outcome.ok()) << outcome;
    EXPECT_TRUE(Eventually([&] { return server->active_connections() == 0; }))
        << server->active_connections() << " connections left";
    absl::StatusOr<absl::optional<LocalFetched>> fetched =
        FetchLocally(settings, whole);
    ASSERT_TRUE(fetched.ok()) << fetched.status();
    ASSERT_TRUE(fetched->has_value());
    ASSERT_EQ((*fetched)->tensors.size(), 2u);
    EXPECT_EQ((*fetched)->tensors[1].data_as<float>()[999], 4.0f);
  }
}

}  // namespace
}  // namespace modelstate

// Hostile requests over the wire against a real modelstated: each row of the
// table is one attack, answered with its status code, after which the daemon
// must still answer a health check and a fetch, and no stored model may have
// changed. After the whole table, with every client gone, the daemon's RSS must
// be back within 10% of where it started.
//
// The daemon runs with an auth policy. Rows carry the credential their
// requests present: the admin's token for most, so that the attack reaches
// what it attacks, and missing, wrong, malformed, too weak or other-model
// credentials for the credential rows.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <fstream>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "access/access_policy.h"
#include "common/limits.h"
#include "common/sanitizers.h"
#include "gmock/gmock.h"
#include "grpcpp/create_channel.h"
#include "gtest/gtest.h"
#include "modelstate/v1/model_state.grpc.pb.h"
#include "proto/convert.h"
#include "tests/proxy.h"
#include "tests/test_support.h"
#include "xxhash.h"

namespace modelstate {
namespace {

using ::testing::HasSubstr;
using testing_support::ConnectToLoopback;
using testing_support::Daemon;
using testing_support::MetricsPort;
using testing_support::MetricValue;
using testing_support::SendAll;
using testing_support::WaitUntil;

constexpr int64_t kMemoryLimit = 256 << 20;
// The policy's principals: admin of everything (the checking client and most
// rows), reader of "victim", writer of other models only.
constexpr char kAdminToken[] = "abuse-admin-token";
constexpr char kReaderToken[] = "abuse-reader-token";
constexpr char kOtherToken[] = "abuse-other-model-token";

std::string PolicyJson() {
  const auto principal = [](const char* name, const char* token,
                            const char* models, const char* role) {
    return absl::StrCat(R"({"name": ")", name, R"(", "token_sha256": [")",
                        Sha256Hex(token), R"("], "roles": [{"models": ")",
                        models, R"(", "role": ")", role, R"("}]})");
  };
  return absl::StrCat(R"({"version": 1, "principals": [)",
                      principal("admin", kAdminToken, "*", "admin"), ", ",
                      principal("reader", kReaderToken, "victim", "read"), ", ",
                      principal("other", kOtherToken, "other-*", "write"),
                      "]}");
}
constexpr int kMaxPendingLoads = 4;
// Stalled streams are ended after this (--stream_idle_timeout).
constexpr absl::Duration kIdleTimeout = absl::Seconds(2);
// Every call of an attack gets this deadline: far beyond what any needs.
constexpr absl::Duration kAttackDeadline = absl::Seconds(60);
constexpr uint32_t kChunk = kDefaultMinChunkBytes;

// The daemon's resident set in bytes, from /proc/PID/status; 0 if unknown.
int64_t ResidentBytes(pid_t pid) {
  std::ifstream status(absl::StrCat("/proc/", pid, "/status"));
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("VmRSS:", 0) == 0) {
      return std::strtoll(line.c_str() + 6, nullptr, 10) * 1024;
    }
  }
  return 0;
}

// What an attack uses: the daemon's address, the row's credential, and a
// victim model's state as a well-formed load of it would send it.
class Attacker {
 public:
  Attacker(const std::string& address, int port, std::string credential,
           const v1::LoadHeader& victim, std::string victim_data)
      : address_(address),
        port_(port),
        credential_(std::move(credential)),
        victim_(victim),
        victim_data_(std::move(victim_data)) {
    grpc::ChannelArguments args;
    args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
    channel_ = grpc::CreateCustomChannel(
        address_, grpc::InsecureChannelCredentials(), args);
    stub_ = v1::ModelState::NewStub(channel_);
  }

  int port() const { return port_; }
  v1::ModelState::Stub& stub() { return *stub_; }
  // A fresh channel of its own (a separate connection). With
  // `window_bytes`, each stream's flow-control window is fixed at that size
  // instead of grown by gRPC's bandwidth probing: a client that stops reading
  // then really stops the server's writes.
  std::unique_ptr<v1::ModelState::Stub> NewStub(int window_bytes = 0) const {
    grpc::ChannelArguments args;
    args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
    if (window_bytes > 0) {
      args.SetInt(GRPC_ARG_HTTP2_BDP_PROBE, 0);
      args.SetInt(GRPC_ARG_HTTP2_STREAM_LOOKAHEAD_BYTES, window_bytes);
    }
    return v1::ModelState::NewStub(grpc::CreateCustomChannel(
        address_, grpc::InsecureChannelCredentials(), args));
  }

  // A context carrying the row's credential, with a bounded deadline.
  std::unique_ptr<grpc::ClientContext> Context() const {
    auto context = std::make_unique<grpc::ClientContext>();
    context->set_deadline(std::chrono::system_clock::now() +
                          absl::ToChronoSeconds(kAttackDeadline));
    if (!credential_.empty())
      context->AddMetadata("authorization", credential_);
    return context;
  }

  // The victim's header and bytes: a correct load of "victim" would be this.
  v1::LoadHeader VictimHeader() const { return victim_; }
  const std::string& victim_data() const { return victim_data_; }

 private:
  std::string address_;
  int port_;
  std::string credential_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::ModelState::Stub> stub_;
  v1::LoadHeader victim_;
  std::string victim_data_;
};

// ---- Message builders ----

v1::LoadStateDictRequest Header(const v1::LoadHeader& header) {
  v1::LoadStateDictRequest request;
  *request.mutable_header() = header;
  return request;
}

v1::LoadStateDictRequest Chunk(uint64_t offset, std::string data) {
  v1::LoadStateDictRequest request;
  request.mutable_chunk()->set_offset(offset);
  request.mutable_chunk()->set_data(std::move(data));
  return request;
}

v1::LoadStateDictRequest End(uint64_t total) {
  v1::LoadStateDictRequest request;
  request.mutable_end()->set_total_bytes(total);
  return request;
}

// `data` cut into kChunk chunks from `offset`.
std::vector<v1::LoadStateDictRequest> Chunks(const std::string& data,
                                             uint64_t offset = 0) {
  std::vector<v1::LoadStateDictRequest> out;
  for (uint64_t at = 0; at < data.size(); at += kChunk)
    out.push_back(Chunk(offset + at, data.substr(at, kChunk)));
  return out;
}

template <typename... Parts>
std::vector<v1::LoadStateDictRequest> Messages(Parts... parts) {
  std::vector<v1::LoadStateDictRequest> out;
  auto add = [&](auto&& part) {
    using T = std::decay_t<decltype(part)>;
    if constexpr (std::is_same_v<T, v1::LoadStateDictRequest>) {
      out.push_back(part);
    } else {
      out.insert(out.end(), part.begin(), part.end());
    }
  };
  (add(parts), ...);
  return out;
}

// A load creating `model` from zero-byte float32 tensors named by `key(i)`.
v1::LoadHeader EmptyTensorsHeader(const std::string& model, int count,
                                  const std::function<std::string(int)>& key) {
  v1::LoadHeader header;
  header.set_model(model);
  header.set_create_if_missing(true);
  const uint64_t empty = XXH3_64bits(nullptr, 0);
  header.mutable_tensors()->Reserve(count);
  for (int i = 0; i < count; ++i) {
    v1::TensorInfo* info = header.add_tensors();
    info->set_name(key(i));
    info->set_kind(v1::PARAMETER);
    info->set_dtype(v1::FLOAT32);
    info->add_shape(0);
    info->set_xxh3_64(empty);
  }
  return header;
}

// A creating load of one float32 tensor `key` of `elements` elements.
v1::LoadHeader OneTensorHeader(const std::string& model, const std::string& key,
                               std::vector<int64_t> shape) {
  v1::LoadHeader header;
  header.set_model(model);
  header.set_create_if_missing(true);
  v1::TensorInfo* info = header.add_tensors();
  info->set_name(key);
  info->set_kind(v1::PARAMETER);
  info->set_dtype(v1::FLOAT32);
  uint64_t bytes = 4;
  for (int64_t d : shape) {
    info->add_shape(d);
    bytes *= static_cast<uint64_t>(d);
  }
  info->set_num_bytes(bytes);
  header.set_total_bytes(bytes);
  return header;
}

// ---- Attacks' building blocks: each returns the status the client saw ----

// Sends `messages` on one load stream; `close` ends the client's side (else
// the stream stays open and only the server can end it).
grpc::Status Load(Attacker& a,
                  const std::vector<v1::LoadStateDictRequest>& messages,
                  bool close = true) {
  auto context = a.Context();
  v1::LoadStateDictResponse response;
  auto writer = a.stub().LoadStateDict(context.get(), &response);
  for (const auto& message : messages) {
    if (!writer->Write(message)) break;
  }
  if (close) writer->WritesDone();
  return writer->Finish();
}

grpc::Status Create(Attacker& a, const std::string& model,
                    const std::string& spec) {
  auto context = a.Context();
  v1::CreateModelRequest request;
  request.set_model(model);
  request.set_architecture_json(spec);
  v1::CreateModelResponse response;
  return a.stub().CreateModel(context.get(), request, &response);
}

// Reads a whole fetch; `check` sees every message and may fail the attack.
grpc::Status Fetch(
    Attacker& a, const v1::StateDictRequest& request,
    const std::function<grpc::Status(const v1::StateDictResponse&)>& check =
        nullptr) {
  auto context = a.Context();
  auto reader = a.stub().StateDict(context.get(), request);
  v1::StateDictResponse response;
  grpc::Status failed;
  while (reader->Read(&response)) {
    if (check && failed.ok()) failed = check(response);
  }
  grpc::Status status = reader->Finish();
  return status.ok() ? failed : status;
}

v1::StateDictRequest FetchOf(const std::string& model) {
  v1::StateDictRequest request;
  request.set_model(model);
  return request;
}

// A gRPC client's view of a connection the server closed with GOAWAY.
grpc::Status FromFlood(int goaway) {
  if (goaway == testing_support::kEnhanceYourCalm) {
    return grpc::Status(grpc::UNAVAILABLE, "GOAWAY ENHANCE_YOUR_CALM");
  }
  return grpc::Status(grpc::OK, absl::StrCat("flood ended with ", goaway));
}

// Writes `bytes` that are not HTTP/2 to the port; UNAVAILABLE once the server
// closes the connection.
grpc::Status Garbage(int port, const std::string& bytes) {
  const int fd = ConnectToLoopback(port);
  if (fd < 0) return grpc::Status(grpc::INTERNAL, "could not connect");
  SendAll(fd, bytes.data(), bytes.size());
  timeval timeout{10, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout));
  char buffer[4096];
  ssize_t n;
  while ((n = recv(fd, buffer, sizeof(buffer), 0)) > 0) {
  }
  const bool closed = n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK);
  close(fd);
  return closed ? grpc::Status(grpc::UNAVAILABLE, "connection closed")
                : grpc::Status(grpc::OK, "connection still open");
}

// `count` loads of the victim that stall after their header, then one more
// whose status is returned; the stalled ones are cancelled afterwards.
grpc::Status StalledLoadsThenOneMore(Attacker& a, int count) {
  struct Stalled {
    std::unique_ptr<v1::ModelState::Stub> stub;
    std::unique_ptr<grpc::ClientContext> context;
    v1::LoadStateDictResponse response;
    std::unique_ptr<grpc::ClientWriter<v1::LoadStateDictRequest>> writer;
  };
  std::vector<Stalled> stalled(count);
  for (Stalled& s : stalled) {
    s.stub = a.NewStub();
    s.context = a.Context();
    s.writer = s.stub->LoadStateDict(s.context.get(), &s.response);
    s.writer->Write(Header(a.VictimHeader()));
  }
  // Their headers are handled on other connections: give them a moment to
  // take their places (well within the idle timeout that would end them).
  absl::SleepFor(kIdleTimeout / 4);
  grpc::Status status = Load(a, {Header(a.VictimHeader())}, /*close=*/false);
  for (Stalled& s : stalled) {
    s.context->TryCancel();
    s.writer->Finish().ok();
  }
  return status;
}

// Tries StalledLoadsThenOneMore up to three times: on a loaded machine a
// stalled header may not have taken its place in time, and the one more is
// then let in (and ends stalled itself).
grpc::Status BeyondPendingLoads(Attacker& a, int count) {
  grpc::Status status;
  for (int attempt = 0; attempt < 3; ++attempt) {
    status = StalledLoadsThenOneMore(a, count);
    if (status.error_code() == grpc::RESOURCE_EXHAUSTED) break;
  }
  return status;
}

// `count` watchers of `model` that never read, on connections of their own,
// while `churn` makes events; they are cancelled afterwards and the status of
// the last is returned.
grpc::Status NonReadingWatchers(Attacker& a, int count,
                                const std::function<void()>& churn) {
  struct Watcher {
    std::unique_ptr<v1::ModelState::Stub> stub;
    std::unique_ptr<grpc::ClientContext> context;
    std::unique_ptr<grpc::ClientReader<v1::WatchModelResponse>> reader;
  };
  std::vector<Watcher> watchers(count);
  v1::WatchModelRequest request;
  request.set_model("churn");
  for (Watcher& w : watchers) {
    w.stub = a.NewStub();
    w.context = a.Context();
    w.reader = w.stub->WatchModel(w.context.get(), request);
  }
  churn();
  grpc::Status status;
  for (Watcher& w : watchers) {
    w.context->TryCancel();
    status = w.reader->Finish();
  }
  return status;
}

// A fetch of `model` that reads its first message and then nothing: the
// version it pins must be let go after the idle timeout.
grpc::Status NonReadingFetch(Attacker& a, const std::string& model) {
  auto context = a.Context();
  v1::StateDictRequest request = FetchOf(model);
  request.set_chunk_bytes(kChunk);
  auto stub = a.NewStub(kChunk);
  auto reader = stub->StateDict(context.get(), request);
  v1::StateDictResponse response;
  reader->Read(&response);
  // Well past the idle timeout, so that a loaded machine's watchdog has had
  // its turn too.
  absl::SleepFor(kIdleTimeout * 3);
  while (reader->Read(&response)) {
  }
  return reader->Finish();
}

// Checks that every chunk but the last of a fetch carries at least kChunk.
std::function<grpc::Status(const v1::StateDictResponse&)> ChunksAtLeastMinimum(
    uint64_t total) {
  auto received = std::make_shared<uint64_t>(0);
  return [received, total](const v1::StateDictResponse& response) {
    if (!response.has_chunk()) return grpc::Status::OK;
    const uint64_t size = response.chunk().data().size();
    *received += size;
    if (size < kChunk && *received != total) {
      return grpc::Status(grpc::INTERNAL,
                          absl::StrCat("chunk of ", size, " bytes"));
    }
    return grpc::Status::OK;
  };
}

std::string Nested(int depth) {
  std::string spec;
  for (int i = 0; i < depth; ++i)
    spec += R"({"type": "Sequential", "modules": [)";
  spec += R"({"type": "ReLU"})";
  for (int i = 0; i < depth; ++i) spec += "]}";
  return spec;
}

struct Row {
  std::string name;
  // What the requests present in the `authorization` header; "" for nothing.
  std::string credential;
  std::function<grpc::Status(Attacker&)> attack;
  grpc::StatusCode code;
  std::string message;  // A substring of the status message; "" for any.
};

// ---- The table ----

std::vector<Row> Rows(const std::function<void()>& churn) {
  using A = Attacker;
  // The daemon runs with an auth policy; every attack but the credential
  // rows presents the admin's token, so that it reaches what it attacks.
  const std::string admin = absl::StrCat("Bearer ", kAdminToken);
  auto victim_load = [](A& a, auto edit) {
    v1::LoadHeader header = a.VictimHeader();
    edit(header);
    return Load(a, {Header(header)});
  };
  return {
      // Crash reproducers.
      {"spec nested 10,000 deep", admin,
       [](A& a) { return Create(a, "x", Nested(10000)); },
       grpc::INVALID_ARGUMENT, "kMaxSpecDepth"},
      {"creating load of one key of 100,000 dotted components", admin,
       [](A& a) {
         std::string key = "a";
         for (int i = 1; i < 100000; ++i) key += ".a";
         return Load(a, {Header(OneTensorHeader("x", key, {1}))});
       },
       grpc::INVALID_ARGUMENT, "kMaxKeyLength"},
      {"key of 300 dotted components within the length bound", admin,
       [](A& a) {
         std::string key = "a";
         for (int i = 1; i < 300; ++i) key += ".a";
         return Load(a, {Header(OneTensorHeader("x", key, {1}))});
       },
       grpc::INVALID_ARGUMENT, "kMaxKeyComponents"},
      {"Conv fan-in overflow", admin,
       [](A& a) {
         return Create(a, "x",
                       R"({"type": "Conv3d", "in_channels": 4611686018427387904,
                           "out_channels": 1, "kernel_size": [1, 4, 4]})");
       },
       grpc::INVALID_ARGUMENT, "overflows"},
      {"Linear of 2^62 x 4 weights", admin,
       [](A& a) {
         return Create(
             a, "x", R"({"type": "Linear", "args": [4611686018427387904, 4]})");
       },
       grpc::INVALID_ARGUMENT, "overflows"},
      {"padding_idx of 2^64-1", admin,
       [](A& a) {
         return Create(a, "x",
                       R"({"type": "Embedding", "args": [4, 2],
                           "padding_idx": 18446744073709551615})");
       },
       grpc::INVALID_ARGUMENT, "int64"},
      // Memory-limit bypasses.
      {"spec of 40 GB under a 256 MiB limit", admin,
       [](A& a) {
         return Create(a, "x",
                       R"({"type": "Linear", "args": [100000, 100000]})");
       },
       grpc::RESOURCE_EXHAUSTED, "memory limit"},
      {"1,000,000 zero-byte tensors", admin,
       [](A& a) {
         return Load(a, {Header(EmptyTensorsHeader("x", 1000000, [](int i) {
                       return absl::StrCat("t", i);
                     }))});
       },
       grpc::RESOURCE_EXHAUSTED, "memory limit"},
      {"1,000,000 tiny modules", admin,
       [](A& a) {
         return Load(a, {Header(EmptyTensorsHeader("x", 1000000, [](int i) {
                       return absl::StrCat("m", i, ".t");
                     }))});
       },
       grpc::RESOURCE_EXHAUSTED, "memory limit"},
      {"spec text over kMaxSpecBytes", admin,
       [](A& a) {
         std::string spec = R"({"type": "ModuleList", "modules": [)";
         while (spec.size() < (2u << 20)) spec += R"({"type": "Identity"},)";
         return Create(a, "x", spec + R"({"type": "Identity"}]})");
       },
       grpc::INVALID_ARGUMENT, "kMaxSpecBytes"},
      {"pinned snapshot held by a fetch that never reads", admin,
       [](A& a) { return NonReadingFetch(a, "big"); }, grpc::CANCELLED, ""},
      {"load larger than the memory limit", admin,
       [](A& a) {
         return Load(a, {Header(OneTensorHeader("x", "w", {80 << 20}))});
       },
       grpc::RESOURCE_EXHAUSTED, "memory limit"},
      // Stalled and slow clients.
      {"header, then nothing", admin,
       [](A& a) { return Load(a, {Header(a.VictimHeader())}, false); },
       grpc::DEADLINE_EXCEEDED, "sent nothing"},
      {"creating header reserving 128 MiB, then nothing", admin,
       [](A& a) {
         return Load(a, {Header(OneTensorHeader("x", "w", {32 << 20}))}, false);
       },
       grpc::DEADLINE_EXCEEDED, "sent nothing"},
      {"one chunk, then nothing", admin,
       [](A& a) {
         return Load(a,
                     {Header(a.VictimHeader()),
                      Chunks(a.victim_data().substr(0, kChunk))[0]},
                     false);
       },
       grpc::DEADLINE_EXCEEDED, "sent nothing"},
      {"more stalled loads than --max_pending_loads", admin,
       [](A& a) { return BeyondPendingLoads(a, kMaxPendingLoads); },
       grpc::RESOURCE_EXHAUSTED, "loads are in flight"},
      {"load in 1-byte chunks", admin,
       [](A& a) {
         return Load(a, {Header(a.VictimHeader()),
                         Chunk(0, a.victim_data().substr(0, 1)),
                         Chunk(1, a.victim_data().substr(1, 1))});
       },
       grpc::INVALID_ARGUMENT, "smaller than the minimum"},
      {"load of empty chunks", admin,
       [](A& a) {
         return Load(a, {Header(a.VictimHeader()), Chunk(0, ""), Chunk(0, "")});
       },
       grpc::INVALID_ARGUMENT, "smaller than the minimum"},
      {"fetch asking for 1-byte chunks gets the minimum", admin,
       [](A& a) {
         v1::StateDictRequest request = FetchOf("victim");
         request.set_chunk_bytes(1);
         return Fetch(a, request, ChunksAtLeastMinimum(a.victim_data().size()));
       },
       grpc::OK, ""},
      {"200 watchers that never read while a model churns", admin,
       [churn](A& a) { return NonReadingWatchers(a, 200, churn); },
       grpc::CANCELLED, ""},
      {"pings every 10 ms", admin,
       [](A& a) {
         return FromFlood(testing_support::PingFlood(
             a.port(), absl::Milliseconds(10), absl::Seconds(30)));
       },
       grpc::UNAVAILABLE, "ENHANCE_YOUR_CALM"},
      {"bytes that are not HTTP/2", admin,
       [](A& a) {
         return Garbage(a.port(), "GET / HTTP/1.1\r\nHost: x\r\n\r\n" +
                                      std::string(100000, 'z'));
       },
       grpc::UNAVAILABLE, "closed"},
      // Malformed load streams.
      {"chunk before the header", admin,
       [](A& a) { return Load(a, Chunks(a.victim_data())); },
       grpc::INVALID_ARGUMENT, "must start with its header"},
      {"end before the header", admin, [](A& a) { return Load(a, {End(0)}); },
       grpc::INVALID_ARGUMENT, "must start with its header"},
      {"two headers", admin,
       [](A& a) {
         return Load(a, {Header(a.VictimHeader()), Header(a.VictimHeader())});
       },
       grpc::INVALID_ARGUMENT, "only one header"},
      {"empty message", admin,
       [](A& a) {
         return Load(a, {Header(a.VictimHeader()), v1::LoadStateDictRequest()});
       },
       grpc::INVALID_ARGUMENT, "empty load message"},
      {"gap between chunks", admin,
       [](A& a) {
         const std::string& d = a.victim_data();
         return Load(a,
                     {Header(a.VictimHeader()), Chunk(0, d.substr(0, kChunk)),
                      Chunk(kChunk + 8, d.substr(kChunk + 8, kChunk))});
       },
       grpc::INVALID_ARGUMENT, "missing bytes"},
      {"overlapping chunks", admin,
       [](A& a) {
         const std::string& d = a.victim_data();
         return Load(a,
                     {Header(a.VictimHeader()), Chunk(0, d.substr(0, kChunk)),
                      Chunk(kChunk - 8, d.substr(kChunk - 8, kChunk))});
       },
       grpc::INVALID_ARGUMENT, "overlap"},
      {"chunk past the declared size", admin,
       [](A& a) {
         return Load(a, Messages(Header(a.VictimHeader()),
                                 Chunks(a.victim_data() + "tail")));
       },
       grpc::INVALID_ARGUMENT, "runs past the end"},
      {"end marker disagrees", admin,
       [](A& a) {
         const std::string& d = a.victim_data();
         return Load(a, Messages(Header(a.VictimHeader()), Chunks(d),
                                 End(d.size() + 1)));
       },
       grpc::INVALID_ARGUMENT, ""},
      {"end marker before all the data", admin,
       [](A& a) {
         const std::string& d = a.victim_data();
         return Load(a,
                     Messages(Header(a.VictimHeader()),
                              Chunks(d.substr(0, 2 * kChunk)), End(d.size())));
       },
       grpc::INVALID_ARGUMENT, ""},
      {"truncated stream", admin,
       [](A& a) {
         return Load(a,
                     Messages(Header(a.VictimHeader()),
                              Chunks(a.victim_data().substr(0, 2 * kChunk))));
       },
       grpc::INVALID_ARGUMENT, "before its end marker"},
      {"bad checksum", admin,
       [](A& a) {
         std::string d = a.victim_data();
         d[d.size() / 2] ^= 0x40;
         return Load(
             a, Messages(Header(a.VictimHeader()), Chunks(d), End(d.size())));
       },
       grpc::DATA_LOSS, "checksum mismatch"},
      {"header's total_bytes lies", admin,
       [victim_load](A& a) {
         return victim_load(a, [](v1::LoadHeader& h) {
           h.set_total_bytes(h.total_bytes() * 2);
         });
       },
       grpc::INVALID_ARGUMENT, "add up to"},
      {"chunk over kMaxChunkBytes", admin,
       [](A& a) {
         return Load(a, {Header(a.VictimHeader()),
                         Chunk(0, std::string(kMaxChunkBytes + 1, 'x'))});
       },
       grpc::INVALID_ARGUMENT, "larger than the maximum"},
      {"message over 64 MiB", admin,
       [](A& a) { return Create(a, "x", std::string(65 << 20, ' ')); },
       grpc::RESOURCE_EXHAUSTED, ""},
      // Bad manifests and names.
      {"unknown dtype enum", admin,
       [victim_load](A& a) {
         return victim_load(a, [](v1::LoadHeader& h) {
           h.mutable_tensors(0)->set_dtype(static_cast<v1::DType>(99));
         });
       },
       grpc::INVALID_ARGUMENT, "dtype"},
      {"unknown tensor kind enum", admin,
       [victim_load](A& a) {
         return victim_load(a, [](v1::LoadHeader& h) {
           h.mutable_tensors(0)->set_kind(static_cast<v1::TensorKind>(7));
         });
       },
       grpc::INVALID_ARGUMENT, "kind"},
      {"negative dimension", admin,
       [victim_load](A& a) {
         return victim_load(a, [](v1::LoadHeader& h) {
           h.mutable_tensors(0)->set_shape(0, -4);
         });
       },
       grpc::INVALID_ARGUMENT, ""},
      {"shape whose size overflows", admin,
       [](A& a) {
         return Load(a, {Header(OneTensorHeader(
                            "x", "w", {1LL << 40, 1LL << 40, 1LL << 40}))});
       },
       grpc::INVALID_ARGUMENT, "overflows"},
      {"duplicate keys", admin,
       [victim_load](A& a) {
         return victim_load(
             a, [](v1::LoadHeader& h) { *h.add_tensors() = h.tensors(0); });
       },
       grpc::INVALID_ARGUMENT, ""},
      {"key with a control character", admin,
       [](A& a) {
         return Load(a, {Header(OneTensorHeader("x",
                                                "a\x01"
                                                "b",
                                                {1}))});
       },
       grpc::INVALID_ARGUMENT, "control character"},
      {"key naming both a tensor and a module", admin,
       [](A& a) {
         return Load(a, {Header(EmptyTensorsHeader("x", 2, [](int i) {
                       return i == 0 ? std::string("a") : std::string("a.b");
                     }))});
       },
       grpc::INVALID_ARGUMENT, "as a tensor and as a module"},
      {"key with an empty component", admin,
       [](A& a) {
         return Load(a, {Header(OneTensorHeader("x", "a..b", {1}))});
       },
       grpc::INVALID_ARGUMENT, "empty component"},
      {"key of 5,000 bytes", admin,
       [](A& a) {
         return Load(
             a, {Header(OneTensorHeader("x", std::string(5000, 'k'), {1}))});
       },
       grpc::INVALID_ARGUMENT, "kMaxKeyLength"},
      {"model name ../../etc/passwd", admin,
       [](A& a) {
         return Create(a, "../../etc/passwd", R"({"type": "ReLU"})");
       },
       grpc::INVALID_ARGUMENT, "model name"},
      {"model name in unicode", admin,
       [](A& a) { return Create(a, "mod\xc3\xa8le", R"({"type": "ReLU"})"); },
       grpc::INVALID_ARGUMENT, "model name"},
      {"model name of 129 characters", admin,
       [](A& a) {
         return Create(a, std::string(129, 'm'), R"({"type": "ReLU"})");
       },
       grpc::INVALID_ARGUMENT, "model name"},
      {"spec that is not JSON", admin,
       [](A& a) { return Create(a, "x", "{\"type\": \"Linear\", "); },
       grpc::INVALID_ARGUMENT, "not valid JSON"},
      {"creating load naming a submodule", admin,
       [](A& a) {
         v1::LoadHeader header = OneTensorHeader("x", "w", {1});
         header.set_module("sub");
         return Load(a, {Header(header)});
       },
       grpc::INVALID_ARGUMENT, "submodule"},
      // Requests that are well-formed but not allowed.
      {"fetch chunk_bytes over the maximum", admin,
       [](A& a) {
         v1::StateDictRequest request = FetchOf("victim");
         request.set_chunk_bytes(kMaxChunkBytes + 1);
         return Fetch(a, request);
       },
       grpc::INVALID_ARGUMENT, ""},
      {"fetch cast to int8", admin,
       [](A& a) {
         v1::StateDictRequest request = FetchOf("victim");
         request.set_cast_floating_to(v1::INT8);
         return Fetch(a, request);
       },
       grpc::INVALID_ARGUMENT, ""},
      {"fetch of a key that is not there", admin,
       [](A& a) {
         v1::StateDictRequest request = FetchOf("victim");
         request.add_keys("no.such.key");
         return Fetch(a, request);
       },
       grpc::NOT_FOUND, ""},
      {"fetch of a version not retained", admin,
       [](A& a) {
         v1::StateDictRequest request = FetchOf("victim");
         request.set_version(12345);
         return Fetch(a, request);
       },
       grpc::NOT_FOUND, "not retained"},
      {"strict load with a key missing", admin,
       [victim_load](A& a) {
         return victim_load(
             a, [](v1::LoadHeader& h) { h.mutable_tensors()->RemoveLast(); });
       },
       grpc::FAILED_PRECONDITION, "Missing key"},
      {"compare-and-set on a stale version", admin,
       [victim_load](A& a) {
         return victim_load(a, [](v1::LoadHeader& h) {
           h.set_has_expected_version(true);
           h.set_expected_version(99);
         });
       },
       grpc::ABORTED, "expected 99"},
      {"create over an existing model", admin,
       [](A& a) { return Create(a, "victim", R"({"type": "ReLU"})"); },
       grpc::ALREADY_EXISTS, ""},
      {"rollback to a version never retained", admin,
       [](A& a) {
         auto context = a.Context();
         v1::RollbackModelRequest request;
         request.set_model("victim");
         request.set_version(7);
         v1::RollbackModelResponse response;
         return a.stub().RollbackModel(context.get(), request, &response);
       },
       grpc::NOT_FOUND, ""},
      {"delete of a model that does not exist", admin,
       [](A& a) {
         auto context = a.Context();
         v1::DeleteModelRequest request;
         request.set_model("ghost");
         v1::DeleteModelResponse response;
         return a.stub().DeleteModel(context.get(), request, &response);
       },
       grpc::NOT_FOUND, ""},
      // Credentials: missing, wrong, malformed, too weak, for another model.
      {"fetch without credentials", "",
       [](A& a) { return Fetch(a, FetchOf("victim")); }, grpc::UNAUTHENTICATED,
       "no credentials"},
      {"create without credentials", "",
       [](A& a) { return Create(a, "x", R"({"type": "ReLU"})"); },
       grpc::UNAUTHENTICATED, "no credentials"},
      {"load with an unknown token", "Bearer not-a-token-anyone-holds",
       [victim_load](A& a) { return victim_load(a, [](v1::LoadHeader&) {}); },
       grpc::UNAUTHENTICATED, ""},
      {"basic instead of bearer credentials", "Basic dXNlcjpwYXNz",
       [](A& a) { return Fetch(a, FetchOf("victim")); }, grpc::UNAUTHENTICATED,
       ""},
      {"read role loads", absl::StrCat("Bearer ", kReaderToken),
       [victim_load](A& a) { return victim_load(a, [](v1::LoadHeader&) {}); },
       grpc::PERMISSION_DENIED, "needs role write"},
      {"read role rolls back", absl::StrCat("Bearer ", kReaderToken),
       [](A& a) {
         auto context = a.Context();
         v1::RollbackModelRequest request;
         request.set_model("victim");
         request.set_version(1);
         v1::RollbackModelResponse response;
         return a.stub().RollbackModel(context.get(), request, &response);
       },
       grpc::PERMISSION_DENIED, "needs role write"},
      {"read role deletes", absl::StrCat("Bearer ", kReaderToken),
       [](A& a) {
         auto context = a.Context();
         v1::DeleteModelRequest request;
         request.set_model("victim");
         v1::DeleteModelResponse response;
         return a.stub().DeleteModel(context.get(), request, &response);
       },
       grpc::PERMISSION_DENIED, "needs role admin"},
      {"write role of another model loads",
       absl::StrCat("Bearer ", kOtherToken),
       [victim_load](A& a) { return victim_load(a, [](v1::LoadHeader&) {}); },
       grpc::PERMISSION_DENIED, ""},
      {"write role of another model fetches",
       absl::StrCat("Bearer ", kOtherToken),
       [](A& a) { return Fetch(a, FetchOf("victim")); },
       grpc::PERMISSION_DENIED, ""},
  };
}

// Everything the daemon stores, as a string: every model's name, version and
// tensor checksums.
std::string Fingerprint(Client& client) {
  std::string out;
  absl::StatusOr<std::vector<ModelSummary>> models = client.ListModels();
  EXPECT_TRUE(models.ok()) << models.status();
  if (!models.ok()) return "";
  for (const ModelSummary& summary : *models) {
    absl::StatusOr<ModelManifest> manifest = client.GetModel(summary.name);
    EXPECT_TRUE(manifest.ok()) << manifest.status();
    if (!manifest.ok()) continue;
    absl::StrAppend(&out, summary.name, "@", manifest->version, ":");
    for (const TensorDescription& tensor : manifest->tensors)
      absl::StrAppend(&out, " ", tensor.name, "=", tensor.checksum);
    out += "\n";
  }
  return out;
}

TEST(AbuseTest, HostileRequestsAreRefusedAndTheDaemonServesOn) {
  testing_support::ScratchDir dir;
  std::ofstream(dir.file("policy.json")) << PolicyJson();
  Daemon daemon(
      {"--demo_model=", "--log_rpcs=false", "--metrics_listen=127.0.0.1:0",
       "--audit_log=", "--auth_policy=" + dir.file("policy.json"),
       absl::StrCat("--memory_limit_bytes=", kMemoryLimit),
       absl::StrCat("--max_pending_loads=", kMaxPendingLoads),
       absl::StrCat("--stream_idle_timeout=",
                    absl::FormatDuration(kIdleTimeout)),
       "--keepalive_min_ping_interval=1s", "--release_memory_interval=1s"});
  ASSERT_GT(daemon.port(), 0);
  ClientOptions options;
  options.timeout = absl::Seconds(30);
  options.own_connection = true;
  options.token = kAdminToken;
  auto admin = Client::Connect(daemon.address(), options).value();
  // "ref" is fetched after every case; "victim" is what the loads aim at;
  // "big" (64 MiB) is what a non-reading fetch pins.
  ASSERT_TRUE(admin
                  ->CreateModel("ref", R"({"type": "Sequential", "modules": [
      {"type": "Linear", "args": [16, 16]}, {"type": "BatchNorm1d", "args": [16]}]})")
                  .ok());
  ASSERT_TRUE(admin
                  ->CreateModel("victim", R"({"type": "Sequential", "modules": [
      {"type": "Linear", "args": [256, 256]}, {"type": "Linear", "args": [256, 8]}]})")
                  .ok());
  ASSERT_TRUE(admin
                  ->CreateModel("big", R"({"type": "Module", "parameters": {
      "w": {"shape": [16777216], "init": "ones"}}})")
                  .ok());
  const FetchedStateDict ref = admin->StateDict({"ref"}).value();
  const FetchedStateDict victim = admin->StateDict({"victim"}).value();
  std::string victim_data;
  for (const auto& entry : victim.state.entries()) {
    victim_data.append(reinterpret_cast<const char*>(entry.tensor.data()),
                       entry.tensor.num_bytes());
  }
  ASSERT_GT(victim_data.size(), 3 * kChunk);
  const v1::LoadHeader victim_header =
      ToLoadHeader(LoadRequest("victim"), victim.state, victim_data.size());
  ASSERT_TRUE(admin->StateDict({"big"}).ok());  // Warms the fetch path up.
  const std::string before = Fingerprint(*admin);
  auto churn = [&] {
    for (int i = 0; i < 30; ++i) {
      ASSERT_TRUE(
          admin->CreateModel("churn", R"({"type": "Linear", "args": [64, 64]})")
              .ok());
      ASSERT_TRUE(admin->DeleteModel("churn").ok());
    }
  };
  const std::vector<Row> rows = Rows(churn);
  ASSERT_GE(rows.size(), 40u);
  auto run_table = [&] {
    const absl::Time table_start = absl::Now();
    for (const Row& row : rows) {
      SCOPED_TRACE(row.name);
      const absl::Time started = absl::Now();
      grpc::Status status;
      {
        Attacker attacker(daemon.address(), daemon.port(), row.credential,
                          victim_header, victim_data);
        status = row.attack(attacker);
      }
      EXPECT_EQ(status.error_code(), row.code) << status.error_message();
      EXPECT_THAT(status.error_message(), HasSubstr(row.message));
      std::fprintf(stderr, "abuse: %-55s %-20s %6.0f ms  RSS %4lld MiB\n",
                   row.name.c_str(),
                   absl::StatusCodeToString(
                       static_cast<absl::StatusCode>(status.error_code()))
                       .c_str(),
                   absl::ToDoubleMilliseconds(absl::Now() - started),
                   static_cast<long long>(ResidentBytes(daemon.pid()) >> 20));
      // The daemon serves everyone else, and nothing it stores changed.
      absl::StatusOr<bool> healthy = admin->CheckHealth();
      EXPECT_TRUE(healthy.ok() && *healthy) << healthy.status();
      absl::StatusOr<FetchedStateDict> fetched = admin->StateDict({"ref"});
      ASSERT_TRUE(fetched.ok()) << fetched.status();
      EXPECT_EQ(fetched->version, ref.version);
      EXPECT_EQ(Fingerprint(*admin), before);
    }
    std::fprintf(stderr, "abuse: %zu cases in %.1f s\n", rows.size(),
                 absl::ToDoubleSeconds(absl::Now() - table_start));
  };
  // The daemon's heap in use (malloc's own count, from /metrics) once every
  // attacker's client is gone: polled until at most `bound`, for up to 20 s,
  // as gRPC frees a closed connection's memory on its own threads.
  const int metrics_port = MetricsPort(daemon);
  ASSERT_GT(metrics_port, 0);
  auto heap_in_use = [&] {
    return static_cast<int64_t>(
        MetricValue(metrics_port, "modelstate_heap_in_use_bytes"));
  };
  auto settled_heap = [&](int64_t bound) {
    int64_t heap = heap_in_use();
    WaitUntil([&] { return (heap = heap_in_use()) <= bound; },
              absl::Seconds(20));
    return heap;
  };
  auto report = [&](const char* when, int64_t heap) {
    std::fprintf(stderr, "abuse: %s: heap in use %.1f MiB, RSS %lld MiB\n",
                 when, static_cast<double>(heap) / (1 << 20),
                 static_cast<long long>(ResidentBytes(daemon.pid()) >> 20));
  };

  absl::SleepFor(absl::Milliseconds(500));
  const int64_t pristine_rss = ResidentBytes(daemon.pid());
  ASSERT_GT(pristine_rss, 0);
  // ASan's allocator replaces malloc's (its arenas report nothing), and its
  // shadow memory and quarantine make RSS meaningless: only the table runs.
  if (kUnderAsan) {
    run_table();
    return;
  }
  const int64_t pristine_heap = heap_in_use();
  ASSERT_GT(pristine_heap, 0);
  report("pristine", pristine_heap);
  run_table();
  // The first round may leave high-water marks (gRPC's caches, the policy's
  // and the metrics' first use); rounds after it must not grow the heap (a
  // leak per tensor or module would add megabytes in the million-entry
  // rows; LeakSanitizer in tools/sanitize.sh finds the rest). RSS alone moves
  // by +-15% between rounds here (pages pinned by a few live blocks, arenas of
  // threads), so it only gets a loose bound against runaway fragmentation.
  const int64_t start = settled_heap(pristine_heap * 3 / 2);
  report("after a round", start);
  EXPECT_LE(start, pristine_heap * 3 / 2);
  run_table();
  const int64_t end = settled_heap(start + start / 20 + (1 << 20));
  report("after another round", end);
  EXPECT_LE(end, start + start / 20 + (1 << 20));
  // Polled, as the allocator returns freed pages every
  // --release_memory_interval.
  EXPECT_TRUE(WaitUntil(
      [&] { return ResidentBytes(daemon.pid()) <= pristine_rss * 3 / 2; },
      absl::Seconds(20)))
      << "RSS " << ResidentBytes(daemon.pid()) << " vs pristine "
      << pristine_rss;
}

}  // namespace
}  // namespace modelstate

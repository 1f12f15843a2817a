// Client::StateDictInto, the in-place refresh: bytes land in caller-owned
// memory bit for bit, cast as Tensor::CastTo casts, and a fetch that fails
// leaves that memory as it was (or, with allow_partial_write, reports what it
// wrote). Against an in-process server, and against a fake one that corrupts
// or cuts its stream.
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/synchronization/notification.h"
#include "client/client.h"
#include "gmock/gmock.h"
#include "grpcpp/server_builder.h"
#include "gtest/gtest.h"
#include "modelstate/v1/model_state.grpc.pb.h"
#include "proto/convert.h"
#include "tests/test_support.h"

namespace modelstate {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using testing_support::ConnectTo;
using testing_support::CoreState;
using testing_support::FilledLike;
using testing_support::ReadSourceFile;
using testing_support::StartServer;

constexpr uint8_t kSentinel = 0xA5;

// Servers for tests that cut streams into chunks far below the daemon's
// minimum chunk (so elements straddle chunk boundaries) and allow it.
ServerOptions AnyChunkSize() {
  ServerOptions options;
  options.min_chunk_bytes = 0;
  return options;
}

// Caller-owned memory for every entry of a state dict, in `dtype_for(entry)`,
// filled with kSentinel bytes.
class Buffers {
 public:
  template <typename DTypeFor>
  Buffers(const StateDict& like, DTypeFor dtype_for) {
    for (const auto& entry : like.entries()) {
      const DType dtype = dtype_for(entry.tensor);
      const size_t bytes = NumBytes(dtype, entry.tensor.shape()).value();
      memory_.emplace_back(bytes, kSentinel);
      destinations_.push_back(
          {entry.key, dtype, entry.tensor.shape(), memory_.back().data()});
    }
  }
  explicit Buffers(const StateDict& like)
      : Buffers(like, [](const Tensor& t) { return t.dtype(); }) {}

  std::vector<Destination>& destinations() { return destinations_; }
  const std::vector<uint8_t>& memory(size_t i) const { return memory_[i]; }
  size_t size() const { return memory_.size(); }

  bool Untouched() const {
    for (const std::vector<uint8_t>& bytes : memory_) {
      for (uint8_t byte : bytes) {
        if (byte != kSentinel) return false;
      }
    }
    return true;
  }

  // True when buffer `i` holds exactly `tensor`'s bytes.
  bool Holds(size_t i, const Tensor& tensor) const {
    return memory_[i].size() == tensor.num_bytes() &&
           std::memcmp(memory_[i].data(), tensor.data(), tensor.num_bytes()) ==
               0;
  }

 private:
  std::vector<std::vector<uint8_t>> memory_;
  std::vector<Destination> destinations_;
};

IntoOptions Mode(bool partial, std::vector<std::string>* written) {
  IntoOptions into;
  into.allow_partial_write = partial;
  into.written_keys = written;
  return into;
}

TEST(StateDictIntoTest, RefreshesEveryParityModelBitForBitInBothModes) {
  auto server = StartServer(AnyChunkSize());
  auto client = ConnectTo(*server);
  for (const char* name : {"mlp", "cnn", "transformer", "gpt2", "llama"}) {
    SCOPED_TRACE(name);
    ASSERT_TRUE(
        client
            ->CreateModel(name, ReadSourceFile(std::string("tests/models/") +
                                               name + ".json"))
            .ok());
    const StateDict expected = CoreState(*server, name);
    for (bool partial : {false, true}) {
      for (uint32_t chunk_bytes : {0u, 100u, 4097u}) {
        SCOPED_TRACE(::testing::Message()
                     << "partial " << partial << " chunk " << chunk_bytes);
        Buffers buffers(expected);
        TransferOptions transfer;
        transfer.chunk_bytes = chunk_bytes;
        std::vector<std::string> written;
        absl::StatusOr<int64_t> version = client->StateDictInto(
            {name}, buffers.destinations(), transfer, Mode(partial, &written));
        ASSERT_TRUE(version.ok()) << version.status();
        EXPECT_EQ(*version, 1);
        EXPECT_EQ(written, expected.Keys());
        for (size_t i = 0; i < expected.size(); ++i)
          EXPECT_TRUE(buffers.Holds(i, expected.entries()[i].tensor))
              << expected.entries()[i].key;
      }
    }
  }
}

TEST(StateDictIntoTest, CastsOnTheFlyExactlyAsCastTo) {
  auto server = StartServer(AnyChunkSize());
  auto client = ConnectTo(*server);
  ASSERT_TRUE(
      client->CreateModel("cnn", ReadSourceFile("tests/models/cnn.json")).ok());
  const StateDict expected = CoreState(*server, "cnn");
  for (DType target : {DType::kBFloat16, DType::kFloat16, DType::kFloat64}) {
    for (bool partial : {false, true}) {
      // Odd chunk sizes make elements straddle chunks.
      for (uint32_t chunk_bytes : {7u, 1001u}) {
        SCOPED_TRACE(::testing::Message()
                     << TorchName(target) << " partial " << partial << " chunk "
                     << chunk_bytes);
        // Integer buffers (BatchNorm's num_batches_tracked) become int32:
        // every kind of conversion goes through the same path.
        Buffers buffers(expected, [&](const Tensor& t) {
          return IsFloatingPoint(t.dtype()) ? target : DType::kInt32;
        });
        TransferOptions transfer;
        transfer.chunk_bytes = chunk_bytes;
        ASSERT_TRUE(client
                        ->StateDictInto({"cnn"}, buffers.destinations(),
                                        transfer, Mode(partial, nullptr))
                        .ok());
        for (size_t i = 0; i < expected.size(); ++i) {
          const Tensor& source = expected.entries()[i].tensor;
          EXPECT_TRUE(buffers.Holds(
              i, source.CastTo(buffers.destinations()[i].dtype).value()))
              << expected.entries()[i].key;
        }
      }
    }
  }
  // A server-side cast (the request's dtype) followed by a client-side one.
  FetchRequest request{"cnn"};
  request.dtype = DType::kBFloat16;
  Buffers buffers(expected);
  ASSERT_TRUE(client->StateDictInto(request, buffers.destinations()).ok());
  for (size_t i = 0; i < expected.size(); ++i) {
    const Tensor& source = expected.entries()[i].tensor;
    Tensor twice = IsFloatingPoint(source.dtype())
                       ? source.CastTo(DType::kBFloat16)
                             .value()
                             .CastTo(source.dtype())
                             .value()
                       : source;
    EXPECT_TRUE(buffers.Holds(i, twice)) << expected.entries()[i].key;
  }
}

TEST(StateDictIntoTest, MismatchedDestinationsFailBeforeAnyWrite) {
  auto server = StartServer();
  auto client = ConnectTo(*server);
  ASSERT_TRUE(
      client->CreateModel("mlp", ReadSourceFile("tests/models/mlp.json")).ok());
  const StateDict expected = CoreState(*server, "mlp");
  ASSERT_GE(expected.size(), 2u);
  const std::string first = expected.entries()[0].key;
  struct Case {
    std::string name;
    std::function<void(std::vector<Destination>&)> edit;
    FetchRequest request;
    absl::StatusCode code;
    std::string message;
  };
  std::vector<Case> cases = {
      {"extra destination",
       [](std::vector<Destination>& d) {
         d.push_back({"ghost.weight", DType::kFloat32, {1}, d[0].data});
       },
       {"mlp"},
       absl::StatusCode::kFailedPrecondition,
       "destinations not fetched: \"ghost.weight\""},
      {"missing destination",
       [](std::vector<Destination>& d) { d.erase(d.begin()); },
       {"mlp"},
       absl::StatusCode::kFailedPrecondition,
       "fetched keys without a destination: \"" + first + "\""},
      {"shape mismatch",
       [](std::vector<Destination>& d) { d[0].shape = {1}; },
       {"mlp"},
       absl::StatusCode::kFailedPrecondition,
       "size mismatch for " + first + ": copying a param with shape"},
      {"duplicate key",
       [](std::vector<Destination>& d) { d.push_back(d[0]); },
       {"mlp"},
       absl::StatusCode::kInvalidArgument,
       "duplicate destination key"},
      {"no memory",
       [](std::vector<Destination>& d) { d[1].data = nullptr; },
       {"mlp"},
       absl::StatusCode::kInvalidArgument,
       "has no memory"},
      {"unknown model",
       [](std::vector<Destination>&) {},
       {"nope"},
       absl::StatusCode::kNotFound,
       ""},
  };
  Case unknown_key{"unknown key",
                   [](std::vector<Destination>&) {},
                   {"mlp"},
                   absl::StatusCode::kNotFound,
                   ""};
  unknown_key.request.keys = {"nope.weight"};
  cases.push_back(unknown_key);
  for (const Case& c : cases) {
    for (bool partial : {false, true}) {
      SCOPED_TRACE(c.name + (partial ? " partial" : ""));
      Buffers buffers(expected);
      std::vector<Destination> destinations = buffers.destinations();
      c.edit(destinations);
      std::vector<std::string> written = {"stale"};
      absl::Status status = client
                                ->StateDictInto(c.request, destinations, {},
                                                Mode(partial, &written))
                                .status();
      EXPECT_EQ(status.code(), c.code) << status;
      EXPECT_THAT(std::string(status.message()), HasSubstr(c.message));
      EXPECT_TRUE(buffers.Untouched());
      EXPECT_TRUE(written.empty());
    }
  }
  // A subset fetched by key fills exactly the destinations named.
  FetchRequest subset{"mlp"};
  subset.keys = {expected.entries()[1].key};
  Buffers buffers(expected);
  std::vector<Destination> one = {buffers.destinations()[1]};
  ASSERT_TRUE(client->StateDictInto(subset, one).ok());
  EXPECT_TRUE(buffers.Holds(1, expected.entries()[1].tensor));
}

TEST(StateDictIntoTest, AnAllocatorChoosesDestinationsFromTheManifest) {
  auto server = StartServer();
  auto client = ConnectTo(*server);
  ASSERT_TRUE(
      client->CreateModel("cnn", ReadSourceFile("tests/models/cnn.json")).ok());
  const StateDict expected = CoreState(*server, "cnn");
  for (bool partial : {false, true}) {
    SCOPED_TRACE(partial);
    // Every other key gets fresh memory; the rest are received and dropped.
    std::vector<std::vector<uint8_t>> memory;
    std::vector<std::string> written;
    absl::StatusOr<int64_t> version = client->StateDictInto(
        {"cnn"},
        [&](const std::vector<TensorDescription>& tensors)
            -> absl::StatusOr<std::vector<Destination>> {
          std::vector<Destination> chosen;
          memory.reserve(tensors.size());
          for (size_t i = 0; i < tensors.size(); i += 2) {
            EXPECT_EQ(tensors[i].name, expected.entries()[i].key);
            memory.emplace_back(tensors[i].num_bytes, kSentinel);
            chosen.push_back({tensors[i].name, tensors[i].dtype,
                              tensors[i].shape, memory.back().data()});
          }
          return chosen;
        },
        {}, Mode(partial, &written));
    ASSERT_TRUE(version.ok()) << version.status();
    std::vector<std::string> every_other;
    for (size_t i = 0; i < expected.size(); i += 2) {
      every_other.push_back(expected.entries()[i].key);
      const Tensor& tensor = expected.entries()[i].tensor;
      EXPECT_EQ(
          std::memcmp(memory[i / 2].data(), tensor.data(), tensor.num_bytes()),
          0);
    }
    EXPECT_EQ(written, every_other);
  }
  // The allocator's error ends the fetch; so does a destination not fetched.
  EXPECT_EQ(
      client
          ->StateDictInto({"cnn"},
                          [](const std::vector<TensorDescription>&)
                              -> absl::StatusOr<std::vector<Destination>> {
                            return absl::ResourceExhaustedError("no");
                          })
          .status()
          .code(),
      absl::StatusCode::kResourceExhausted);
  float ghost = 0;
  EXPECT_EQ(
      client
          ->StateDictInto({"cnn"},
                          [&](const std::vector<TensorDescription>&)
                              -> absl::StatusOr<std::vector<Destination>> {
                            return std::vector<Destination>{
                                {"ghost", DType::kFloat32, {1}, &ghost}};
                          })
          .status()
          .code(),
      absl::StatusCode::kFailedPrecondition);
}

// A StateDict service that serves two float32 tensors and then misbehaves:
// corrupts the second tensor's bytes, or fails the call after the first.
class FaultyService : public v1::ModelState::Service {
 public:
  enum class Fault { kCorruptSecond, kFailAfterFirst };

  FaultyService(modelstate::StateDict state, Fault fault)
      : state_(std::move(state)), fault_(fault) {}

  grpc::Status StateDict(
      grpc::ServerContext*, const v1::StateDictRequest*,
      grpc::ServerWriter<v1::StateDictResponse>* writer) override {
    FetchPlan plan{"faulty", 3,
                   std::make_shared<const modelstate::StateDict>(state_)};
    uint64_t total = 0;
    for (const auto& entry : state_.entries())
      total += entry.tensor.num_bytes();
    v1::StateDictResponse response;
    *response.mutable_manifest() = ToManifest(plan, total);
    writer->Write(response);
    uint64_t offset = 0;
    for (size_t i = 0; i < state_.size(); ++i) {
      const Tensor& tensor = state_.entries()[i].tensor;
      if (i == 1 && fault_ == Fault::kFailAfterFirst)
        return grpc::Status(grpc::StatusCode::UNAVAILABLE, "server went away");
      std::string bytes(reinterpret_cast<const char*>(tensor.data()),
                        tensor.num_bytes());
      if (i == 1) bytes[bytes.size() / 2] ^= 1;
      response.Clear();
      response.mutable_chunk()->set_offset(offset);
      response.mutable_chunk()->set_data(bytes);
      writer->Write(response);
      offset += bytes.size();
    }
    response.Clear();
    response.mutable_end()->set_total_bytes(offset);
    writer->Write(response);
    return grpc::Status::OK;
  }

 private:
  modelstate::StateDict state_;
  Fault fault_;
};

StateDict TwoTensors() {
  StateDict shape;
  shape.Set("a.weight", Tensor::Zeros(DType::kFloat32, {64, 8}).value());
  shape.Set("b.weight", Tensor::Zeros(DType::kFloat32, {32}).value());
  return FilledLike(shape, 1.5f);
}

TEST(StateDictIntoTest, AFailedStreamLeavesMemoryUntouchedOrReportsWrites) {
  const StateDict state = TwoTensors();
  struct Case {
    FaultyService::Fault fault;
    absl::StatusCode code;
    std::vector<std::string> written_when_partial;
  };
  for (const Case& c : {Case{FaultyService::Fault::kCorruptSecond,
                             absl::StatusCode::kDataLoss,
                             {"a.weight", "b.weight"}},
                        Case{FaultyService::Fault::kFailAfterFirst,
                             absl::StatusCode::kUnavailable,
                             {"a.weight"}}}) {
    FaultyService service(state, c.fault);
    grpc::ServerBuilder builder;
    int port = 0;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(),
                             &port);
    builder.RegisterService(&service);
    std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
    ASSERT_NE(port, 0);
    auto client = ConnectTo("127.0.0.1:" + std::to_string(port));

    // The failure itself is under test; resume_test covers resuming.
    TransferOptions once;
    once.max_resumes = 0;
    Buffers staged(state);
    std::vector<std::string> written = {"stale"};
    absl::Status status = client
                              ->StateDictInto({"faulty"}, staged.destinations(),
                                              once, Mode(false, &written))
                              .status();
    EXPECT_EQ(status.code(), c.code) << status;
    EXPECT_TRUE(staged.Untouched());
    EXPECT_TRUE(written.empty());

    Buffers direct(state);
    status = client
                 ->StateDictInto({"faulty"}, direct.destinations(), once,
                                 Mode(true, &written))
                 .status();
    EXPECT_EQ(status.code(), c.code) << status;
    EXPECT_EQ(written, c.written_when_partial);
    EXPECT_TRUE(direct.Holds(0, state.entries()[0].tensor));
    server->Shutdown();
  }
}

TEST(StateDictIntoTest, ACancellerStopsFetchesLoadsAndWatches) {
  auto server = StartServer(AnyChunkSize());
  auto client = ConnectTo(*server);
  ASSERT_TRUE(
      client->CreateModel("llama", ReadSourceFile("tests/models/llama.json"))
          .ok());
  const StateDict expected = CoreState(*server, "llama");
  for (bool partial : {false, true}) {
    // Cancelled mid-transfer, from the progress callback.
    CallCanceller canceller;
    TransferOptions transfer;
    transfer.chunk_bytes = 1000;
    transfer.canceller = &canceller;
    transfer.progress = [&](uint64_t, uint64_t) { canceller.Cancel(); };
    Buffers buffers(expected);
    absl::Status status = client
                              ->StateDictInto({"llama"}, buffers.destinations(),
                                              transfer, Mode(partial, nullptr))
                              .status();
    EXPECT_EQ(status.code(), absl::StatusCode::kCancelled) << status;
    if (!partial) {
      EXPECT_TRUE(buffers.Untouched());
    }
    // Cancelled already: the next call fails at once.
    transfer.progress = nullptr;
    EXPECT_EQ(client->StateDict({"llama"}, transfer).status().code(),
              absl::StatusCode::kCancelled);
  }
  // A cancelled load leaves the model as it was.
  CallCanceller canceller;
  TransferOptions transfer;
  transfer.chunk_bytes = 1000;
  transfer.canceller = &canceller;
  transfer.progress = [&](uint64_t, uint64_t) { canceller.Cancel(); };
  EXPECT_EQ(
      client->LoadStateDict({"llama"}, FilledLike(expected, 2.0f), transfer)
          .status()
          .code(),
      absl::StatusCode::kCancelled);
  EXPECT_EQ(client->GetModel("llama").value().version, 1);
  Buffers after(expected);
  ASSERT_TRUE(client->StateDictInto({"llama"}, after.destinations()).ok());
  for (size_t i = 0; i < expected.size(); ++i)
    EXPECT_TRUE(after.Holds(i, expected.entries()[i].tensor));

  // A watch waiting for events ends when cancelled from another thread.
  CallCanceller watch_canceller;
  absl::Notification first_event;
  absl::Status watch_status;
  std::thread watcher([&] {
    watch_status = client->Watch(
        "llama",
        [&](const ModelEvent&) {
          if (!first_event.HasBeenNotified()) first_event.Notify();
          return true;
        },
        &watch_canceller);
  });
  ASSERT_TRUE(first_event.WaitForNotificationWithTimeout(absl::Seconds(30)));
  watch_canceller.Cancel();
  watcher.join();
  EXPECT_EQ(watch_status.code(), absl::StatusCode::kCancelled) << watch_status;
}

}  // namespace
}  // namespace modelstate

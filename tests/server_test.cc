// End to end over loopback with an in-process server: snapshots, partial
// prefixes, loads, bad loads, concurrency, a 1 GiB round trip, watch, health,
// reflection, TLS and mTLS.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <set>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpc/reflection/v1alpha/reflection.grpc.pb.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/impl/codegen/client_unary_call.h"
#include "gtest/gtest.h"
#include "model/module_factory.h"
#include "modelstate/v1/model_state.grpc.pb.h"
#include "proto/convert.h"
#include "store/model_files.h"
#include "tests/test_support.h"
#include "xxhash.h"

namespace modelstate {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using testing_support::ConnectTo;
using testing_support::CoreState;
using testing_support::FilledLike;
using testing_support::ReadSourceFile;
using testing_support::StartServer;

constexpr const char* kParityModels[] = {"mlp",         "cnn",  "attention",
                                         "transformer", "gpt2", "llama"};

void ExpectSameState(const StateDict& a, const StateDict& b) {
  ASSERT_EQ(a.Keys(), b.Keys());
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_TRUE(a.entries()[i].tensor.BitwiseEquals(b.entries()[i].tensor))
        << a.entries()[i].key;
    EXPECT_EQ(a.entries()[i].kind, b.entries()[i].kind) << a.entries()[i].key;
  }
}

// A fetched state dict's small tensors share blocks (TensorPacking), each at
// an aligned start.
void ExpectSmallTensorsPacked(const StateDict& state) {
  int small = 0;
  std::set<const Storage*> blocks;
  for (const StateDict::Entry& entry : state.entries()) {
    const Tensor& tensor = entry.tensor;
    EXPECT_EQ(reinterpret_cast<uintptr_t>(tensor.data()) % kStorageAlignment,
              0u);
    if (tensor.num_bytes() == 0 || tensor.num_bytes() >= kPackedTensorMaxBytes)
      continue;
    ++small;
    blocks.insert(tensor.storage().get());
  }
  if (small >= 2) {
    EXPECT_LT(blocks.size(), static_cast<size_t>(small));
  }
}

TEST(ServerTest, SnapshotsMatchTheCoreStateDictBitForBit) {
  auto server = StartServer();
  auto client = ConnectTo(*server);
  for (const char* name : kParityModels) {
    SCOPED_TRACE(name);
    ASSERT_TRUE(client
                    ->CreateModel(name,
                                  ReadSourceFile(std::string("tests/models/") +
                                                 name + ".json"),
                                  7)
                    .ok());
    const StateDict expected = CoreState(*server, name);
    for (uint32_t chunk_bytes : {0u, 100u, 4096u}) {
      TransferOptions options;
      options.chunk_bytes = chunk_bytes;
      absl::StatusOr<FetchedStateDict> fetched =
          client->StateDict({name}, options);
      ASSERT_TRUE(fetched.ok()) << fetched.status();
      EXPECT_EQ(fetched->version, 1);
      ExpectSameState(fetched->state, expected);
      ExpectSmallTensorsPacked(fetched->state);
    }
    ModelManifest manifest = client->GetModel(name).value();
    ASSERT_EQ(manifest.tensors.size(), expected.size());
    for (size_t i = 0; i < expected.size(); ++i) {
      EXPECT_EQ(manifest.tensors[i].checksum,
                expected.entries()[i].tensor.Checksum());
    }
  }
  EXPECT_EQ(client->ListModels().value().size(), std::size(kParityModels));
}

TEST(ServerTest, PartialPrefixOnNestedModules) {
  auto server = StartServer();
  auto client = ConnectTo(*server);
  ASSERT_TRUE(
      client->CreateModel("gpt2", ReadSourceFile("tests/models/gpt2.json"))
          .ok());
  FetchRequest options{"gpt2"};
  options.module = "h.1.attn";
  FetchedStateDict kept = client->StateDict(options).value();
  EXPECT_THAT(kept.state.Keys(),
              ElementsAre("h.1.attn.c_attn.weight", "h.1.attn.c_attn.bias",
                          "h.1.attn.c_proj.weight", "h.1.attn.c_proj.bias"));
  StateDictOptions core;
  core.module = "h.1.attn";
  ExpectSameState(kept.state, CoreState(*server, "gpt2", core));
  options.keep_module_prefix = false;
  EXPECT_THAT(client->StateDict(options).value().state.Keys(),
              ElementsAre("c_attn.weight", "c_attn.bias", "c_proj.weight",
                          "c_proj.bias"));
  options.module = "h.10";  // never matches "h.1"
  EXPECT_EQ(client->StateDict(options).status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(client->GetModel("gpt2", "h.10").status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(client->GetModel("gpt2", "h.1").value().tensors.size(), 12u);

  FetchRequest filtered{"gpt2"};
  filtered.keys = {"ln_f.bias", "wte.weight"};
  EXPECT_THAT(client->StateDict(filtered).value().state.Keys(),
              ElementsAre("ln_f.bias", "wte.weight"));
  filtered.keys = {"nope"};
  EXPECT_EQ(client->StateDict(filtered).status().code(),
            absl::StatusCode::kNotFound);

  ASSERT_TRUE(
      client->CreateModel("cnn", ReadSourceFile("tests/models/cnn.json")).ok());
  FetchRequest params{"cnn"};
  params.include_buffers = false;
  for (const std::string& key :
       client->StateDict(params).value().state.Keys()) {
    EXPECT_THAT(key, ::testing::Not(HasSubstr("running")));
  }
  FetchRequest own{"cnn"};
  own.recurse = false;
  own.module = "1";
  EXPECT_EQ(client->StateDict(own).value().state.size(), 5u);

  FetchRequest cast{"cnn"};
  cast.dtype = DType::kBFloat16;
  FetchedStateDict bf16 = client->StateDict(cast).value();
  const StateDict full = CoreState(*server, "cnn");
  for (const auto& entry : bf16.state.entries()) {
    const Tensor& source = *full.Find(entry.key);
    if (source.dtype() == DType::kInt64) {
      EXPECT_EQ(entry.tensor.dtype(), DType::kInt64);
    } else {
      EXPECT_TRUE(
          entry.tensor.BitwiseEquals(source.CastTo(DType::kBFloat16).value()));
    }
  }
  cast.dtype = DType::kInt32;
  EXPECT_EQ(client->StateDict(cast).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(ServerTest, LoadsStrictNonStrictAssignAndIntoASubmodule) {
  auto server = StartServer();
  auto client = ConnectTo(*server);
  ASSERT_TRUE(
      client->CreateModel("cnn", ReadSourceFile("tests/models/cnn.json")).ok());
  const StateDict original = CoreState(*server, "cnn");

  LoadOutcome strict =
      client->LoadStateDict({"cnn"}, FilledLike(original, 0.5f)).value();
  EXPECT_EQ(strict.version, 2);
  ExpectSameState(CoreState(*server, "cnn"), FilledLike(original, 0.5f));

  StateDict partial;
  partial.Set("0.weight", FilledLike(original, 2).Find("0.weight")[0]);
  partial.Set("stray", FilledLike(original, 2).Find("0.bias")[0]);
  LoadRequest loose{"cnn"};
  loose.strict = false;
  LoadOutcome non_strict = client->LoadStateDict(loose, partial).value();
  EXPECT_EQ(non_strict.version, 3);
  EXPECT_THAT(non_strict.unexpected_keys, ElementsAre("stray"));
  // Everything but 0.weight is missing, except the two num_batches_tracked
  // buffers, which torch fills in for checkpoints without BatchNorm version
  // metadata.
  EXPECT_EQ(non_strict.missing_keys.size(), original.size() - 3);
  EXPECT_TRUE(CoreState(*server, "cnn")
                  .Find("0.weight")
                  ->BitwiseEquals(*partial.Find("0.weight")));

  StateDict half;
  half.Set("weight", FilledLike(original, 3)
                         .Find("8.weight")
                         ->CastTo(DType::kFloat16)
                         .value());
  half.Set(
      "bias",
      FilledLike(original, 3).Find("8.bias")->CastTo(DType::kFloat16).value());
  LoadRequest assign{"cnn"};
  assign.assign = true;
  assign.module = "8";
  EXPECT_EQ(client->LoadStateDict(assign, half).value().version, 4);
  EXPECT_EQ(CoreState(*server, "cnn").Find("8.weight")->dtype(),
            DType::kFloat16);
  EXPECT_EQ(CoreState(*server, "cnn").Find("0.weight")->dtype(),
            DType::kFloat32);

  LoadRequest into_submodule{"cnn"};
  into_submodule.module = "8";
  EXPECT_EQ(client->LoadStateDict(into_submodule, half).value().version, 5);
  EXPECT_EQ(CoreState(*server, "cnn").Find("8.weight")->dtype(),
            DType::kFloat16);

  LoadRequest cas{"cnn"};
  cas.expected_version = 5;
  EXPECT_EQ(client->LoadStateDict(cas, FilledLike(original, 1)).value().version,
            6);
  EXPECT_EQ(client->LoadStateDict(cas, FilledLike(original, 1)).status().code(),
            absl::StatusCode::kAborted);

  LoadRequest create{"fresh"};
  create.create_if_missing = true;
  LoadOutcome created = client->LoadStateDict(create, original).value();
  EXPECT_TRUE(created.created);
  EXPECT_EQ(client->GetModel("fresh").value().tensors[4].kind,
            TensorKind::kBuffer);
  ASSERT_TRUE(client->DeleteModel("fresh").ok());
  EXPECT_EQ(client->DeleteModel("fresh").code(), absl::StatusCode::kNotFound);
}

// Sends a load stream message by message, for the bad cases a well-behaved
// client never makes.
class RawLoad {
 public:
  RawLoad(const Server& server)
      : channel_(
            grpc::CreateChannel("127.0.0.1:" + std::to_string(server.port()),
                                grpc::InsecureChannelCredentials())),
        stub_(v1::ModelState::NewStub(channel_)),
        writer_(stub_->LoadStateDict(&context_, &response_)) {}

  bool Header(const std::string& model, const StateDict& state,
              bool strict = true) {
    v1::LoadStateDictRequest request;
    v1::LoadHeader* header = request.mutable_header();
    header->set_model(model);
    header->set_non_strict(!strict);
    ToTensorInfos(state, header->mutable_tensors());
    header->set_total_bytes(state.TotalBytes());
    return Send(request);
  }
  bool Chunk(uint64_t offset, std::string data) {
    v1::LoadStateDictRequest request;
    request.mutable_chunk()->set_offset(offset);
    request.mutable_chunk()->set_data(std::move(data));
    return Send(request);
  }
  bool End(uint64_t total) {
    v1::LoadStateDictRequest request;
    request.mutable_end()->set_total_bytes(total);
    return Send(request);
  }
  bool Send(const v1::LoadStateDictRequest& request) {
    return writer_->Write(request);
  }
  void Cancel() { context_.TryCancel(); }
  grpc::Status Finish() {
    writer_->WritesDone();
    return writer_->Finish();
  }
  v1::LoadStateDictRequest* scratch() { return &scratch_; }

 private:
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::ModelState::Stub> stub_;
  grpc::ClientContext context_;
  v1::LoadStateDictResponse response_;
  std::unique_ptr<grpc::ClientWriter<v1::LoadStateDictRequest>> writer_;
  v1::LoadStateDictRequest scratch_;
};

std::string Bytes(const StateDict& state) {
  std::string out;
  for (const auto& entry : state.entries()) {
    out.append(reinterpret_cast<const char*>(entry.tensor.data()),
               entry.tensor.num_bytes());
  }
  return out;
}

TEST(ServerTest, EveryBadLoadLeavesTheModelBitwiseUnchanged) {
  ServerOptions limited;
  limited.memory_limit_bytes = 1 << 20;
  // The model's data is 104 bytes: a minimum of 8 lets the cases below cut it
  // into chunks at will, and still has one to refuse.
  limited.min_chunk_bytes = 8;
  auto server = StartServer(limited);
  auto client = ConnectTo(*server);
  ASSERT_TRUE(
      client->CreateModel("m", ReadSourceFile("tests/models/mlp.json")).ok());
  const StateDict before = CoreState(*server, "m");
  const StateDict good = FilledLike(before, 9);
  const std::string data = Bytes(good);
  StateDict missing_key;
  for (const auto& e : good.entries()) {
    if (e.key != "2.bias") missing_key.Set(e.key, e.tensor);
  }
  StateDict wrong_shape = good;
  wrong_shape.Set("0.weight", Tensor::Zeros(DType::kFloat32, {4, 4}).value());

  struct Case {
    std::string name;
    std::function<void(RawLoad&)> send;
    grpc::StatusCode code;
    std::string message;
  };
  const std::vector<Case> cases = {
      {"unknown model", [&](RawLoad& l) { l.Header("nope", good); },
       grpc::NOT_FOUND, "not found"},
      {"strict missing key", [&](RawLoad& l) { l.Header("m", missing_key); },
       grpc::FAILED_PRECONDITION,
       "Error(s) in loading state_dict for Sequential:\n\tMissing key(s) in "
       "state_dict: "
       "\"2.bias\". "},
      {"shape mismatch", [&](RawLoad& l) { l.Header("m", wrong_shape); },
       grpc::FAILED_PRECONDITION, "size mismatch for 0.weight"},
      {"version conflict",
       [&](RawLoad& l) {
         v1::LoadStateDictRequest request;
         request.mutable_header()->set_model("m");
         request.mutable_header()->set_has_expected_version(true);
         request.mutable_header()->set_expected_version(42);
         ToTensorInfos(good, request.mutable_header()->mutable_tensors());
         request.mutable_header()->set_total_bytes(data.size());
         l.Send(request);
       },
       grpc::ABORTED, "expected 42"},
      {"oversized tensor of the wrong shape",
       [&](RawLoad& l) {
         StateDict big;
         big.Set("0.weight", Tensor::Zeros(DType::kFloat32, {1 << 20}).value());
         l.Header("m", big, /*strict=*/false);
       },
       grpc::FAILED_PRECONDITION, "size mismatch"},
      {"memory limit",
       [&](RawLoad& l) {
         v1::LoadStateDictRequest request;
         v1::LoadHeader* header = request.mutable_header();
         header->set_model("grown");
         header->set_create_if_missing(true);
         StateDict big;
         big.Set("w", Tensor::Zeros(DType::kFloat32, {1 << 19}).value());
         ToTensorInfos(big, header->mutable_tensors());
         header->set_total_bytes(big.TotalBytes());
         l.Send(request);
       },
       grpc::RESOURCE_EXHAUSTED, "memory limit"},
      {"unknown tensor kind",
       [&](RawLoad& l) {
         v1::LoadStateDictRequest request;
         request.mutable_header()->set_model("m");
         ToTensorInfos(good, request.mutable_header()->mutable_tensors());
         request.mutable_header()->mutable_tensors(0)->set_kind(
             static_cast<v1::TensorKind>(7));
         l.Send(request);
       },
       grpc::INVALID_ARGUMENT, "unknown tensor kind"},
      {"control character in a key",
       [&](RawLoad& l) {
         StateDict renamed;
         for (const auto& e : good.entries())
           renamed.Set(e.key == "0.weight" ? "0.wei\nght" : e.key, e.tensor);
         l.Header("m", renamed, /*strict=*/false);
       },
       grpc::INVALID_ARGUMENT, "control character"},
      {"chunk over the maximum",
       [&](RawLoad& l) {
         l.Header("m", good);
         l.Chunk(0, std::string(kMaxChunkBytes + 1, '\0'));
       },
       grpc::INVALID_ARGUMENT, "larger than the maximum"},
      {"unknown dtype",
       [&](RawLoad& l) {
         v1::LoadStateDictRequest request;
         request.mutable_header()->set_model("m");
         ToTensorInfos(good, request.mutable_header()->mutable_tensors());
         request.mutable_header()->mutable_tensors(0)->set_dtype(
             static_cast<v1::DType>(99));
         l.Send(request);
       },
       grpc::INVALID_ARGUMENT, "unknown dtype"},
      {"chunk below the minimum",
       [&](RawLoad& l) {
         l.Header("m", good);
         l.Chunk(0, data.substr(0, 7));
       },
       grpc::INVALID_ARGUMENT, "smaller than the minimum of 8"},
      {"empty chunk",
       [&](RawLoad& l) {
         l.Header("m", good);
         l.Chunk(0, "");
       },
       grpc::INVALID_ARGUMENT, "smaller than the minimum of 8"},
      {"chunk before header", [&](RawLoad& l) { l.Chunk(0, data); },
       grpc::INVALID_ARGUMENT, "must start with its header"},
      {"offset out of range",
       [&](RawLoad& l) {
         l.Header("m", good);
         l.Chunk(0, data + "extra");
       },
       grpc::INVALID_ARGUMENT, "runs past the end"},
      {"overlapping chunks",
       [&](RawLoad& l) {
         l.Header("m", good);
         l.Chunk(0, data.substr(0, 20));
         l.Chunk(10, data.substr(10));
       },
       grpc::INVALID_ARGUMENT, "overlap"},
      {"missing bytes",
       [&](RawLoad& l) {
         l.Header("m", good);
         l.Chunk(0, data.substr(0, 8));
         l.Chunk(12, data.substr(12));
       },
       grpc::INVALID_ARGUMENT, "missing bytes"},
      {"checksum mismatch",
       [&](RawLoad& l) {
         l.Header("m", good);
         std::string corrupt = data;
         corrupt[5] ^= 0x40;
         l.Chunk(0, corrupt);
       },
       grpc::DATA_LOSS, "checksum mismatch for tensor \"0.weight\""},
      {"end before the data",
       [&](RawLoad& l) {
         l.Header("m", good);
         l.Chunk(0, data.substr(0, 16));
         l.End(data.size());
       },
       grpc::INVALID_ARGUMENT, "stream ended after 16"},
      {"no end marker",
       [&](RawLoad& l) {
         l.Header("m", good);
         l.Chunk(0, data);
       },
       grpc::INVALID_ARGUMENT, "before its end marker"},
      {"second header",
       [&](RawLoad& l) {
         l.Header("m", good);
         l.Header("m", good);
       },
       grpc::INVALID_ARGUMENT, "only one header"},
      {"cancelled mid-stream",
       [&](RawLoad& l) {
         l.Header("m", good);
         l.Chunk(0, data.substr(0, 16));
         l.Cancel();
       },
       grpc::CANCELLED, ""},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    RawLoad load(*server);
    c.send(load);
    grpc::Status status = load.Finish();
    EXPECT_EQ(status.error_code(), c.code) << status.error_message();
    EXPECT_THAT(status.error_message(), HasSubstr(c.message));
    Snapshot after = server->store().GetSnapshot("m").value();
    EXPECT_EQ(after.version, 1);
    ExpectSameState(GetStateDict(after.root).value(), before);
    EXPECT_EQ(server->store().GetSnapshot("grown").status().code(),
              absl::StatusCode::kNotFound);
  }
  // The memory limit itself: a load whose staging would not fit is refused from
  // the header.
  ASSERT_TRUE(
      server->store()
          .Create(
              "big",
              BuildModuleFromSpec(
                  R"({"type": "Module", "parameters": {"w": {"shape": [200000]}}})")
                  .value())
          .ok());
  StateDict big_state = CoreState(*server, "big");
  RawLoad over_limit(*server);
  over_limit.Header("big", big_state);
  grpc::Status refused = over_limit.Finish();
  EXPECT_EQ(refused.error_code(), grpc::RESOURCE_EXHAUSTED)
      << refused.error_message();
  EXPECT_EQ(server->store().GetSnapshot("big").value().version, 1);

  // Staging memory is released once the failed streams are gone (on the
  // server's threads, after the client saw the status: poll, bounded).
  const absl::Time released_by = absl::Now() + absl::Seconds(60);
  while (server->store().reserved_bytes() != 0 && absl::Now() < released_by) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_EQ(server->store().reserved_bytes(), 0);
  // And a good load still works.
  EXPECT_EQ(client->LoadStateDict({"m"}, good).value().version, 2);
}

TEST(ServerTest, ABadHeaderIsRefusedBeforeAnyData) {
  auto server = StartServer();
  ASSERT_TRUE(server->store()
                  .Create("m", BuildModuleFromSpec(
                                   ReadSourceFile("tests/models/mlp.json"))
                                   .value())
                  .ok());
  StateDict wrong;
  wrong.Set("x", Tensor::Zeros(DType::kFloat32, {1 << 20}).value());
  RawLoad load(*server);
  ASSERT_TRUE(load.Header("m", wrong));
  // No chunk is sent: the answer comes from the header alone.
  grpc::Status status = load.Finish();
  EXPECT_EQ(status.error_code(), grpc::FAILED_PRECONDITION);
  EXPECT_THAT(status.error_message(),
              HasSubstr("Unexpected key(s) in state_dict: \"x\""));
}

TEST(ServerTest, ConcurrentLoadsAndSnapshotsNeverTear) {
  auto server = StartServer();
  ASSERT_TRUE(
      server->store()
          .Create(
              "m",
              BuildModuleFromSpec(
                  R"({"type": "Sequential", "modules": [{"type": "Linear", "args": [256, 256]},
                                             {"type": "Linear", "args": [256, 256]}]})")
                  .value())
          .ok());
  const StateDict shape = CoreState(*server, "m");
  ASSERT_TRUE(ConnectTo(*server)
                  ->LoadStateDict({"m"}, FilledLike(shape, 0))
                  .ok());  // uniform start
  // Readers start first and each fetches once before the writers start, and
  // each writer pauses halfway until every reader has fetched a version from
  // between the first and the last: reads overlap writes whatever the
  // scheduler does (on two busy cores the readers may otherwise not run).
  std::vector<absl::Notification> has_read(2), saw_midway(2);
  std::atomic<bool> stop{false};
  std::atomic<int> torn{0}, failed{0}, unseen_midway{0};
  std::vector<std::thread> threads;
  for (int r = 0; r < 2; ++r) {
    threads.emplace_back([&, r] {
      auto client = ConnectTo(*server);
      TransferOptions options;
      options.chunk_bytes = 64 << 10;
      while (!stop.load()) {
        absl::StatusOr<FetchedStateDict> fetched =
            client->StateDict({"m"}, options);
        if (!fetched.ok()) {
          ++failed;
          break;
        }
        const float first =
            fetched->state.entries()[0].tensor.data_as<float>()[0];
        for (const auto& entry : fetched->state.entries()) {
          for (int64_t i = 0; i < entry.tensor.num_elements(); ++i) {
            if (entry.tensor.data_as<float>()[i] != first) {
              ++torn;
              break;
            }
          }
        }
        if (!has_read[r].HasBeenNotified()) has_read[r].Notify();
        if (fetched->version > 2 && fetched->version < 32 &&
            !saw_midway[r].HasBeenNotified()) {
          saw_midway[r].Notify();
        }
      }
    });
  }
  for (absl::Notification& read : has_read)
    EXPECT_TRUE(read.WaitForNotificationWithTimeout(absl::Seconds(60)));
  for (int w = 0; w < 2; ++w) {
    threads.emplace_back([&, w] {
      auto client = ConnectTo(*server);
      for (int i = 1; i <= 15; ++i) {
        if (!client->LoadStateDict("m", FilledLike(shape, w * 100 + i)).ok())
          ++failed;
        if (i != 8) continue;  // halfway: the version stays below the last
        for (absl::Notification& midway : saw_midway) {
          if (!midway.WaitForNotificationWithTimeout(absl::Seconds(60)))
            ++unseen_midway;
        }
      }
    });
  }
  threads[2].join();
  threads[3].join();
  stop = true;
  threads[0].join();
  threads[1].join();
  EXPECT_EQ(torn.load(), 0);
  EXPECT_EQ(failed.load(), 0);
  EXPECT_EQ(unseen_midway.load(), 0) << "readers did not overlap the writers";
  EXPECT_EQ(server->store().GetSnapshot("m").value().version, 32);
}

TEST(ServerTest, OneGibModelRoundTrips) {
  auto server = StartServer();
  auto client = ConnectTo(*server);
  // 16 tensors of 64 MiB with distinct, position-dependent contents.
  auto root = std::make_shared<Module>("Big");
  for (int t = 0; t < 16; ++t) {
    TensorBuilder builder =
        TensorBuilder::CreateUninitialized(DType::kFloat32, {16 << 20}).value();
    uint32_t* words = builder.mutable_data_as<uint32_t>();
    for (int64_t i = 0; i < builder.num_elements(); ++i) {
      words[i] =
          static_cast<uint32_t>(i * 2654435761u) ^ static_cast<uint32_t>(t);
    }
    ASSERT_TRUE(
        root->AddParameter("w" + std::to_string(t), std::move(builder).Build())
            .ok());
  }
  ASSERT_TRUE(server->store().Create("big", root).ok());
  const StateDict served = CoreState(*server, "big");
  ASSERT_EQ(served.TotalBytes(), size_t{1} << 30);

  FetchedStateDict fetched = client->StateDict({"big"}).value();
  ASSERT_EQ(fetched.state.size(), 16u);
  for (size_t i = 0; i < 16; ++i) {
    EXPECT_EQ(fetched.state.entries()[i].tensor.Checksum(),
              served.entries()[i].tensor.Checksum());
    EXPECT_EQ(XXH3_64bits(fetched.state.entries()[i].tensor.data(), 64 << 20),
              served.entries()[i].tensor.Checksum());
  }
  LoadOutcome pushed = client->LoadStateDict({"big"}, fetched.state).value();
  EXPECT_EQ(pushed.version, 2);
  const StateDict after = CoreState(*server, "big");
  for (size_t i = 0; i < 16; ++i) {
    EXPECT_EQ(XXH3_64bits(after.entries()[i].tensor.data(), 64 << 20),
              served.entries()[i].tensor.Checksum());
  }
}

TEST(ServerTest, StreamingFetchHandsOverEachTensorOnce) {
  auto server = StartServer();
  auto client = ConnectTo(*server);
  ASSERT_TRUE(
      client->CreateModel("llama", ReadSourceFile("tests/models/llama.json"))
          .ok());
  const StateDict expected = CoreState(*server, "llama");
  size_t index = 0;
  TransferOptions options;
  options.chunk_bytes = 1000;
  absl::StatusOr<int64_t> version = client->StateDictStreaming(
      {"llama"}, options,
      [&](const TensorDescription& description, Tensor tensor) {
        EXPECT_EQ(description.name, expected.entries()[index].key);
        EXPECT_TRUE(tensor.BitwiseEquals(expected.entries()[index].tensor));
        // Not packed: a consumer keeping a tensor keeps only its bytes.
        EXPECT_EQ(tensor.storage()->size(), tensor.num_bytes());
        ++index;
        return absl::OkStatus();
      });
  EXPECT_EQ(version.value(), 1);
  EXPECT_EQ(index, expected.size());
  // A callback error stops the transfer and comes back as the result, as it
  // is: not as a bad stream (DataLoss), nor resumed as a dropped connection.
  for (const absl::Status& error : {absl::CancelledError("worker says stop"),
                                    absl::InvalidArgumentError("bad buffer"),
                                    absl::UnavailableError("device busy")}) {
    int calls = 0;
    absl::Status stopped =
        client
            ->StateDictStreaming({"llama"}, options,
                                 [&](const TensorDescription&, Tensor) {
                                   ++calls;
                                   return error;
                                 })
            .status();
    EXPECT_EQ(stopped, error);
    EXPECT_EQ(calls, 1);
  }
}

TEST(ServerTest, WatchStartsWithTheCurrentStateThenFollowsCommits) {
  auto server = StartServer();
  auto client = ConnectTo(*server);
  std::vector<std::string> events;
  absl::Mutex mu;
  auto watch = [&](const std::string& model, int count) {
    return std::thread([&, model, count] {
      auto watcher = ConnectTo(*server);
      int seen = 0;
      EXPECT_TRUE(watcher
                      ->Watch(model,
                              [&](const ModelEvent& event) {
                                absl::MutexLock lock(&mu);
                                events.push_back(absl::StrCat(
                                    v1::WatchModelResponse::Type_Name(
                                        ToProto(event).type()),
                                    "@", event.version));
                                return ++seen < count;
                              })
                      .ok());
    });
  };
  // Bounded, and a miss fails the test: going on would race the watch.
  auto wait_for = [&](size_t n) {
    auto arrived = [&] { return events.size() >= n; };
    absl::MutexLock lock(&mu);
    return mu.AwaitWithTimeout(absl::Condition(&arrived), absl::Seconds(60));
  };
  std::thread watcher = watch("m", 4);
  EXPECT_TRUE(wait_for(1));  // ABSENT
  EXPECT_TRUE(
      client->CreateModel("m", ReadSourceFile("tests/models/mlp.json")).ok());
  EXPECT_TRUE(wait_for(2));
  EXPECT_TRUE(
      client->LoadStateDict({"m"}, FilledLike(CoreState(*server, "m"), 1))
          .ok());
  EXPECT_TRUE(wait_for(3));
  EXPECT_TRUE(client->DeleteModel("m").ok());
  watcher.join();
  EXPECT_THAT(events,
              ElementsAre("ABSENT@0", "CREATED@1", "UPDATED@2", "DELETED@2"));
}

TEST(ServerTest, RoundRobinSpreadsCallsOverEveryAddress) {
  auto first = StartServer();
  auto second = StartServer();
  ASSERT_TRUE(first->store()
                  .CreateFromSpec("on_first", "{\"type\": \"ReLU\"}", 0)
                  .ok());
  ASSERT_TRUE(second->store()
                  .CreateFromSpec("on_second", "{\"type\": \"ReLU\"}", 0)
                  .ok());
  const std::string target = absl::StrCat("ipv4:127.0.0.1:", first->port(),
                                          ",127.0.0.1:", second->port());
  // Which servers `calls` ListModels calls reach, by their one model's name.
  auto reached = [&](const ClientOptions& options, int calls) {
    std::set<std::string> names;
    auto client = Client::Connect(target, options).value();
    for (int i = 0; i < calls; ++i) {
      absl::StatusOr<std::vector<ModelSummary>> models = client->ListModels();
      if (models.ok() && models->size() == 1) names.insert((*models)[0].name);
      if (names.size() == 2) break;
    }
    return names;
  };
  ClientOptions round_robin;
  round_robin.load_balancing_policy = "round_robin";
  round_robin.own_connection = true;
  EXPECT_THAT(reached(round_robin, 200), ElementsAre("on_first", "on_second"));
  // gRPC's default, pick_first, stays on one address: the option is what
  // spreads the calls.
  ClientOptions pinned;
  pinned.own_connection = true;
  EXPECT_EQ(reached(pinned, 20).size(), 1u);
}

// A client built against the v1 proto before later fields were added sends
// messages without them; hand-encoded here, they still work.
TEST(ServerTest, MessagesOfTheFirstV1ClientsStillWork) {
  auto server = StartServer();
  ASSERT_TRUE(
      server->store()
          .CreateFromSpec("m", ReadSourceFile("tests/models/mlp.json"), 0)
          .ok());
  auto channel = grpc::CreateChannel(absl::StrCat("127.0.0.1:", server->port()),
                                     grpc::InsecureChannelCredentials());
  // GetModelRequest{model: "m"}: field 1, length-delimited.
  const std::string get_model("\x0a\x01m", 3);
  grpc::Slice slice(get_model);
  grpc::ByteBuffer request(&slice, 1);
  grpc::ByteBuffer reply;
  grpc::ClientContext context;
  const grpc::internal::RpcMethod method("/modelstate.v1.ModelState/GetModel",
                                         grpc::internal::RpcMethod::NORMAL_RPC);
  ASSERT_TRUE(
      (grpc::internal::BlockingUnaryCall<grpc::ByteBuffer, grpc::ByteBuffer>(
           channel.get(), method, &context, request, &reply))
          .ok());
  v1::GetModelResponse response;
  ASSERT_TRUE(grpc::SerializationTraits<v1::GetModelResponse>::Deserialize(
                  &reply, &response)
                  .ok());
  EXPECT_EQ(response.summary().name(), "m");
  EXPECT_EQ(response.tensors_size(), 4);

  // A load that creates a model, with no class names: every module is
  // "Module", as before class names existed.
  StateDict state = CoreState(*server, "m");
  auto client = ConnectTo(*server);
  LoadRequest create{"copy"};
  create.create_if_missing = true;
  ASSERT_TRUE(client->LoadStateDict(create, state).ok());
  EXPECT_EQ(client->GetModel("copy").value().summary.root_class, "Module");
}

TEST(ServerTest, IdleStreamsEndAndReleaseWhatTheyHold) {
  ServerOptions options;
  options.stream_idle_timeout = absl::Seconds(1);
  options.memory_limit_bytes = 256 << 20;
  auto server = StartServer(options);
  ASSERT_TRUE(
      server->store()
          .CreateFromSpec("m", ReadSourceFile("tests/models/mlp.json"), 0)
          .ok());
  // A load that sends its header, reserving memory, then nothing.
  RawLoad stalled(*server);
  stalled.Header("m", CoreState(*server, "m"));
  auto pending_loads_reach = [&](int n) {
    for (int i = 0; i < 1000 && server->store().pending_loads() != n; ++i)
      absl::SleepFor(absl::Milliseconds(10));
    return server->store().pending_loads() == n;
  };
  EXPECT_TRUE(pending_loads_reach(1));
  EXPECT_TRUE(pending_loads_reach(0));  // The watchdog ended it.
  grpc::Status ended = stalled.Finish();
  EXPECT_EQ(ended.error_code(), grpc::DEADLINE_EXCEEDED)
      << ended.error_message();
  EXPECT_THAT(ended.error_message(), HasSubstr("sent nothing for 1s"));
  EXPECT_EQ(server->store().pending_loads(), 0);
  EXPECT_EQ(server->store().reserved_bytes(), 0);

  // A fetch whose client stops reading is cancelled; one that reads slowly
  // but steadily is not.
  ASSERT_TRUE(server->store()
                  .CreateFromSpec("big",
                                  R"({"type": "Module", "parameters": {"w": )"
                                  R"({"shape": [16777216], "init": "ones"}}})",
                                  0)
                  .ok());
  auto read_all = [&](absl::Duration pause_after_first, absl::Duration pause) {
    auto channel =
        grpc::CreateChannel(absl::StrCat("127.0.0.1:", server->port()),
                            grpc::InsecureChannelCredentials());
    auto stub = v1::ModelState::NewStub(channel);
    grpc::ClientContext context;
    v1::StateDictRequest request;
    request.set_model("big");
    request.set_chunk_bytes(64 << 10);
    auto reader = stub->StateDict(&context, request);
    v1::StateDictResponse response;
    int messages = 0;
    while (reader->Read(&response)) {
      absl::SleepFor(++messages == 1 ? pause_after_first : pause);
    }
    return reader->Finish();
  };
  EXPECT_EQ(read_all(absl::Seconds(3), absl::ZeroDuration()).error_code(),
            grpc::CANCELLED);
  // 1,024 messages with a 1 ms pause after each: longer than the timeout in
  // all, yet never idle for it (at 64 MB/s even gRPC's largest flow-control
  // window refills well within the timeout).
  grpc::Status steady = read_all(absl::ZeroDuration(), absl::Milliseconds(1));
  EXPECT_TRUE(steady.ok()) << steady.error_message();
}

TEST(ServerTest, LoadsBeyondTheCapAreRefused) {
  ServerOptions options;
  options.max_pending_loads = 1;
  auto server = StartServer(options);
  ASSERT_TRUE(
      server->store()
          .CreateFromSpec("m", ReadSourceFile("tests/models/mlp.json"), 0)
          .ok());
  const StateDict state = CoreState(*server, "m");
  RawLoad first(*server);
  first.Header("m", state);
  // The first load's header is being handled or holds its place.
  for (int i = 0; i < 500 && server->store().pending_loads() == 0; ++i)
    absl::SleepFor(absl::Milliseconds(10));
  ASSERT_EQ(server->store().pending_loads(), 1);
  RawLoad second(*server);
  second.Header("m", state);
  grpc::Status refused = second.Finish();
  EXPECT_EQ(refused.error_code(), grpc::RESOURCE_EXHAUSTED)
      << refused.error_message();
  first.Chunk(0, Bytes(state));
  first.End(state.TotalBytes());
  EXPECT_TRUE(first.Finish().ok());
}

TEST(ServerTest, MetricsCountRpcsBytesAndTheStoresState) {
  ServerOptions options;
  options.metrics_listen = "127.0.0.1:0";
  options.memory_limit_bytes = 1 << 30;
  auto server = StartServer(options);
  ASSERT_GT(server->metrics_port(), 0);
  auto client = ConnectTo(*server);
  ASSERT_TRUE(
      client->CreateModel("m", ReadSourceFile("tests/models/mlp.json")).ok());
  const StateDict state = client->StateDict({"m"}).value().state;
  ASSERT_TRUE(client->LoadStateDict({"m"}, state).ok());
  EXPECT_FALSE(client->GetModel("nope").ok());
  // A call's metrics are recorded when the server is done with it, which may
  // be just after its client got the answer: scrape until they show.
  auto scrape_until = [&](const std::vector<std::string>& wanted) {
    std::string page;
    for (int i = 0; i < 200; ++i) {
      page = testing_support::HttpGet(server->metrics_port(), "/metrics");
      if (std::all_of(wanted.begin(), wanted.end(), [&](const std::string& w) {
            return page.find(w) != std::string::npos;
          })) {
        break;
      }
      absl::SleepFor(absl::Milliseconds(50));
    }
    return page;
  };
  const std::string bytes = std::to_string(state.TotalBytes());
  const std::vector<std::string> first_lines = {
      "200 OK",
      R"(modelstate_rpcs_total{code="NOT_FOUND",method="GetModel"} 1)",
      R"(modelstate_rpcs_total{code="OK",method="LoadStateDict"} 1)",
      absl::StrCat(R"(modelstate_tensor_bytes_total{direction="sent"} )",
                   bytes),
      absl::StrCat(R"(modelstate_tensor_bytes_total{direction="received"} )",
                   bytes),
      R"(modelstate_rpc_duration_seconds_count{method="StateDict"} 1)",
      R"(modelstate_model_version{model="m"} 2)",
      absl::StrCat(R"(modelstate_model_bytes{model="m"} )", bytes),
      "modelstate_memory_limit_bytes 1073741824",
      "modelstate_pending_loads 0"};
  const std::string first = scrape_until(first_lines);
  for (const std::string& line : first_lines)
    EXPECT_THAT(first, HasSubstr(line));
  // The counters move.
  ASSERT_TRUE(client->LoadStateDict({"m"}, state).ok());
  const std::vector<std::string> second_lines = {
      R"(modelstate_rpcs_total{code="OK",method="LoadStateDict"} 2)",
      R"(modelstate_model_version{model="m"} 3)"};
  const std::string second = scrape_until(second_lines);
  for (const std::string& line : second_lines)
    EXPECT_THAT(second, HasSubstr(line));
}

TEST(ServerTest, HealthAndReflectionAnswer) {
  ServerOptions options;
  options.demo_model = "demo";
  options.health_listen = "127.0.0.1:0";
  auto server = StartServer(options);
  auto client = ConnectTo(*server);
  EXPECT_TRUE(client->CheckHealth().value());
  EXPECT_TRUE(client->CheckHealth("modelstate.v1.ModelState").value());
  EXPECT_EQ(client->CheckHealth("nope").status().code(),
            absl::StatusCode::kNotFound);
  auto health_only =
      Client::Connect("127.0.0.1:" + std::to_string(server->health_port()))
          .value();
  EXPECT_TRUE(health_only->CheckHealth().value());
  EXPECT_EQ(health_only->ListModels().status().code(),
            absl::StatusCode::kUnimplemented);
  EXPECT_EQ(client->GetModel("demo").value().summary.root_class, "Sequential");

  auto reflection =
      grpc::reflection::v1alpha::ServerReflection::NewStub(client->channel());
  grpc::ClientContext context;
  auto stream = reflection->ServerReflectionInfo(&context);
  grpc::reflection::v1alpha::ServerReflectionRequest request;
  request.set_list_services("*");
  ASSERT_TRUE(stream->Write(request));
  stream->WritesDone();
  grpc::reflection::v1alpha::ServerReflectionResponse response;
  ASSERT_TRUE(stream->Read(&response));
  std::vector<std::string> services;
  for (const auto& service : response.list_services_response().service()) {
    services.push_back(service.name());
  }
  EXPECT_THAT(services, ::testing::Contains("modelstate.v1.ModelState"));
  EXPECT_THAT(services, ::testing::Contains("grpc.health.v1.Health"));
  while (stream->Read(&response)) {
  }
  EXPECT_TRUE(stream->Finish().ok());

  server->Shutdown(absl::Seconds(1));
  server->Wait();
}

TEST(ServerTest, TlsAndMutualTls) {
  const testing_support::Certificates pki = testing_support::MakeCertificates();
  ServerOptions tls;
  tls.demo_model = "demo";
  tls.tls_cert_file = pki.server_cert;
  tls.tls_key_file = pki.server_key;
  auto server = StartServer(tls);
  const std::string target = "localhost:" + std::to_string(server->port());
  ClientOptions trusted;
  trusted.tls_ca_file = pki.ca;
  EXPECT_EQ(
      Client::Connect(target, trusted).value()->ListModels().value().size(),
      1u);
  ClientOptions plaintext;
  plaintext.timeout = absl::Seconds(5);
  EXPECT_FALSE(Client::Connect(target, plaintext).value()->ListModels().ok());

  ServerOptions mtls = tls;
  mtls.tls_client_ca_file = pki.ca;
  auto mutual = StartServer(mtls);
  const std::string mutual_target =
      "localhost:" + std::to_string(mutual->port());
  ClientOptions with_cert = trusted;
  with_cert.tls_cert_file = pki.client_cert;
  with_cert.tls_key_file = pki.client_key;
  EXPECT_EQ(Client::Connect(mutual_target, with_cert)
                .value()
                ->ListModels()
                .value()
                .size(),
            1u);
  ClientOptions without_cert = trusted;
  without_cert.timeout = absl::Seconds(5);
  absl::Status refused = Client::Connect(mutual_target, without_cert)
                             .value()
                             ->ListModels()
                             .status();
  EXPECT_EQ(refused.code(), absl::StatusCode::kUnavailable) << refused;
  ClientOptions rogue = trusted;
  rogue.tls_cert_file = pki.rogue_cert;
  rogue.tls_key_file = pki.rogue_key;
  rogue.timeout = absl::Seconds(5);
  EXPECT_FALSE(
      Client::Connect(mutual_target, rogue).value()->ListModels().ok());
}

// Opens a watch of `model` on `channel` and reads its first event (the state
// when it began). The context's deadline bounds every later read.
struct RawWatch {
  RawWatch(const std::shared_ptr<grpc::Channel>& channel,
           const std::string& model)
      : stub(v1::ModelState::NewStub(channel)) {
    context.set_deadline(std::chrono::system_clock::now() +
                         std::chrono::seconds(60));
    v1::WatchModelRequest request;
    request.set_model(model);
    reader = stub->WatchModel(&context, request);
    opened = reader->Read(&event);
  }
  std::unique_ptr<v1::ModelState::Stub> stub;
  grpc::ClientContext context;
  std::unique_ptr<grpc::ClientReader<v1::WatchModelResponse>> reader;
  v1::WatchModelResponse event;
  bool opened = false;
};

TEST(ServerTest, ClientsThatPingTooOftenAreDisconnectedOthersAreNot) {
  ServerOptions options;
  options.keepalive_min_ping_interval = absl::Seconds(1);
  options.keepalive_max_ping_strikes = 2;
  auto server = StartServer(options);
  const std::string address = absl::StrCat("127.0.0.1:", server->port());
  const absl::Time start = absl::Now();
  RawWatch polite(testing_support::PingingChannel(address, absl::Seconds(2)),
                  "w");
  ASSERT_TRUE(polite.opened);
  // A client pinging every 10 ms gets GOAWAY (ENHANCE_YOUR_CALM) at its third
  // ping, and the connection is closed.
  EXPECT_EQ(testing_support::PingFlood(server->port(), absl::Milliseconds(10),
                                       absl::Seconds(30)),
            testing_support::kEnhanceYourCalm);
  // With enforcement off it is borne.
  ServerOptions lenient;
  lenient.keepalive_max_ping_strikes = 0;
  auto tolerant = StartServer(lenient);
  EXPECT_EQ(testing_support::PingFlood(tolerant->port(), absl::Milliseconds(10),
                                       absl::Seconds(1)),
            testing_support::kFloodStillOpen);
  // The polite client pings every 2 s for a while longer and keeps its watch.
  absl::SleepFor(start + absl::Seconds(5) - absl::Now());
  auto client = ConnectTo(*server);
  ASSERT_TRUE(
      client->CreateModel("w", ReadSourceFile("tests/models/mlp.json")).ok());
  ASSERT_TRUE(polite.reader->Read(&polite.event));
  EXPECT_EQ(polite.event.type(), v1::WatchModelResponse::CREATED);
  polite.context.TryCancel();
}

TEST(ServerTest, IdleConnectionsAreClosedAfterMaxConnectionIdle) {
  for (absl::Duration idle : {absl::Milliseconds(300), absl::Minutes(30)}) {
    SCOPED_TRACE(idle);
    ServerOptions options;
    options.max_connection_idle = idle;
    auto server = StartServer(options);
    auto channel =
        grpc::CreateChannel(absl::StrCat("127.0.0.1:", server->port()),
                            grpc::InsecureChannelCredentials());
    auto stub = v1::ModelState::NewStub(channel);
    grpc::ClientContext context;
    v1::ListModelsRequest request;
    v1::ListModelsResponse response;
    ASSERT_TRUE(stub->ListModels(&context, request, &response).ok());
    // The server's GOAWAY takes the channel back to IDLE; without one it
    // stays READY.
    const absl::Time deadline = absl::Now() + absl::Seconds(3);
    while (channel->GetState(false) == GRPC_CHANNEL_READY &&
           absl::Now() < deadline) {
      absl::SleepFor(absl::Milliseconds(20));
    }
    EXPECT_EQ(channel->GetState(false) == GRPC_CHANNEL_READY,
              idle > absl::Seconds(3));
  }
}

TEST(ServerTest, FetchChunksBelowTheMinimumAreRaisedToIt) {
  ServerOptions options;
  options.min_chunk_bytes = 4096;
  auto server = StartServer(options);
  ASSERT_TRUE(
      server->store()
          .Create(
              "w",
              BuildModuleFromSpec(
                  R"({"type": "Module", "parameters": {"w": {"shape": [5000]}}})")
                  .value())
          .ok());
  auto channel = grpc::CreateChannel(absl::StrCat("127.0.0.1:", server->port()),
                                     grpc::InsecureChannelCredentials());
  auto stub = v1::ModelState::NewStub(channel);
  for (uint32_t asked : {1u, 4096u, 10000u}) {
    SCOPED_TRACE(asked);
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() +
                         std::chrono::seconds(60));
    v1::StateDictRequest request;
    request.set_model("w");
    request.set_chunk_bytes(asked);
    auto reader = stub->StateDict(&context, request);
    v1::StateDictResponse response;
    std::vector<size_t> sizes;
    while (reader->Read(&response)) {
      if (response.has_chunk()) sizes.push_back(response.chunk().data().size());
    }
    ASSERT_TRUE(reader->Finish().ok());
    const size_t chunk = std::max<size_t>(asked, 4096);
    ASSERT_EQ(sizes.size(), (20000 + chunk - 1) / chunk);
    EXPECT_EQ(sizes[0], std::min<size_t>(chunk, 20000));
  }
}

}  // namespace
}  // namespace modelstate

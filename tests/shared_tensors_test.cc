// Tensors held under several keys (torch's tied parameters) over the wire:
// stored once, sent once to clients that accept shared tensors, every key's
// bytes to those that do not.
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "model/test_util.h"
#include "proto/convert.h"
#include "tests/test_support.h"

namespace modelstate {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using testing_support::ConnectTo;
using testing_support::CoreState;
using testing_support::StartServer;

constexpr int64_t kEmbeddingBytes = 256 * 32 * 4;
constexpr int64_t kBodyBytes = 32 * 32 * 4;

StateDict TiedState(float value) {
  StateDict state;
  const Tensor embedding = FullTensor(DType::kFloat32, {256, 32}, value);
  state.Set("embed.weight", embedding);
  state.Set("body.weight", FullTensor(DType::kFloat32, {32, 32}, 2));
  state.Set("head.weight", embedding);
  return state;
}

class SharedTensorsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    server_ = StartServer();
    client_ = ConnectTo(*server_);
    LoadRequest create{"lm"};
    create.create_if_missing = true;
    ASSERT_TRUE(client_->Load(create, TiedState(1)).ok());
  }

  // Every StateDict response of a raw fetch of "lm".
  std::vector<v1::StateDictResponse> RawFetch(bool accept_shared) {
    auto stub = v1::ModelState::NewStub(
        grpc::CreateChannel("127.0.0.1:" + std::to_string(server_->port()),
                            grpc::InsecureChannelCredentials()));
    grpc::ClientContext context;
    v1::StateDictRequest request;
    request.set_model("lm");
    request.set_accept_shared_tensors(accept_shared);
    auto reader = stub->StateDict(&context, request);
    std::vector<v1::StateDictResponse> responses;
    v1::StateDictResponse response;
    while (reader->Read(&response)) responses.push_back(response);
    EXPECT_TRUE(reader->Finish().ok());
    return responses;
  }

  std::unique_ptr<Server> server_;
  std::unique_ptr<Client> client_;
};

TEST_F(SharedTensorsTest, TheLoadSentTheTiedTensorOnceAndTheStoreHoldsItOnce) {
  const StateDict held = CoreState(*server_, "lm");
  EXPECT_TRUE(
      held.Find("embed.weight")->SharesBytesWith(*held.Find("head.weight")));
}

TEST_F(SharedTensorsTest, ReadersThatDoNotAcceptSharingGetEveryKeysBytes) {
  const std::vector<v1::StateDictResponse> responses = RawFetch(false);
  ASSERT_FALSE(responses.empty());
  const v1::Manifest& manifest = responses.front().manifest();
  EXPECT_EQ(manifest.total_bytes(), 2 * kEmbeddingBytes + kBodyBytes);
  for (const v1::TensorInfo& info : manifest.tensors())
    EXPECT_EQ(info.shared_with(), "") << info.name();
  EXPECT_EQ(responses.back().end().total_bytes(), manifest.total_bytes());
}

TEST_F(SharedTensorsTest, ReadersThatAcceptSharingGetTheBytesOnce) {
  const std::vector<v1::StateDictResponse> responses = RawFetch(true);
  ASSERT_FALSE(responses.empty());
  const v1::Manifest& manifest = responses.front().manifest();
  EXPECT_EQ(manifest.total_bytes(), kEmbeddingBytes + kBodyBytes);
  ASSERT_EQ(manifest.tensors_size(), 3);
  EXPECT_EQ(manifest.tensors(2).shared_with(), "embed.weight");
  EXPECT_EQ(manifest.tensors(2).num_bytes(), kEmbeddingBytes);
  EXPECT_EQ(manifest.tensors(2).xxh3_64(), manifest.tensors(0).xxh3_64());

  uint64_t total = 0;
  TransferOptions transfer;
  transfer.progress = [&](uint64_t, uint64_t all) { total = all; };
  const FetchedStateDict fetched = client_->Fetch({"lm"}, transfer).value();
  EXPECT_EQ(total, kEmbeddingBytes + kBodyBytes);
  EXPECT_THAT(fetched.state.Keys(),
              ElementsAre("embed.weight", "body.weight", "head.weight"));
  EXPECT_TRUE(fetched.state.Find("head.weight")
                  ->SharesBytesWith(*fetched.state.Find("embed.weight")));
  EXPECT_TRUE(fetched.state.Find("head.weight")
                  ->BitwiseEquals(FullTensor(DType::kFloat32, {256, 32}, 1)));
}

TEST_F(SharedTensorsTest, FetchIntoFillsEveryDestinationOfATiedTensor) {
  for (bool in_place : {false, true}) {
    std::vector<float> embed(256 * 32), head(256 * 32), body(32 * 32);
    std::vector<Destination> destinations = {
        {"embed.weight", DType::kFloat32, {256, 32}, embed.data()},
        {"body.weight", DType::kFloat32, {32, 32}, body.data()},
        {"head.weight", DType::kFloat32, {256, 32}, head.data()}};
    std::vector<std::string> written;
    IntoOptions into;
    into.allow_partial_write = in_place;
    into.written_keys = &written;
    ASSERT_TRUE(client_->FetchInto({"lm"}, destinations, {}, into).ok());
    EXPECT_THAT(written,
                ElementsAre("embed.weight", "body.weight", "head.weight"));
    EXPECT_EQ(embed.front(), 1.0f);
    EXPECT_EQ(head.back(), 1.0f);
    EXPECT_EQ(body.front(), 2.0f);
  }
  // One tensor under both keys, as a torch module with tied weights: a bf16
  // copy of it is cast and written once per distinct memory.
  std::vector<uint16_t> tied(256 * 32), body(32 * 32);
  std::vector<Destination> destinations = {
      {"embed.weight", DType::kBFloat16, {256, 32}, tied.data()},
      {"body.weight", DType::kBFloat16, {32, 32}, body.data()},
      {"head.weight", DType::kBFloat16, {256, 32}, tied.data()}};
  ASSERT_TRUE(client_->FetchInto({"lm"}, destinations).ok());
  EXPECT_EQ(tied.back(), 0x3f80);  // 1.0 in bfloat16.
}

// The header of a load of TiedState(5) into "lm" whose third key names
// `source` as the tensor it shares, with every checksum when `checksummed`.
v1::LoadStateDictRequest SharedHeader(const std::string& source,
                                      bool checksummed) {
  const StateDict update = TiedState(5);
  v1::LoadStateDictRequest request;
  v1::LoadHeader* header = request.mutable_header();
  header->set_model("lm");
  ToTensorInfos(update, header->mutable_tensors());
  for (int i = 0; checksummed && i < 3; ++i) {
    header->mutable_tensors(i)->set_xxh3_64(
        update.entries()[i].tensor.Checksum());
  }
  header->mutable_tensors(2)->set_shared_with(source);
  header->set_total_bytes(kEmbeddingBytes + kBodyBytes);
  return request;
}

// Sends `messages` as one load to `server` and returns its status.
grpc::Status SendLoad(const Server& server,
                      const std::vector<v1::LoadStateDictRequest>& messages) {
  auto stub = v1::ModelState::NewStub(
      grpc::CreateChannel("127.0.0.1:" + std::to_string(server.port()),
                          grpc::InsecureChannelCredentials()));
  grpc::ClientContext context;
  v1::LoadStateDictResponse response;
  auto writer = stub->LoadStateDict(&context, &response);
  for (const v1::LoadStateDictRequest& message : messages) {
    if (!writer->Write(message)) break;
  }
  writer->WritesDone();
  return writer->Finish();
}

TEST_F(SharedTensorsTest, ALoadNamingABadSourceIsRefusedAndChangesNothing) {
  for (const std::string& source : {"nope", "head.weight", "body.weight"}) {
    const grpc::Status status =
        SendLoad(*server_, {SharedHeader(source, /*checksummed=*/false)});
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT)
        << source;
    EXPECT_THAT(status.error_message(), HasSubstr("head.weight"));
  }
  EXPECT_TRUE(CoreState(*server_, "lm")
                  .Find("head.weight")
                  ->BitwiseEquals(FullTensor(DType::kFloat32, {256, 32}, 1)));
}

TEST_F(SharedTensorsTest, ASharedKeyWhoseChecksumDiffersIsRefused) {
  const StateDict update = TiedState(5);
  v1::LoadStateDictRequest header =
      SharedHeader("embed.weight", /*checksummed=*/true);
  header.mutable_header()->mutable_tensors(2)->set_xxh3_64(
      update.entries()[1].tensor.Checksum());
  // One chunk (under the minimum chunk size only as the last one).
  v1::LoadStateDictRequest chunk;
  chunk.mutable_chunk()->set_offset(0);
  for (int i = 0; i < 2; ++i) {
    const Tensor& tensor = update.entries()[i].tensor;
    chunk.mutable_chunk()->mutable_data()->append(
        reinterpret_cast<const char*>(tensor.data()), tensor.num_bytes());
  }
  v1::LoadStateDictRequest end;
  end.mutable_end()->set_total_bytes(kEmbeddingBytes + kBodyBytes);
  const grpc::Status status = SendLoad(*server_, {header, chunk, end});
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(status.error_message(), HasSubstr("checksum differs"));
}

}  // namespace
}  // namespace modelstate

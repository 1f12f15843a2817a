#include "core/transfer.h"

#include <string>

#include "core/test_util.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace modelstate {
namespace {

using ::testing::HasSubstr;

std::vector<Tensor> SampleTensors() {
  std::vector<Tensor> tensors;
  tensors.push_back(FloatTensor({3}, {1, 2, 3}));
  tensors.push_back(Tensor::Zeros(DType::kFloat32, {0}).value());
  tensors.push_back(FullTensor(DType::kBFloat16, {100}, 2.5f));
  tensors.push_back(Tensor::Zeros(DType::kInt64, {}).value());
  tensors.push_back(FullTensor(DType::kFloat32, {1000}, -1.0f));
  return tensors;
}

std::vector<TransferEntry> EntriesOf(const std::vector<Tensor>& tensors) {
  std::vector<TransferEntry> entries;
  for (size_t i = 0; i < tensors.size(); ++i) {
    entries.push_back({"t" + std::to_string(i), tensors[i].dtype(),
                       tensors[i].shape(), tensors[i].Checksum()});
  }
  return entries;
}

std::string Join(const ChunkSender::Chunk& chunk) {
  std::string out;
  for (auto piece : chunk.pieces)
    out.append(reinterpret_cast<const char*>(piece.data()), piece.size());
  return out;
}

TEST(TransferTest, RoundTripsAtEveryChunkSize) {
  const std::vector<Tensor> tensors = SampleTensors();
  for (uint64_t chunk_bytes : {1, 7, 64, 4096, 1 << 20}) {
    ChunkSender sender(tensors, chunk_bytes);
    auto receiver = ChunkReceiver::Create(EntriesOf(tensors)).value();
    ChunkSender::Chunk chunk;
    int chunks = 0;
    while (sender.Next(&chunk)) {
      ASSERT_LE(chunk.size, chunk_bytes);
      ASSERT_TRUE(receiver->Accept(chunk.offset, Join(chunk)).ok());
      ++chunks;
    }
    EXPECT_EQ(chunks, (sender.total_bytes() + chunk_bytes - 1) / chunk_bytes);
    std::vector<Tensor> received =
        receiver->Finish(sender.total_bytes()).value();
    ASSERT_EQ(received.size(), tensors.size());
    for (size_t i = 0; i < tensors.size(); ++i)
      EXPECT_TRUE(received[i].BitwiseEquals(tensors[i]));
  }
}

TEST(TransferTest, SenderPiecesAliasTensorStorage) {
  const std::vector<Tensor> tensors = SampleTensors();
  ChunkSender sender(tensors, 1 << 20);
  ChunkSender::Chunk chunk;
  ASSERT_TRUE(sender.Next(&chunk));
  EXPECT_EQ(chunk.pieces.front().data(), tensors[0].data());
  EXPECT_EQ(chunk.pieces.size(), 4u);  // the empty tensor contributes no piece
}

TEST(TransferTest, BadStreamsAreRefused) {
  const std::vector<Tensor> tensors = SampleTensors();
  const std::string first(reinterpret_cast<const char*>(tensors[0].data()), 12);
  {
    auto receiver = ChunkReceiver::Create(EntriesOf(tensors)).value();
    EXPECT_THAT(std::string(receiver->Accept(4, "abcd").message()),
                HasSubstr("missing bytes"));
    EXPECT_FALSE(receiver->Accept(0, first).ok());  // dead after an error
  }
  {
    auto receiver = ChunkReceiver::Create(EntriesOf(tensors)).value();
    ASSERT_TRUE(receiver->Accept(0, first).ok());
    EXPECT_THAT(std::string(receiver->Accept(8, "abcd").message()),
                HasSubstr("overlap"));
  }
  {
    auto receiver = ChunkReceiver::Create(EntriesOf(tensors)).value();
    EXPECT_THAT(
        std::string(receiver->Accept(0, std::string(5000, 'x')).message()),
        HasSubstr("runs past the end"));
  }
  {
    auto receiver = ChunkReceiver::Create(EntriesOf(tensors)).value();
    std::string corrupt = first;
    corrupt[0] ^= 1;
    absl::Status status = receiver->Accept(0, corrupt);
    EXPECT_EQ(status.code(), absl::StatusCode::kDataLoss);
    EXPECT_THAT(std::string(status.message()), HasSubstr("tensor \"t0\""));
  }
  {
    auto receiver = ChunkReceiver::Create(EntriesOf(tensors)).value();
    ASSERT_TRUE(receiver->Accept(0, first).ok());
    EXPECT_THAT(std::string(receiver->Finish(12).status().message()),
                HasSubstr("stream ended"));
  }
  std::vector<TransferEntry> bad = {{"x", DType::kFloat32, {-1}, 0}};
  EXPECT_EQ(ChunkReceiver::Create(bad).status().code(),
            absl::StatusCode::kInvalidArgument);
  std::vector<TransferEntry> huge = {
      {"a", DType::kFloat64, {INT64_MAX / 9}, 0},
      {"b", DType::kFloat64, {INT64_MAX / 9}, 0}};
  EXPECT_EQ(ChunkReceiver::Create(huge).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(TransferTest, CallbackReceivesEachTensorOnceVerified) {
  const std::vector<Tensor> tensors = SampleTensors();
  std::vector<size_t> seen;
  auto receiver = ChunkReceiver::Create(EntriesOf(tensors), [&](size_t index,
                                                                Tensor tensor) {
                    EXPECT_TRUE(tensor.BitwiseEquals(tensors[index]));
                    seen.push_back(index);
                    return absl::OkStatus();
                  }).value();
  ChunkSender sender(tensors, 100);
  ChunkSender::Chunk chunk;
  while (sender.Next(&chunk))
    ASSERT_TRUE(receiver->Accept(chunk.offset, Join(chunk)).ok());
  EXPECT_TRUE(receiver->Finish(sender.total_bytes()).value().empty());
  EXPECT_EQ(seen, (std::vector<size_t>{0, 1, 2, 3, 4}));
}

TEST(TransferTest, ChunksBelowTheMinimumAreRefusedUnlessTheyEndTheStream) {
  const std::vector<Tensor> tensors = SampleTensors();
  ChunkSender sender(tensors, 1000);
  std::string data;
  ChunkSender::Chunk chunk;
  while (sender.Next(&chunk)) data += Join(chunk);
  ASSERT_EQ(data.size(), 4220u);
  // Full chunks of the minimum and a short last one: accepted.
  auto good = ChunkReceiver::Create(EntriesOf(tensors), nullptr, 1000).value();
  for (uint64_t offset = 0; offset < data.size(); offset += 1000) {
    ASSERT_TRUE(good->Accept(offset, data.substr(offset, 1000)).ok());
  }
  ASSERT_TRUE(good->Finish(data.size()).ok());
  // A small chunk anywhere but at the end, or an empty one anywhere: refused.
  for (const auto& [first, second] :
       std::vector<std::pair<size_t, size_t>>{{999, 0}, {0, 0}, {4220, 0}}) {
    SCOPED_TRACE(first);
    auto bad = ChunkReceiver::Create(EntriesOf(tensors), nullptr, 1000).value();
    absl::Status status = bad->Accept(0, data.substr(0, first));
    if (status.ok()) status = bad->Accept(first, data.substr(first, second));
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(status.message()),
                HasSubstr("smaller than the minimum of 1000"));
  }
  // Without a minimum (the default) one-byte chunks are fine.
  auto any = ChunkReceiver::Create(EntriesOf(tensors)).value();
  for (size_t i = 0; i < data.size(); ++i)
    ASSERT_TRUE(any->Accept(i, data.substr(i, 1)).ok());
}

}  // namespace
}  // namespace modelstate

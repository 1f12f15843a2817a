#include "proto/chunk_frame.h"

#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "modelstate/v1/model_state.pb.h"

namespace modelstate {
namespace {

std::string Flatten(const grpc::ByteBuffer& buffer) {
  std::vector<grpc::Slice> slices;
  EXPECT_TRUE(buffer.Dump(&slices).ok());
  std::string out;
  for (const grpc::Slice& slice : slices) {
    out.append(reinterpret_cast<const char*>(slice.begin()), slice.size());
  }
  return out;
}

TEST(ChunkFrameTest, BytesEqualProtobufSerialization) {
  std::vector<Tensor> tensors;
  for (int64_t n : {3, 0, 70000, 5}) {
    TensorBuilder builder = TensorBuilder::Create(DType::kFloat32, {n}).value();
    for (int64_t i = 0; i < n; ++i)
      builder.mutable_data_as<float>()[i] = i * 0.5f;
    tensors.push_back(std::move(builder).Build());
  }
  for (uint64_t chunk_bytes : {1, 7, 1000, 1 << 20}) {
    ChunkSender sender(tensors, chunk_bytes);
    ChunkSender::Chunk chunk;
    while (sender.Next(&chunk)) {
      v1::StateDictResponse expected;
      expected.mutable_chunk()->set_offset(chunk.offset);
      for (auto piece : chunk.pieces) {
        expected.mutable_chunk()->mutable_data()->append(
            reinterpret_cast<const char*>(piece.data()), piece.size());
      }
      const std::string framed = Flatten(FrameStateDictChunk(chunk));
      ASSERT_EQ(framed, expected.SerializeAsString())
          << "offset " << chunk.offset;
      v1::StateDictResponse parsed;
      ASSERT_TRUE(parsed.ParseFromString(framed));
      EXPECT_EQ(parsed.chunk().offset(), chunk.offset);
    }
  }
}

TEST(ChunkFrameTest, SlicesKeepTheStorageAlive) {
  grpc::ByteBuffer buffer;
  std::weak_ptr<const Storage> weak;
  {
    Tensor tensor = Tensor::Zeros(DType::kUInt8, {4096}).value();
    weak = tensor.storage();
    ChunkSender sender({tensor}, 1 << 20);
    ChunkSender::Chunk chunk;
    ASSERT_TRUE(sender.Next(&chunk));
    buffer = FrameStateDictChunk(chunk);
  }
  EXPECT_FALSE(weak.expired());  // gRPC still holds the bytes
  buffer.Clear();
  EXPECT_TRUE(weak.expired());
}

TEST(ChunkFrameTest, ReadBackWithoutParsingAndWithTheFallback) {
  std::vector<Tensor> tensors;
  for (int64_t n : {1000, 3, 5000}) {
    TensorBuilder builder = TensorBuilder::Create(DType::kInt32, {n}).value();
    for (int64_t i = 0; i < n; ++i)
      builder.mutable_data_as<int32_t>()[i] = i * 7 + n;
    tensors.push_back(std::move(builder).Build());
  }
  ChunkSender sender(tensors, 3000);
  ChunkSender::Chunk chunk;
  std::string received;
  v1::StateDictResponse message;
  while (sender.Next(&chunk)) {
    grpc::ByteBuffer buffer = FrameStateDictChunk(chunk);
    absl::StatusOr<bool> read = ReadStateDictFrame(
        &buffer, &message, [&](uint64_t offset, absl::string_view piece) {
          EXPECT_EQ(offset, received.size());
          received.append(piece.data(), piece.size());
          return absl::OkStatus();
        });
    ASSERT_TRUE(read.ok()) << read.status();
    EXPECT_TRUE(*read);
    EXPECT_FALSE(message.has_chunk());  // the fast path parsed no message
  }
  std::string expected;
  for (const Tensor& t : tensors)
    expected.append(reinterpret_cast<const char*>(t.data()), t.num_bytes());
  EXPECT_EQ(received, expected);

  // Data before offset is valid protobuf but not the canonical layout: parsed
  // the slow way.
  const std::string reordered = std::string(
      "\x12\x07\x12\x03"
      "abc"
      "\x08\x2a",
      9);
  grpc::Slice slice(reordered.data(), reordered.size());
  grpc::ByteBuffer odd(&slice, 1);
  uint64_t seen_offset = 0;
  std::string seen;
  absl::StatusOr<bool> slow = ReadStateDictFrame(
      &odd, &message, [&](uint64_t offset, absl::string_view piece) {
        seen_offset = offset;
        seen = std::string(piece);
        return absl::OkStatus();
      });
  ASSERT_TRUE(slow.ok()) << slow.status();
  EXPECT_TRUE(*slow);
  EXPECT_EQ(seen_offset, 42u);
  EXPECT_EQ(seen, "abc");

  v1::StateDictResponse end;
  end.mutable_end()->set_total_bytes(7);
  const std::string end_bytes = end.SerializeAsString();
  grpc::Slice end_slice(end_bytes.data(), end_bytes.size());
  grpc::ByteBuffer end_buffer(&end_slice, 1);
  absl::StatusOr<bool> not_chunk = ReadStateDictFrame(
      &end_buffer, &message, [](uint64_t, absl::string_view) {
        return absl::InternalError("no data expected");
      });
  ASSERT_TRUE(not_chunk.ok());
  EXPECT_FALSE(*not_chunk);
  EXPECT_EQ(message.end().total_bytes(), 7u);

  const std::string garbage = "\xff\xff\xff";
  grpc::Slice garbage_slice(garbage.data(), garbage.size());
  grpc::ByteBuffer garbage_buffer(&garbage_slice, 1);
  EXPECT_FALSE(ReadStateDictFrame(
                   &garbage_buffer, &message,
                   [](uint64_t, absl::string_view) { return absl::OkStatus(); })
                   .ok());
}

}  // namespace
}  // namespace modelstate

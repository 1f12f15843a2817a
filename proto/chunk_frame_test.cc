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

TEST(ChunkFrameTest, LoadChunksAreProtobufsBytesAndReadBackWholeChunkFirst) {
  std::vector<Tensor> tensors;
  for (int64_t n : {2000, 0, 7}) {
    TensorBuilder builder = TensorBuilder::Create(DType::kInt16, {n}).value();
    for (int64_t i = 0; i < n; ++i)
      builder.mutable_data_as<int16_t>()[i] = static_cast<int16_t>(i - n);
    tensors.push_back(std::move(builder).Build());
  }
  ChunkSender sender(tensors, 1500);
  ChunkSender::Chunk chunk;
  std::string received;
  v1::LoadStateDictRequest message;
  while (sender.Next(&chunk)) {
    v1::LoadStateDictRequest expected;
    expected.mutable_chunk()->set_offset(chunk.offset);
    for (auto piece : chunk.pieces) {
      expected.mutable_chunk()->mutable_data()->append(
          reinterpret_cast<const char*>(piece.data()), piece.size());
    }
    grpc::ByteBuffer buffer = FrameLoadChunk(chunk);
    ASSERT_EQ(Flatten(buffer), expected.SerializeAsString());
    uint64_t announced = 0;
    absl::StatusOr<bool> read = ReadLoadFrame(
        &buffer, &message,
        [&](uint64_t offset, uint64_t size) {
          EXPECT_EQ(offset, chunk.offset);
          EXPECT_EQ(received.size(), chunk.offset);  // before any byte
          announced = size;
          return absl::OkStatus();
        },
        [&](uint64_t offset, absl::string_view piece) {
          EXPECT_EQ(offset, received.size());
          received.append(piece.data(), piece.size());
          return absl::OkStatus();
        });
    ASSERT_TRUE(read.ok()) << read.status();
    EXPECT_TRUE(*read);
    EXPECT_EQ(announced, chunk.size);
    EXPECT_FALSE(message.has_chunk());  // the fast path parsed no message
  }
  std::string expected;
  for (const Tensor& t : tensors)
    expected.append(reinterpret_cast<const char*>(t.data()), t.num_bytes());
  EXPECT_EQ(received, expected);

  // A refused chunk delivers no byte.
  sender = ChunkSender(tensors, 1500);
  ASSERT_TRUE(sender.Next(&chunk));
  grpc::ByteBuffer refused = FrameLoadChunk(chunk);
  absl::StatusOr<bool> read = ReadLoadFrame(
      &refused, &message,
      [](uint64_t, uint64_t) { return absl::InvalidArgumentError("too big"); },
      [](uint64_t, absl::string_view) {
        return absl::InternalError("no data expected");
      });
  EXPECT_EQ(read.status().code(), absl::StatusCode::kInvalidArgument);

  // The end marker with its checksums, and the fallback for a chunk laid out
  // differently (data before offset), which is announced too.
  v1::LoadStateDictRequest end;
  end.mutable_end()->set_total_bytes(4014);
  end.mutable_end()->add_xxh3_64(0x0123456789abcdefULL);
  const std::string end_bytes = end.SerializeAsString();
  grpc::Slice end_slice(end_bytes.data(), end_bytes.size());
  grpc::ByteBuffer end_buffer(&end_slice, 1);
  auto no_chunk = [](uint64_t, uint64_t) {
    return absl::InternalError("no chunk expected");
  };
  auto no_data = [](uint64_t, absl::string_view) {
    return absl::InternalError("no data expected");
  };
  read = ReadLoadFrame(&end_buffer, &message, no_chunk, no_data);
  ASSERT_TRUE(read.ok()) << read.status();
  EXPECT_FALSE(*read);
  ASSERT_EQ(message.end().xxh3_64_size(), 1);
  EXPECT_EQ(message.end().xxh3_64(0), 0x0123456789abcdefULL);
  const std::string reordered = std::string(
      "\x12\x07\x12\x03"
      "abc"
      "\x08\x2a",
      9);
  grpc::Slice slice(reordered.data(), reordered.size());
  grpc::ByteBuffer odd(&slice, 1);
  read = ReadLoadFrame(&odd, &message, no_chunk, no_data);
  EXPECT_EQ(read.status().message(), "no chunk expected");
}

}  // namespace
}  // namespace modelstate

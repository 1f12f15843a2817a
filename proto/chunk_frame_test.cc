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

}  // namespace
}  // namespace modelstate

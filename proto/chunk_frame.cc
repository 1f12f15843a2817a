#include "proto/chunk_frame.h"

#include <memory>
#include <vector>

#include "grpcpp/support/slice.h"

namespace modelstate {
namespace {

// Protobuf wire tags: StateDictResponse.chunk is field 2, Chunk.offset field 1
// (varint), Chunk.data field 2 (length-delimited).
constexpr uint8_t kResponseChunkTag = (2 << 3) | 2;
constexpr uint8_t kOffsetTag = (1 << 3) | 0;
constexpr uint8_t kDataTag = (2 << 3) | 2;

size_t PutVarint(uint64_t value, uint8_t* out) {
  size_t n = 0;
  while (value >= 0x80) {
    out[n++] = static_cast<uint8_t>(value | 0x80);
    value >>= 7;
  }
  out[n++] = static_cast<uint8_t>(value);
  return n;
}

size_t VarintSize(uint64_t value) {
  size_t n = 1;
  while (value >= 0x80) value >>= 7, ++n;
  return n;
}

void ReleaseStorage(void* owner) {
  delete static_cast<std::shared_ptr<const Storage>*>(owner);
}

}  // namespace

grpc::ByteBuffer FrameStateDictChunk(const ChunkSender::Chunk& chunk) {
  // Chunk: [offset tag, varint] (omitted when 0, as proto3 does) [data tag,
  // varint len, data].
  const size_t offset_bytes =
      chunk.offset == 0 ? 0 : 1 + VarintSize(chunk.offset);
  const uint64_t inner = offset_bytes + 1 + VarintSize(chunk.size) + chunk.size;
  uint8_t header[32];
  size_t n = 0;
  header[n++] = kResponseChunkTag;
  n += PutVarint(inner, header + n);
  if (chunk.offset != 0) {
    header[n++] = kOffsetTag;
    n += PutVarint(chunk.offset, header + n);
  }
  header[n++] = kDataTag;
  n += PutVarint(chunk.size, header + n);
  std::vector<grpc::Slice> slices;
  slices.reserve(1 + chunk.pieces.size());
  slices.emplace_back(header, n);  // copies the few header bytes
  for (size_t i = 0; i < chunk.pieces.size(); ++i) {
    auto* owner = new std::shared_ptr<const Storage>(chunk.owners[i]);
    slices.emplace_back(const_cast<uint8_t*>(chunk.pieces[i].data()),
                        chunk.pieces[i].size(), &ReleaseStorage, owner);
  }
  return grpc::ByteBuffer(slices.data(), slices.size());
}

}  // namespace modelstate

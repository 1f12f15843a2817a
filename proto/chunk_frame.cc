#include "proto/chunk_frame.h"

#include <memory>
#include <vector>

#include "absl/strings/str_cat.h"
#include "grpcpp/impl/codegen/proto_utils.h"
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
    // grpc::Slice wants a void*, but gRPC only reads an outgoing message.
    slices.emplace_back(const_cast<uint8_t*>(chunk.pieces[i].data()),
                        chunk.pieces[i].size(), &ReleaseStorage, owner);
  }
  return grpc::ByteBuffer(slices.data(), slices.size());
}

grpc::ByteBuffer FrameLoadChunk(const ChunkSender::Chunk& chunk) {
  static_assert(static_cast<int>(v1::LoadStateDictRequest::kChunkFieldNumber) ==
                    static_cast<int>(v1::StateDictResponse::kChunkFieldNumber),
                "both messages frame their chunk alike");
  return FrameStateDictChunk(chunk);
}

namespace {

// Reads bytes across a list of slices.
class SliceCursor {
 public:
  explicit SliceCursor(const std::vector<grpc::Slice>& slices)
      : slices_(slices) {}

  bool Byte(uint8_t* out) {
    while (slice_ < slices_.size() && at_ == slices_[slice_].size())
      ++slice_, at_ = 0;
    if (slice_ == slices_.size()) return false;
    *out = slices_[slice_].begin()[at_++];
    ++consumed_;
    return true;
  }
  bool Varint(uint64_t* out) {
    uint64_t value = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      uint8_t byte;
      if (!Byte(&byte)) return false;
      value |= static_cast<uint64_t>(byte & 0x7F) << shift;
      if ((byte & 0x80) == 0) {
        *out = value;
        return true;
      }
    }
    return false;
  }
  // Calls `f` with every remaining byte range.
  template <typename F>
  absl::Status Rest(F&& f) {
    for (; slice_ < slices_.size(); ++slice_, at_ = 0) {
      const grpc::Slice& slice = slices_[slice_];
      if (at_ == slice.size()) continue;
      absl::Status status = f(
          absl::string_view(reinterpret_cast<const char*>(slice.begin()) + at_,
                            slice.size() - at_));
      if (!status.ok()) return status;
    }
    return absl::OkStatus();
  }
  size_t consumed() const { return consumed_; }

 private:
  const std::vector<grpc::Slice>& slices_;
  size_t slice_ = 0;
  size_t at_ = 0;
  size_t consumed_ = 0;
};

using ChunkCheck = std::function<absl::Status(uint64_t offset, uint64_t size)>;
using DataSink =
    std::function<absl::Status(uint64_t offset, absl::string_view piece)>;

// ReadStateDictFrame and ReadLoadFrame: both messages hold their chunk in
// field 2. `on_chunk` may be empty.
template <typename Message>
absl::StatusOr<bool> ReadChunkFrame(grpc::ByteBuffer* buffer, Message* message,
                                    const ChunkCheck& on_chunk,
                                    const DataSink& on_data) {
  std::vector<grpc::Slice> slices;
  if (!buffer->Dump(&slices).ok())
    return absl::InvalidArgumentError("unreadable message");
  const size_t total = buffer->Length();
  SliceCursor cursor(slices);
  uint8_t tag;
  uint64_t inner = 0, offset = 0, length = 0;
  bool canonical = cursor.Byte(&tag) && tag == kResponseChunkTag &&
                   cursor.Varint(&inner) &&
                   inner == total - cursor.consumed() && cursor.Byte(&tag);
  if (canonical && tag == kOffsetTag)
    canonical = cursor.Varint(&offset) && cursor.Byte(&tag);
  canonical = canonical && tag == kDataTag && cursor.Varint(&length) &&
              length == total - cursor.consumed();
  if (canonical) {
    if (on_chunk) {
      absl::Status status = on_chunk(offset, length);
      if (!status.ok()) return status;
    }
    uint64_t at = offset;
    absl::Status status = cursor.Rest([&](absl::string_view piece) {
      absl::Status accepted = on_data(at, piece);
      at += piece.size();
      return accepted;
    });
    if (!status.ok()) return status;
    return true;
  }
  message->Clear();
  if (!grpc::SerializationTraits<Message>::Deserialize(buffer, message).ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("malformed ", Message::descriptor()->name()));
  }
  if (!message->has_chunk()) return false;
  if (on_chunk) {
    absl::Status status =
        on_chunk(message->chunk().offset(), message->chunk().data().size());
    if (!status.ok()) return status;
  }
  absl::Status status =
      on_data(message->chunk().offset(), message->chunk().data());
  if (!status.ok()) return status;
  return true;
}

}  // namespace

absl::StatusOr<bool> ReadStateDictFrame(grpc::ByteBuffer* buffer,
                                        v1::StateDictResponse* message,
                                        const DataSink& on_data) {
  return ReadChunkFrame(buffer, message, nullptr, on_data);
}

absl::StatusOr<bool> ReadLoadFrame(grpc::ByteBuffer* buffer,
                                   v1::LoadStateDictRequest* message,
                                   const ChunkCheck& on_chunk,
                                   const DataSink& on_data) {
  return ReadChunkFrame(buffer, message, on_chunk, on_data);
}

}  // namespace modelstate

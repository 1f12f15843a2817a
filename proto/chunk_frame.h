// Zero-copy framing of StateDictResponse chunk messages.
#ifndef MODELSTATE_PROTO_CHUNK_FRAME_H_
#define MODELSTATE_PROTO_CHUNK_FRAME_H_

#include <cstdint>
#include <functional>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "grpcpp/impl/codegen/proto_utils.h"
#include "grpcpp/support/byte_buffer.h"
#include "modelstate/v1/model_state.pb.h"
#include "transfer/transfer.h"

namespace modelstate {

// Returns the serialized bytes of `StateDictResponse{chunk: Chunk{offset,
// data}}` for `chunk`, exactly as protobuf would serialize it, but without
// copying the data: the buffer's slices alias the tensors' storage and keep it
// alive until gRPC releases them.
grpc::ByteBuffer FrameStateDictChunk(const ChunkSender::Chunk& chunk);

// Serializes `message` into a ByteBuffer, for the raw (ByteBuffer) StateDict
// method on either side.
template <typename Message>
grpc::ByteBuffer SerializeToByteBuffer(const Message& message) {
  grpc::ByteBuffer buffer;
  bool own_buffer;
  grpc::SerializationTraits<Message>::Serialize(message, &buffer, &own_buffer);
  return buffer;
}

// Reads one StateDictResponse from `buffer`. A chunk in protobuf's canonical
// layout is not parsed into a message: `on_data` gets its bytes where they lie
// in the received slices, piece by piece with each piece's stream offset, so
// the receiver copies them once, into the tensor. Anything else (manifest, end
// marker, a chunk laid out differently) is parsed into `message`, and a chunk
// found that way is still handed to `on_data`. Returns true for a chunk, false
// for another message, InvalidArgument if the bytes do not parse, or
// `on_data`'s error.
absl::StatusOr<bool> ReadStateDictFrame(
    grpc::ByteBuffer* buffer, v1::StateDictResponse* message,
    const std::function<absl::Status(uint64_t offset, absl::string_view piece)>&
        on_data);

// Returns the serialized bytes of `LoadStateDictRequest{chunk: Chunk{offset,
// data}}` for `chunk`, without copying the data, as FrameStateDictChunk does:
// the chunk is field 2 of both messages, so the bytes are the same.
grpc::ByteBuffer FrameLoadChunk(const ChunkSender::Chunk& chunk);

// Reads one LoadStateDictRequest from `buffer` as ReadStateDictFrame reads a
// response, but first calls `on_chunk` with a chunk's offset and size, before
// any of its bytes reach `on_data`, so that the receiver bounds the chunk as a
// whole. Returns true for a chunk, false for another message (parsed into
// `message`), InvalidArgument if the bytes do not parse, or a callback's
// error.
absl::StatusOr<bool> ReadLoadFrame(
    grpc::ByteBuffer* buffer, v1::LoadStateDictRequest* message,
    const std::function<absl::Status(uint64_t offset, uint64_t size)>& on_chunk,
    const std::function<absl::Status(uint64_t offset, absl::string_view piece)>&
        on_data);

}  // namespace modelstate

#endif  // MODELSTATE_PROTO_CHUNK_FRAME_H_

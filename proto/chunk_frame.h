// Zero-copy framing of StateDictResponse chunk messages.
#ifndef MODELSTATE_PROTO_CHUNK_FRAME_H_
#define MODELSTATE_PROTO_CHUNK_FRAME_H_

#include "core/transfer.h"
#include "grpcpp/support/byte_buffer.h"

namespace modelstate {

// Returns the serialized bytes of `StateDictResponse{chunk: Chunk{offset,
// data}}` for `chunk`, exactly as protobuf would serialize it, but without
// copying the data: the buffer's slices alias the tensors' storage and keep it
// alive until gRPC releases them.
grpc::ByteBuffer FrameStateDictChunk(const ChunkSender::Chunk& chunk);

}  // namespace modelstate

#endif  // MODELSTATE_PROTO_CHUNK_FRAME_H_

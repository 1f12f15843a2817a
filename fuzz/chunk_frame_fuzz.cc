// The raw StateDict frame reader (every client fetch) on arbitrary bytes, cut
// into grpc slices at points the input chooses. Differential: whatever the
// reader makes of the bytes must agree with protobuf's own parse of them.
#include <cstdint>
#include <string>
#include <vector>

#include "fuzz/wire_fuzz.h"
#include "fuzzer/FuzzedDataProvider.h"
#include "grpcpp/support/byte_buffer.h"
#include "proto/chunk_frame.h"

namespace modelstate {
namespace {

void FuzzOne(const uint8_t* data, size_t size) {
  FuzzedDataProvider in(data, size);
  const std::vector<size_t> cuts = ConsumeCuts(in);
  const std::string bytes = in.ConsumeRemainingBytesAsString();
  grpc::ByteBuffer buffer = Sliced(bytes, cuts);

  std::string pieces;
  uint64_t first_offset = 0;
  bool seen = false;
  bool contiguous = true;
  v1::StateDictResponse message;
  absl::StatusOr<bool> is_chunk = ReadStateDictFrame(
      &buffer, &message, [&](uint64_t offset, absl::string_view piece) {
        if (!seen) first_offset = offset;
        seen = true;
        contiguous = contiguous && offset == first_offset + pieces.size();
        pieces.append(piece.data(), piece.size());
        return absl::OkStatus();
      });

  v1::StateDictResponse expected;
  const bool parses = expected.ParseFromString(bytes);
  if (is_chunk.ok() != parses) __builtin_trap();
  if (!parses) return;
  if (*is_chunk != expected.has_chunk()) __builtin_trap();
  if (*is_chunk) {
    if (!contiguous || pieces != expected.chunk().data()) __builtin_trap();
    if (seen && first_offset != expected.chunk().offset()) __builtin_trap();
  } else if (message.SerializeAsString() != expected.SerializeAsString()) {
    __builtin_trap();
  }
}

}  // namespace
}  // namespace modelstate

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  modelstate::FuzzOne(data, size);
  return 0;
}

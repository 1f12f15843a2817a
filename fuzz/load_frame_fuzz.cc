// The raw LoadStateDict frame reader (every load the daemon receives) on
// arbitrary bytes, cut into grpc slices at points the input chooses.
// Differential: whatever the reader makes of the bytes must agree with
// protobuf's own parse of them, and a chunk must be announced (whole) before
// its pieces arrive, in order and back to back.
#include <cstdint>
#include <string>
#include <vector>

#include "fuzz/wire_fuzz.h"
#include "fuzzer/FuzzedDataProvider.h"
#include "google/protobuf/util/message_differencer.h"
#include "grpcpp/support/byte_buffer.h"
#include "proto/chunk_frame.h"

namespace modelstate {
namespace {

void FuzzOne(const uint8_t* data, size_t size) {
  FuzzedDataProvider in(data, size);
  const std::vector<size_t> cuts = ConsumeCuts(in);
  const std::string bytes = in.ConsumeRemainingBytesAsString();
  grpc::ByteBuffer buffer = Sliced(bytes, cuts);

  bool announced = false;
  uint64_t announced_offset = 0;
  uint64_t announced_size = 0;
  std::string pieces;
  bool in_order = true;
  v1::LoadStateDictRequest message;
  absl::StatusOr<bool> is_chunk = ReadLoadFrame(
      &buffer, &message,
      [&](uint64_t offset, uint64_t chunk_size) {
        if (announced) __builtin_trap();  // One announcement per frame.
        announced = true;
        announced_offset = offset;
        announced_size = chunk_size;
        return absl::OkStatus();
      },
      [&](uint64_t offset, absl::string_view piece) {
        in_order =
            in_order && announced && offset == announced_offset + pieces.size();
        pieces.append(piece.data(), piece.size());
        return absl::OkStatus();
      });

  v1::LoadStateDictRequest expected;
  const bool parses = expected.ParseFromString(bytes);
  if (is_chunk.ok() != parses) __builtin_trap();
  if (!parses) return;
  if (*is_chunk != expected.has_chunk()) __builtin_trap();
  if (*is_chunk) {
    if (!announced || !in_order || pieces != expected.chunk().data())
      __builtin_trap();
    if (announced_offset != expected.chunk().offset() ||
        announced_size != expected.chunk().data().size()) {
      __builtin_trap();
    }
  } else if (!google::protobuf::util::MessageDifferencer::Equals(message,
                                                                 expected)) {
    // Compared as messages: LoadHeader.class_names is a map, whose
    // serialization order is not fixed.
    __builtin_trap();
  }
}

}  // namespace
}  // namespace modelstate

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  modelstate::FuzzOne(data, size);
  return 0;
}

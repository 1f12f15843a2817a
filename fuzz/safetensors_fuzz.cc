// The safetensors reader on arbitrary file contents: ParseSafetensorsHeader on
// the bytes (with the true file size and with a claimed larger one), and
// ReadSafetensors. A file that reads must write back to bytes that read to the
// same tensors.
#include <cstdint>
#include <cstring>
#include <memory>

#include "model/safetensors.h"
#include "model/tensor.h"

namespace modelstate {
namespace {

void CheckSameTensors(const SafetensorsFile& a, const SafetensorsFile& b) {
  if (a.tensors.size() != b.tensors.size() || a.metadata != b.metadata)
    __builtin_trap();
  for (const StateDict::Entry& entry : a.tensors.entries()) {
    const Tensor* other = b.tensors.Find(entry.key);
    if (other == nullptr || !other->BitwiseEquals(entry.tensor))
      __builtin_trap();
  }
}

void FuzzOne(const uint8_t* data, size_t size) {
  absl::Span<const uint8_t> bytes(data, size);
  (void)ParseSafetensorsHeader(bytes, size);
  // A prefix of a larger file, as the file reader sees its first read.
  (void)ParseSafetensorsHeader(bytes, uint64_t{size} * 3 + 1);
  (void)SafetensorsHeaderLength(bytes, size);

  std::shared_ptr<Storage> storage = Storage::Allocate(size).value();
  if (size > 0) std::memcpy(storage->mutable_data(), data, size);
  absl::StatusOr<SafetensorsFile> file = ReadSafetensors(storage);
  if (!file.ok()) return;
  absl::StatusOr<std::string> written =
      SerializeSafetensors(file->tensors, file->metadata);
  if (!written.ok()) __builtin_trap();
  std::shared_ptr<Storage> again = Storage::Allocate(written->size()).value();
  if (!written->empty())
    std::memcpy(again->mutable_data(), written->data(), written->size());
  absl::StatusOr<SafetensorsFile> reread = ReadSafetensors(again);
  if (!reread.ok()) __builtin_trap();
  CheckSameTensors(*file, *reread);
}

}  // namespace
}  // namespace modelstate

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  modelstate::FuzzOne(data, size);
  return 0;
}

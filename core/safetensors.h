// The safetensors file format (https://github.com/huggingface/safetensors),
// read and written with the validation rules of its reference implementation
// (safetensors/src/tensor.rs).
#ifndef MODELSTATE_CORE_SAFETENSORS_H_
#define MODELSTATE_CORE_SAFETENSORS_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "core/state_dict.h"
#include "core/tensor.h"

namespace modelstate {

// Headers larger than this are refused before anything is allocated for them.
inline constexpr uint64_t kSafetensorsMaxHeaderBytes = 100'000'000;

using SafetensorsMetadata = std::vector<std::pair<std::string, std::string>>;

struct SafetensorsEntry {
  std::string name;
  DType dtype;
  Shape shape;
  uint64_t begin;  // Offsets relative to the start of the data buffer.
  uint64_t end;
};

struct SafetensorsHeader {
  std::vector<SafetensorsEntry> entries;  // In data order (by offset).
  SafetensorsMetadata metadata;           // "__metadata__", sorted by key.
  uint64_t data_start = 0;                // 8 + header length.
};

struct SafetensorsFile {
  StateDict tensors;  // In data order (by offset); views of the file's bytes.
  SafetensorsMetadata metadata;
};

// Parses and validates the header of a safetensors file of `file_size` bytes
// whose first bytes are `prefix` (at least the 8 length bytes, and the whole
// header once the length is known to fit). Every failure is InvalidArgument
// whose message starts with the reference implementation's error name: "header
// too small", "header too large", "invalid header length", "invalid header"
// (not UTF-8, bad JSON, unknown dtype, bad shape, bad __metadata__, duplicate
// tensor name), "invalid offset", "validation overflow", "tensor invalid info",
// "incomplete buffer". Nothing is allocated in proportion to the claimed sizes
// before they have been checked against `file_size`.
absl::StatusOr<SafetensorsHeader> ParseSafetensorsHeader(
    absl::Span<const uint8_t> prefix, uint64_t file_size);

// Returns the header length (N) a file starting with `prefix` declares, after
// the checks that need only the first 8 bytes and the file size. Errors as
// ParseSafetensorsHeader.
absl::StatusOr<uint64_t> SafetensorsHeaderLength(
    absl::Span<const uint8_t> prefix, uint64_t file_size);

// Parses a whole file held in `bytes`; tensors are views of `bytes` (never
// copied).
absl::StatusOr<SafetensorsFile> ReadSafetensors(
    std::shared_ptr<const Storage> bytes);

// Reads the file at `path`. Files of 1 MiB and more are memory-mapped
// (read-only, private) and the tensors borrow the mapping; smaller ones are
// read into memory. I/O failures are reported as ErrnoToStatus
// (core/file_util.h) and a file that shrinks while read as DataLoss; otherwise
// errors as ParseSafetensorsHeader.
absl::StatusOr<SafetensorsFile> ReadSafetensorsFile(const std::string& path);

// Returns the serialized header (length prefix, JSON, space padding to a
// multiple of 8) for `state`, and the order in which the tensors' bytes must
// follow (indices into state.entries()): by element size descending, then by
// name, so equal inputs give identical files. Returns InvalidArgument for a
// tensor named "__metadata__" or duplicate names.
absl::StatusOr<std::pair<std::string, std::vector<size_t>>>
SerializeSafetensorsHeader(const StateDict& state,
                           const SafetensorsMetadata& metadata = {});

// Writes `state` in safetensors format through `sink`, which receives
// consecutive pieces of the file and returns a non-OK status to stop. Tensor
// bytes are passed straight from their storage.
absl::Status WriteSafetensors(
    const StateDict& state, const SafetensorsMetadata& metadata,
    const std::function<absl::Status(absl::Span<const uint8_t>)>& sink);

// Returns the whole file as a string. Errors as SerializeSafetensorsHeader.
absl::StatusOr<std::string> SerializeSafetensors(
    const StateDict& state, const SafetensorsMetadata& metadata = {});

// Writes the file at `path` (created or truncated; not atomic and not fsynced).
// I/O failures are reported as ErrnoToStatus (core/file_util.h); otherwise
// errors as SerializeSafetensorsHeader.
absl::Status WriteSafetensorsFile(const std::string& path,
                                  const StateDict& state,
                                  const SafetensorsMetadata& metadata = {});

}  // namespace modelstate

#endif  // MODELSTATE_CORE_SAFETENSORS_H_

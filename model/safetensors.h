// The safetensors file format (https://github.com/huggingface/safetensors),
// read and written with the validation rules of its reference implementation
// (safetensors/src/tensor.rs).
#ifndef MODELSTATE_MODEL_SAFETENSORS_H_
#define MODELSTATE_MODEL_SAFETENSORS_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "model/state_dict.h"
#include "model/tensor.h"

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
// (common/file_util.h) and a file that shrinks while read as DataLoss;
// otherwise errors as ParseSafetensorsHeader.
absl::StatusOr<SafetensorsFile> ReadSafetensorsFile(const std::string& path);

// Returns the serialized header (length prefix, JSON, space padding to a
// multiple of 8) for `state`, and the order in which the tensors' bytes must
// follow (indices into state.entries()): by element size descending, then by
// name, so equal inputs give identical files. Returns InvalidArgument for a
// tensor named "__metadata__" or duplicate names.
absl::StatusOr<std::pair<std::string, std::vector<size_t>>>
SerializeSafetensorsHeader(const StateDict& state,
                           const SafetensorsMetadata& metadata = {});

// One tensor of a file about to be written: what its header entry says.
struct SafetensorsTensorInfo {
  std::string name;
  DType dtype;
  Shape shape;
};

// SerializeSafetensorsHeader for tensors known only by name, dtype and shape:
// returns the same header and order (indices into `tensors`) that a StateDict
// with these entries, in this order, gives. InvalidArgument for a tensor named
// "__metadata__", duplicate names or a shape whose size overflows.
absl::StatusOr<std::pair<std::string, std::vector<size_t>>>
SerializeSafetensorsHeaderFor(const std::vector<SafetensorsTensorInfo>& tensors,
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
// I/O failures are reported as ErrnoToStatus (common/file_util.h); otherwise
// errors as SerializeSafetensorsHeader.
absl::Status WriteSafetensorsFile(const std::string& path,
                                  const StateDict& state,
                                  const SafetensorsMetadata& metadata = {});

// Writes a safetensors file whose tensors arrive one at a time, in any order,
// without holding them: the header is written first, from the tensors'
// descriptions, and each tensor's bytes go straight to their final place in
// the file. The file is built under a temporary name in the destination's
// directory and renamed over `path` only by Commit, so readers see either the
// old file or the complete new one; a writer destroyed without a successful
// Commit removes its temporary file and leaves `path` untouched. The result is
// byte-identical to WriteSafetensorsFile of the same tensors in the same order.
//
// Thread-safety: not thread-safe; one thread feeds a writer.
class SafetensorsStreamWriter {
 public:
  struct Options {
    // fsync the file before the rename and its directory after it, so the
    // new file survives a crash of the machine once Commit returns.
    bool fsync = false;
  };

  // Creates the temporary file and writes the header. Returns the errors of
  // SerializeSafetensorsHeaderFor, or the ErrnoToStatus (common/file_util.h) of
  // a failed create or write.
  static absl::StatusOr<std::unique_ptr<SafetensorsStreamWriter>> Create(
      const std::string& path, std::vector<SafetensorsTensorInfo> tensors,
      const SafetensorsMetadata& metadata, Options options);

  // Removes the temporary file unless Commit succeeded.
  ~SafetensorsStreamWriter();
  SafetensorsStreamWriter(const SafetensorsStreamWriter&) = delete;
  SafetensorsStreamWriter& operator=(const SafetensorsStreamWriter&) = delete;

  // Writes the bytes of tensor `name` at its place in the file. Returns
  // InvalidArgument when `name` is not one of the file's tensors, was written
  // already (whole, or in part by WritePiece), or `tensor`'s dtype or shape
  // differ from its description; the ErrnoToStatus of a failed write.
  absl::Status WriteTensor(const std::string& name, const Tensor& tensor);

  // Writes the next `piece` of tensor `name`'s bytes, `offset` bytes into it,
  // for a writer that gets a tensor piece by piece as it arrives. Pieces of a
  // tensor come in order; it counts as written once its last byte is. Returns
  // InvalidArgument when `name` is not one of the file's tensors, `offset` is
  // not where its previous piece ended, or the piece runs past its end; the
  // ErrnoToStatus of a failed write.
  absl::Status WritePiece(const std::string& name, uint64_t offset,
                          absl::string_view piece);

  // Checks that every tensor with bytes was written (tensors without bytes
  // need no write, whole or in pieces), optionally fsyncs, and
  // renames the file to `path`. Returns FailedPrecondition naming a tensor
  // never written, or the ErrnoToStatus of a failed fsync, close or rename; on
  // any error the temporary file is removed and `path` is untouched.
  absl::Status Commit();

  // True once Commit has fsynced the file and its directory.
  bool synced() const { return synced_; }
  // Where the file is built until Commit.
  const std::string& temporary_path() const { return temporary_path_; }
  // Bytes of the finished file.
  uint64_t file_bytes() const { return file_bytes_; }

 private:
  // One tensor's place in the file.
  struct Slot {
    std::string name;
    DType dtype;
    Shape shape;
    uint64_t offset = 0;  // From the start of the file.
    uint64_t bytes = 0;
    uint64_t filled = 0;  // Bytes written by WritePiece so far.
    bool written = false;
  };

  SafetensorsStreamWriter(std::string path, std::string temporary_path, int fd,
                          Options options);
  // Fills slots_ and file_bytes_ from the descriptions and the data order.
  void PlaceTensors(std::vector<SafetensorsTensorInfo> tensors,
                    const std::vector<size_t>& order, uint64_t header_bytes);
  absl::Status CheckAllWritten() const;
  // The slot of tensor `name`, or InvalidArgument.
  absl::StatusOr<Slot*> FindSlot(const std::string& name);
  // fsync, close and rename; the steps of Commit that touch the file.
  absl::Status Publish();
  // Closes and removes the temporary file.
  void Discard();

  std::string path_;
  std::string temporary_path_;
  int fd_;
  Options options_;
  std::vector<Slot> slots_;                         // In description order.
  absl::flat_hash_map<std::string, size_t> index_;  // Name -> slots_ index.
  uint64_t file_bytes_ = 0;
  bool committed_ = false;
  bool synced_ = false;
};

}  // namespace modelstate

#endif  // MODELSTATE_MODEL_SAFETENSORS_H_

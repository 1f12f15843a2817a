// The data path of a streamed state dict, independent of any transport: a
// sender cuts the tensors' bytes into chunks, a receiver writes chunks straight
// into preallocated tensors and verifies each tensor's XXH3-64 as soon as its
// last byte arrives (docs/protocol.md).
//
// The stream's data is the concatenation of every tensor's bytes in manifest
// order, without padding; a chunk is (offset into that concatenation, bytes).
// Chunks must arrive in order.
#ifndef MODELSTATE_TRANSFER_TRANSFER_H_
#define MODELSTATE_TRANSFER_TRANSFER_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/optional.h"
#include "absl/types/span.h"
#include "model/tensor.h"
#include "transfer/checksum.h"

namespace modelstate {

// The chunk size for a stream: `requested`, or `default_bytes` when it is 0.
// InvalidArgument above kMaxChunkBytes (common/limits.h).
absl::StatusOr<uint32_t> ResolveChunkBytes(uint32_t requested,
                                           uint32_t default_bytes);

// One tensor of a transfer, as a manifest describes it.
struct TransferEntry {
  std::string key;
  DType dtype;
  Shape shape;
  uint64_t checksum = 0;  // XXH3-64 of the tensor's bytes.
  // The index of an earlier entry of the same transfer whose tensor this one
  // is (a shared tensor: torch's tied parameters), or -1. Its bytes do not
  // travel: senders and receivers skip it (SentEntries).
  int64_t shared_with = -1;
};

// Returns the byte size of every entry and checks the whole transfer:
// InvalidArgument for a bad shape or a total that overflows, and for a shared
// entry (whose bytes do not travel: pass SentEntries).
absl::StatusOr<std::vector<uint64_t>> TransferSizes(
    const std::vector<TransferEntry>& entries);

// The entries whose bytes travel, in order: every entry but the shared ones.
std::vector<TransferEntry> SentEntries(
    const std::vector<TransferEntry>& entries);

// True when some entry is shared with an earlier one.
bool HasSharedEntries(const std::vector<TransferEntry>& entries);

// Checks each entry's shared_with: -1, or an earlier entry that is itself not
// shared, of the same dtype and shape. InvalidArgument naming the key
// otherwise.
absl::Status CheckSharedEntries(const std::vector<TransferEntry>& entries);

// The tensors of every entry from those of SentEntries(entries) (`sent`, in
// order): a shared entry gets its source's tensor. InvalidArgument when a
// shared entry's checksum is known (non-zero) and differs from its source's.
absl::StatusOr<std::vector<Tensor>> WithSharedTensors(
    const std::vector<TransferEntry>& entries, std::vector<Tensor> sent);

// Where a receiver puts the tensors it makes.
enum class TensorPacking {
  // Each tensor in a storage of its own, so that no tensor keeps another's
  // bytes alive: what a daemon keeps across versions that share tensors.
  kOwnStorage,
  // Runs of tensors under kPackedTensorMaxBytes share blocks of up to
  // kPackBlockBytes, each tensor at a kStorageAlignment boundary: one
  // allocation per block instead of one per tensor (and per freed tensor),
  // for a client taking a whole state dict of many small tensors at once. A
  // block lives while any of its tensors does.
  kPackSmall,
};
inline constexpr uint64_t kPackedTensorMaxBytes = 64 << 10;
inline constexpr uint64_t kPackBlockBytes = kHugePageBytes;

// Where a receiver puts the bytes of each tensor when it makes no tensors:
// memory the caller owns (a fetch into a model's buffers), a file. The bytes
// go from the received message straight to the sink: nothing is copied
// before.
class TensorSink {
 public:
  virtual ~TensorSink() = default;
  // Takes the next `piece` of tensor `index`, `offset` bytes into it. The
  // bytes are valid only during the call. An error ends the transfer with it,
  // as a callback's does.
  virtual absl::Status Write(size_t index, uint64_t offset,
                             absl::string_view piece) = 0;
  // Called once tensor `index` has all its bytes (a tensor without bytes had
  // no Write), before its checksum is verified.
  virtual absl::Status Complete(size_t index) = 0;
};

// Receives one transfer. Not thread-safe; one stream feeds it.
class ChunkReceiver {
 public:
  // Called with each tensor, its index and its entry as soon as it is
  // complete and verified. Returning an error stops the transfer with that
  // error.
  using TensorCallback = std::function<absl::Status(
      size_t index, const TransferEntry& entry, Tensor tensor)>;

  // Returns a receiver for `entries`, or InvalidArgument (see TransferSizes).
  // With `on_tensor`, completed tensors are handed over and not kept; without
  // it, Finish returns them. With `min_chunk_bytes`, every chunk must carry at
  // least that many bytes unless it ends the stream (a receiver of untrusted
  // senders uses it, so that no one makes it handle a message per byte).
  static absl::StatusOr<std::unique_ptr<ChunkReceiver>> Create(
      std::vector<TransferEntry> entries, TensorCallback on_tensor = nullptr,
      uint64_t min_chunk_bytes = 0,
      TensorPacking packing = TensorPacking::kOwnStorage);

  // As Create, but every tensor's bytes go to `sink` (which must outlive the
  // receiver) instead of tensors of the receiver's making; its checksum is
  // computed as they pass and verified once its last byte was written, so
  // what the sink holds is unverified until then. Finish returns no tensors.
  static absl::StatusOr<std::unique_ptr<ChunkReceiver>> CreateIntoSink(
      std::vector<TransferEntry> entries, TensorSink* sink);

  // As Create without a callback, for a load whose client may send the
  // checksums with its end marker (docs/protocol.md, "Checksums at the end"):
  // a tensor whose manifest checksum is 0 is hashed when complete but only
  // verified by Finish. Nothing leaves the receiver before Finish, so no
  // unverified tensor is ever handed over.
  static absl::StatusOr<std::unique_ptr<ChunkReceiver>> CreateVerifyingAtEnd(
      std::vector<TransferEntry> entries, uint64_t min_chunk_bytes = 0);

  // Checks a chunk of `size` bytes at `offset` as a whole, before its bytes
  // arrive piece by piece through Accept (a transport that reads them where
  // they lie in its buffers). Returns Accept's InvalidArgument errors for
  // order, size (maximum and minimum) and end; after an error the receiver is
  // dead.
  absl::Status BeginChunk(uint64_t offset, uint64_t size);

  // Writes the next chunk. Returns InvalidArgument when `offset` is not where
  // the previous chunk ended (chunks out of order, overlapping, or bytes
  // missing), the chunk is larger than kMaxChunkBytes or runs past the end,
  // or it is smaller than the minimum (or empty) without ending the stream,
  // DataLoss when a tensor completed by this chunk fails its checksum,
  // ResourceExhausted when a tensor cannot be allocated, or the callback's
  // error. After an error the receiver is dead.
  absl::Status Accept(uint64_t offset, absl::string_view data);

  // Checks the end marker: returns InvalidArgument unless every byte arrived
  // and `total_bytes` matches, or `end_checksums` is neither empty nor one per
  // entry. With end checksums, each must equal the tensor's computed checksum
  // and its nonzero manifest checksum; without, tensors deferred by
  // CreateVerifyingAtEnd are checked against their manifest's 0. DataLoss on
  // a mismatch. Returns the tensors in manifest order (empty with a callback).
  absl::StatusOr<std::vector<Tensor>> Finish(
      uint64_t total_bytes, absl::Span<const uint64_t> end_checksums = {});

  uint64_t received_bytes() const { return received_; }
  uint64_t total_bytes() const { return total_; }
  const std::vector<TransferEntry>& entries() const { return entries_; }
  // The error `on_tensor` (or the sink) returned, which ended the transfer (OK
  // if none): a transport reports it as it is, not as a fault of the stream.
  const absl::Status& callback_error() const { return callback_error_; }

 private:
  ChunkReceiver(std::vector<TransferEntry> entries, std::vector<uint64_t> sizes,
                TensorCallback on_tensor, TensorSink* sink,
                uint64_t min_chunk_bytes, TensorPacking packing);
  // A builder for the current tensor, which has bytes to come: in a block
  // when packed, else in storage of its own.
  absl::StatusOr<TensorBuilder> NewBuilder();
  // Allocates the block for the run of small tensors starting at the current
  // one.
  absl::Status NewBlock();
  // Completes tensors (verifying checksums) while the current one is full.
  absl::Status CompleteFullTensors();
  // Puts the current tensor's next bytes where they go: into its builder or
  // the sink.
  absl::Status Place(absl::string_view piece);
  // Verifies the current tensor, complete, and hands it over.
  absl::Status CompleteCurrent();
  // Stops the transfer with `status`; returns it.
  absl::Status Fail(absl::Status status);
  // Accept's and BeginChunk's checks of a chunk's place and size.
  absl::Status CheckChunk(uint64_t offset, uint64_t size) const;
  // InvalidArgument for a chunk below min_chunk_bytes that does not end the
  // stream.
  absl::Status CheckChunkSize(uint64_t offset, uint64_t size) const;
  // Finish's checks of every tensor's computed checksum.
  absl::Status VerifyChecksums(absl::Span<const uint64_t> end_checksums) const;

  std::vector<TransferEntry> entries_;
  std::vector<uint64_t> sizes_;
  TensorCallback on_tensor_;
  TensorSink* sink_ = nullptr;  // CreateIntoSink.
  uint64_t min_chunk_bytes_;
  // Where the chunk BeginChunk last announced ends; Accept's pieces before it
  // are not chunks of their own.
  uint64_t announced_end_ = 0;
  std::vector<Tensor> done_;
  size_t current_ = 0;           // Index of the tensor being filled.
  uint64_t current_filled_ = 0;  // Bytes of it received.
  absl::optional<TensorBuilder> builder_;
  TensorPacking packing_;
  // The block being filled (kPackSmall): tensors before block_end_ have
  // their place in it, the next one at block_used_ rounded up.
  std::shared_ptr<Storage> block_;
  size_t block_end_ = 0;
  uint64_t block_used_ = 0;
  // XXH3-64 of the current tensor, fed by Accept as its bytes are copied in
  // (cache-hot), rather than a second pass over the finished tensor.
  ChecksumCursor checksum_;
  uint64_t received_ = 0;
  uint64_t total_ = 0;
  absl::Status error_;
  absl::Status callback_error_;
  bool verify_zero_at_end_ = false;  // CreateVerifyingAtEnd.
  std::vector<uint64_t> computed_;   // Checksums of the completed tensors.
};

// Cuts tensors into chunks of at most `chunk_bytes`. Small tensors share a
// chunk; large ones span several. The pieces alias the tensors' storage:
// nothing is copied. Tensors that lie back to back in one storage share a
// piece.
class ChunkSender {
 public:
  struct Chunk {
    uint64_t offset = 0;
    uint64_t size = 0;
    std::vector<absl::Span<const uint8_t>> pieces;
    // The storage each piece lies in, for senders that hand the bytes to a
    // transport without copying them and must keep them alive until it lets go.
    std::vector<std::shared_ptr<const Storage>> owners;
  };

  // `chunk_bytes` must be positive. The first chunk starts at byte
  // `start_offset` of the tensors' concatenation (a resumed fetch); chunk
  // offsets stay in that coordinate. A start past the end sends nothing.
  ChunkSender(std::vector<Tensor> tensors, uint64_t chunk_bytes,
              uint64_t start_offset = 0);

  // Fills `chunk` with the next chunk and returns true, or returns false at the
  // end.
  bool Next(Chunk* chunk);

  uint64_t total_bytes() const { return total_; }
  const std::vector<Tensor>& tensors() const { return tensors_; }

 private:
  // Adds `take` bytes of `tensor`, from within_, to `chunk`.
  void AddPiece(const Tensor& tensor, uint64_t take, Chunk* chunk) const;

  std::vector<Tensor> tensors_;
  uint64_t chunk_bytes_;
  uint64_t total_ = 0;
  uint64_t sent_ = 0;
  size_t tensor_ = 0;
  uint64_t within_ = 0;
};

}  // namespace modelstate

#endif  // MODELSTATE_TRANSFER_TRANSFER_H_

#include "transfer/transfer.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "common/limits.h"
#include "common/status_macros.h"

namespace modelstate {

absl::StatusOr<std::vector<uint64_t>> TransferSizes(
    const std::vector<TransferEntry>& entries) {
  std::vector<uint64_t> sizes;
  sizes.reserve(entries.size());
  uint64_t total = 0;
  for (const TransferEntry& entry : entries) {
    if (entry.shared_with >= 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "tensor \"", entry.key, "\" is shared and carries no bytes"));
    }
    absl::StatusOr<int64_t> bytes = NumBytes(entry.dtype, entry.shape);
    if (!bytes.ok()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "tensor \"", entry.key, "\": ", bytes.status().message()));
    }
    if (__builtin_add_overflow(total, static_cast<uint64_t>(*bytes), &total) ||
        total > static_cast<uint64_t>(INT64_MAX)) {
      return absl::InvalidArgumentError("transfer size overflows");
    }
    sizes.push_back(static_cast<uint64_t>(*bytes));
  }
  return sizes;
}

std::vector<TransferEntry> SentEntries(
    const std::vector<TransferEntry>& entries) {
  std::vector<TransferEntry> sent;
  sent.reserve(entries.size());
  for (const TransferEntry& entry : entries) {
    if (entry.shared_with < 0) sent.push_back(entry);
  }
  return sent;
}

bool HasSharedEntries(const std::vector<TransferEntry>& entries) {
  for (const TransferEntry& entry : entries) {
    if (entry.shared_with >= 0) return true;
  }
  return false;
}

absl::Status CheckSharedEntries(const std::vector<TransferEntry>& entries) {
  for (size_t i = 0; i < entries.size(); ++i) {
    const int64_t source = entries[i].shared_with;
    if (source < 0) continue;
    const bool valid = static_cast<size_t>(source) < i &&
                       entries[source].shared_with < 0 &&
                       entries[source].dtype == entries[i].dtype &&
                       entries[source].shape == entries[i].shape;
    if (!valid) {
      return absl::InvalidArgumentError(absl::StrCat(
          "tensor \"", entries[i].key,
          "\" is shared with a tensor that is not an earlier unshared tensor "
          "of the same dtype and shape"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<Tensor>> WithSharedTensors(
    const std::vector<TransferEntry>& entries, std::vector<Tensor> sent) {
  if (!HasSharedEntries(entries)) return sent;
  std::vector<Tensor> all;
  all.reserve(entries.size());
  size_t next = 0;
  for (const TransferEntry& entry : entries) {
    if (entry.shared_with < 0) {
      all.push_back(std::move(sent.at(next++)));
      continue;
    }
    const Tensor& source = all[entry.shared_with];
    if (entry.checksum != 0 && entry.checksum != source.Checksum()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "tensor \"", entry.key, "\" is shared with \"",
          entries[entry.shared_with].key, "\" but its checksum differs"));
    }
    all.push_back(source);
  }
  return all;
}

ChunkReceiver::ChunkReceiver(std::vector<TransferEntry> entries,
                             std::vector<uint64_t> sizes,
                             TensorCallback on_tensor, TensorSink* sink,
                             uint64_t min_chunk_bytes, TensorPacking packing)
    : entries_(std::move(entries)),
      sizes_(std::move(sizes)),
      on_tensor_(std::move(on_tensor)),
      sink_(sink),
      min_chunk_bytes_(min_chunk_bytes),
      packing_(packing) {
  for (uint64_t size : sizes_) total_ += size;
  if (!on_tensor_ && sink_ == nullptr) done_.reserve(entries_.size());
  computed_.reserve(entries_.size());
  if (!sizes_.empty()) checksum_.Begin(sizes_[0]);
}

absl::StatusOr<std::unique_ptr<ChunkReceiver>> ChunkReceiver::Create(
    std::vector<TransferEntry> entries, TensorCallback on_tensor,
    uint64_t min_chunk_bytes, TensorPacking packing) {
  ASSIGN_OR_RETURN(std::vector<uint64_t> sizes, TransferSizes(entries));
  std::unique_ptr<ChunkReceiver> receiver(new ChunkReceiver(
      std::move(entries), std::move(sizes), std::move(on_tensor),
      /*sink=*/nullptr, min_chunk_bytes, packing));
  // Zero-byte tensors at the front are complete before any data.
  RETURN_IF_ERROR(receiver->CompleteFullTensors());
  return receiver;
}

absl::StatusOr<std::unique_ptr<ChunkReceiver>> ChunkReceiver::CreateIntoSink(
    std::vector<TransferEntry> entries, TensorSink* sink) {
  ASSIGN_OR_RETURN(std::vector<uint64_t> sizes, TransferSizes(entries));
  std::unique_ptr<ChunkReceiver> receiver(
      new ChunkReceiver(std::move(entries), std::move(sizes), nullptr, sink,
                        /*min_chunk_bytes=*/0, TensorPacking::kOwnStorage));
  RETURN_IF_ERROR(receiver->CompleteFullTensors());
  return receiver;
}

absl::StatusOr<std::unique_ptr<ChunkReceiver>>
ChunkReceiver::CreateVerifyingAtEnd(std::vector<TransferEntry> entries,
                                    uint64_t min_chunk_bytes) {
  ASSIGN_OR_RETURN(std::vector<uint64_t> sizes, TransferSizes(entries));
  std::unique_ptr<ChunkReceiver> receiver(new ChunkReceiver(
      std::move(entries), std::move(sizes), nullptr, /*sink=*/nullptr,
      min_chunk_bytes, TensorPacking::kOwnStorage));
  receiver->verify_zero_at_end_ = true;
  RETURN_IF_ERROR(receiver->CompleteFullTensors());
  return receiver;
}

absl::Status ChunkReceiver::CompleteFullTensors() {
  while (current_ < entries_.size() && current_filled_ == sizes_[current_]) {
    RETURN_IF_ERROR(CompleteCurrent());
    ++current_;
    current_filled_ = 0;
    if (current_ < entries_.size()) checksum_.Begin(sizes_[current_]);
    // Its tensors hold it; the next small tensor starts a block of its own.
    if (current_ == block_end_) block_.reset();
  }
  return absl::OkStatus();
}

absl::Status ChunkReceiver::CompleteCurrent() {
  const TransferEntry& entry = entries_[current_];
  if (sink_ != nullptr) {
    callback_error_ = sink_->Complete(current_);
    RETURN_IF_ERROR(callback_error_);
  }
  // Every byte of the tensor passed through Accept's checksum.
  const uint64_t checksum = checksum_.Digest();
  computed_.push_back(checksum);
  const bool deferred = verify_zero_at_end_ && entry.checksum == 0;
  if (!deferred && checksum != entry.checksum) {
    return absl::DataLossError(absl::StrCat(
        "checksum mismatch for tensor \"", entry.key, "\": got xxh3 ",
        absl::Hex(checksum, absl::kZeroPad16), ", manifest says ",
        absl::Hex(entry.checksum, absl::kZeroPad16)));
  }
  if (sink_ != nullptr) return absl::OkStatus();
  if (!builder_) {  // A tensor without bytes, which Accept never saw.
    ASSIGN_OR_RETURN(TensorBuilder empty,
                     TensorBuilder::Create(entry.dtype, entry.shape));
    builder_.emplace(std::move(empty));
  }
  Tensor tensor = std::move(*builder_).Build(checksum);
  builder_.reset();
  if (!on_tensor_) {
    done_.push_back(std::move(tensor));
    return absl::OkStatus();
  }
  callback_error_ = on_tensor_(current_, entry, std::move(tensor));
  return callback_error_;
}

namespace {
uint64_t AlignedForStorage(uint64_t offset) {
  return (offset + kStorageAlignment - 1) / kStorageAlignment *
         kStorageAlignment;
}
bool IsPacked(uint64_t bytes) { return bytes < kPackedTensorMaxBytes; }
}  // namespace

absl::Status ChunkReceiver::NewBlock() {
  uint64_t bytes = 0;
  size_t end = current_;
  for (; end < entries_.size() && IsPacked(sizes_[end]); ++end) {
    if (sizes_[end] == 0) continue;  // Made apart, with no bytes to come.
    const uint64_t next = AlignedForStorage(bytes) + sizes_[end];
    if (next > kPackBlockBytes) break;
    bytes = next;
  }
  // A block cut short by the next tensor takes the whole kPackBlockBytes (at
  // most kPackedTensorMaxBytes unused) so that, freed, it serves the next one
  // from Storage's pool of huge pages.
  const bool full = end < entries_.size() && IsPacked(sizes_[end]);
  ASSIGN_OR_RETURN(
      block_, Storage::AllocateUninitialized(full ? kPackBlockBytes : bytes));
  block_end_ = end;
  block_used_ = 0;
  return absl::OkStatus();
}

absl::StatusOr<TensorBuilder> ChunkReceiver::NewBuilder() {
  const TransferEntry& entry = entries_[current_];
  if (packing_ == TensorPacking::kOwnStorage || !IsPacked(sizes_[current_]))
    return TensorBuilder::CreateUninitialized(entry.dtype, entry.shape);
  if (block_ == nullptr) RETURN_IF_ERROR(NewBlock());
  const uint64_t offset = AlignedForStorage(block_used_);
  block_used_ = offset + sizes_[current_];
  return TensorBuilder::InBlock(entry.dtype, entry.shape, block_, offset);
}

absl::Status ChunkReceiver::Fail(absl::Status status) {
  error_ = status;
  builder_.reset();
  block_.reset();
  done_.clear();
  return status;
}

absl::Status ChunkReceiver::Accept(uint64_t offset, absl::string_view data) {
  if (!error_.ok()) return error_;
  absl::Status misplaced = CheckChunk(offset, data.size());
  // A piece of a chunk BeginChunk announced was checked with the whole chunk.
  if (misplaced.ok() && received_ >= announced_end_)
    misplaced = CheckChunkSize(offset, data.size());
  if (!misplaced.ok()) return Fail(misplaced);
  while (!data.empty()) {
    const uint64_t take =
        std::min<uint64_t>(data.size(), sizes_[current_] - current_filled_);
    const absl::string_view piece = data.substr(0, take);
    absl::Status placed = Place(piece);
    if (!placed.ok()) return Fail(placed);
    checksum_.Update(piece.data(), take);
    current_filled_ += take;
    received_ += take;
    data.remove_prefix(take);
    absl::Status completed = CompleteFullTensors();
    if (!completed.ok()) return Fail(completed);
  }
  return absl::OkStatus();
}

absl::Status ChunkReceiver::Place(absl::string_view piece) {
  if (sink_ != nullptr) {
    callback_error_ = sink_->Write(current_, current_filled_, piece);
    return callback_error_;
  }
  if (!builder_) {
    ASSIGN_OR_RETURN(TensorBuilder builder, NewBuilder());
    builder_.emplace(std::move(builder));
  }
  std::memcpy(builder_->mutable_data() + current_filled_, piece.data(),
              piece.size());
  return absl::OkStatus();
}

absl::Status ChunkReceiver::CheckChunk(uint64_t offset, uint64_t size) const {
  if (offset != received_) {
    return absl::InvalidArgumentError(
        absl::StrCat("chunk at offset ", offset, " but ", received_,
                     " bytes have arrived: chunks ",
                     offset < received_ ? "overlap or repeat"
                                        : "are missing bytes or out of order"));
  }
  if (size > kMaxChunkBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("chunk of ", size, " bytes at offset ", offset,
                     " is larger than the maximum of ", kMaxChunkBytes));
  }
  if (size > total_ - received_) {
    return absl::InvalidArgumentError(
        absl::StrCat("chunk of ", size, " bytes at offset ", offset,
                     " runs past the end (", total_, " bytes)"));
  }
  return absl::OkStatus();
}

absl::Status ChunkReceiver::CheckChunkSize(uint64_t offset,
                                           uint64_t size) const {
  const bool ends_stream = size > 0 && size == total_ - received_;
  if (min_chunk_bytes_ > 0 && size < min_chunk_bytes_ && !ends_stream) {
    return absl::InvalidArgumentError(
        absl::StrCat("chunk of ", size, " bytes at offset ", offset,
                     " is smaller than the minimum of ", min_chunk_bytes_,
                     " (only the chunk that ends the stream may be smaller)"));
  }
  return absl::OkStatus();
}

absl::Status ChunkReceiver::BeginChunk(uint64_t offset, uint64_t size) {
  if (!error_.ok()) return error_;
  error_ = CheckChunk(offset, size);
  if (error_.ok()) error_ = CheckChunkSize(offset, size);
  if (!error_.ok()) return Fail(error_);
  announced_end_ = offset + size;
  return absl::OkStatus();
}

absl::Status ChunkReceiver::VerifyChecksums(
    absl::Span<const uint64_t> end_checksums) const {
  if (!end_checksums.empty() && end_checksums.size() != entries_.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("end marker carries ", end_checksums.size(),
                     " checksums for ", entries_.size(), " tensors"));
  }
  for (size_t i = 0; i < entries_.size(); ++i) {
    const TransferEntry& entry = entries_[i];
    const uint64_t expected =
        end_checksums.empty() ? entry.checksum : end_checksums[i];
    if (entry.checksum != 0 && expected != entry.checksum) {
      return absl::DataLossError(
          absl::StrCat("tensor \"", entry.key, "\": end marker says xxh3 ",
                       absl::Hex(expected, absl::kZeroPad16), ", header says ",
                       absl::Hex(entry.checksum, absl::kZeroPad16)));
    }
    if (computed_[i] != expected) {
      return absl::DataLossError(absl::StrCat(
          "checksum mismatch for tensor \"", entry.key, "\": got xxh3 ",
          absl::Hex(computed_[i], absl::kZeroPad16), ", ",
          end_checksums.empty() ? "header" : "end marker", " says ",
          absl::Hex(expected, absl::kZeroPad16)));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<Tensor>> ChunkReceiver::Finish(
    uint64_t total_bytes, absl::Span<const uint64_t> end_checksums) {
  if (!error_.ok()) return error_;
  if (received_ != total_ || current_ != entries_.size()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "stream ended after ", received_, " of ", total_, " bytes"));
  }
  if (total_bytes != total_) {
    return absl::InvalidArgumentError(
        absl::StrCat("end marker says ", total_bytes,
                     " bytes but the manifest adds up to ", total_));
  }
  RETURN_IF_ERROR(VerifyChecksums(end_checksums));
  return std::move(done_);
}

ChunkSender::ChunkSender(std::vector<Tensor> tensors, uint64_t chunk_bytes,
                         uint64_t start_offset)
    : tensors_(std::move(tensors)),
      chunk_bytes_(std::max<uint64_t>(chunk_bytes, 1)) {
  for (const Tensor& tensor : tensors_) total_ += tensor.num_bytes();
  // Skip whole tensors before the start, then the start's tensor's first
  // bytes.
  sent_ = std::min(start_offset, total_);
  uint64_t skip = sent_;
  while (tensor_ < tensors_.size() && skip >= tensors_[tensor_].num_bytes()) {
    skip -= tensors_[tensor_].num_bytes();
    ++tensor_;
  }
  within_ = skip;
}

void ChunkSender::AddPiece(const Tensor& tensor, uint64_t take,
                           Chunk* chunk) const {
  const uint8_t* start = tensor.data() + within_;
  // Tensors laid out back to back in one storage (a checkpoint file's, a
  // packed block) go out as one piece: one buffer for the transport to hold
  // instead of one per tensor.
  if (!chunk->pieces.empty() && chunk->owners.back() == tensor.storage()) {
    absl::Span<const uint8_t>& last = chunk->pieces.back();
    if (last.data() + last.size() == start) {
      last = absl::Span<const uint8_t>(last.data(), last.size() + take);
      return;
    }
  }
  chunk->pieces.emplace_back(start, take);
  chunk->owners.push_back(tensor.storage());
}

bool ChunkSender::Next(Chunk* chunk) {
  chunk->pieces.clear();
  chunk->owners.clear();
  chunk->offset = sent_;
  chunk->size = 0;
  while (tensor_ < tensors_.size() && chunk->size < chunk_bytes_) {
    const Tensor& tensor = tensors_[tensor_];
    const uint64_t available = tensor.num_bytes() - within_;
    const uint64_t take = std::min(available, chunk_bytes_ - chunk->size);
    if (take > 0) AddPiece(tensor, take, chunk);
    chunk->size += take;
    within_ += take;
    if (within_ == tensor.num_bytes()) {
      ++tensor_;
      within_ = 0;
    }
  }
  sent_ += chunk->size;
  return chunk->size > 0;
}

absl::StatusOr<uint32_t> ResolveChunkBytes(uint32_t requested,
                                           uint32_t default_bytes) {
  if (requested > kMaxChunkBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("chunk_bytes may be at most ", kMaxChunkBytes));
  }
  return requested > 0 ? requested : default_bytes;
}

}  // namespace modelstate

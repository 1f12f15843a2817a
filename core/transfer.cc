#include "core/transfer.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "core/limits.h"
#include "core/status_macros.h"
#include "xxhash.h"

namespace modelstate {

absl::StatusOr<std::vector<uint64_t>> TransferSizes(
    const std::vector<TransferEntry>& entries) {
  std::vector<uint64_t> sizes;
  sizes.reserve(entries.size());
  uint64_t total = 0;
  for (const TransferEntry& entry : entries) {
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

ChunkReceiver::ChunkReceiver(std::vector<TransferEntry> entries,
                             std::vector<uint64_t> sizes,
                             TensorCallback on_tensor, uint64_t min_chunk_bytes)
    : entries_(std::move(entries)),
      sizes_(std::move(sizes)),
      on_tensor_(std::move(on_tensor)),
      min_chunk_bytes_(min_chunk_bytes) {
  for (uint64_t size : sizes_) total_ += size;
  if (!on_tensor_) done_.reserve(entries_.size());
}

absl::StatusOr<std::unique_ptr<ChunkReceiver>> ChunkReceiver::Create(
    std::vector<TransferEntry> entries, TensorCallback on_tensor,
    uint64_t min_chunk_bytes) {
  ASSIGN_OR_RETURN(std::vector<uint64_t> sizes, TransferSizes(entries));
  std::unique_ptr<ChunkReceiver> receiver(
      new ChunkReceiver(std::move(entries), std::move(sizes),
                        std::move(on_tensor), min_chunk_bytes));
  // Zero-byte tensors at the front are complete before any data.
  RETURN_IF_ERROR(receiver->CompleteFullTensors());
  return receiver;
}

absl::Status ChunkReceiver::CompleteFullTensors() {
  while (current_ < entries_.size() && current_filled_ == sizes_[current_]) {
    const TransferEntry& entry = entries_[current_];
    if (!builder_) {
      ASSIGN_OR_RETURN(TensorBuilder empty,
                       TensorBuilder::Create(entry.dtype, entry.shape));
      builder_.emplace(std::move(empty));
    }
    Tensor tensor = std::move(*builder_).Build();
    builder_.reset();
    const uint64_t checksum = tensor.Checksum();
    if (checksum != entry.checksum) {
      return absl::DataLossError(absl::StrCat(
          "checksum mismatch for tensor \"", entry.key, "\": got xxh3 ",
          absl::Hex(checksum, absl::kZeroPad16), ", manifest says ",
          absl::Hex(entry.checksum, absl::kZeroPad16)));
    }
    if (on_tensor_) {
      RETURN_IF_ERROR(on_tensor_(current_, std::move(tensor)));
    } else {
      done_.push_back(std::move(tensor));
    }
    ++current_;
    current_filled_ = 0;
  }
  return absl::OkStatus();
}

absl::Status ChunkReceiver::Accept(uint64_t offset, absl::string_view data) {
  if (!error_.ok()) return error_;
  auto fail = [this](absl::Status status) {
    error_ = status;
    builder_.reset();
    done_.clear();
    return status;
  };
  if (offset != received_) {
    return fail(absl::InvalidArgumentError(absl::StrCat(
        "chunk at offset ", offset, " but ", received_,
        " bytes have arrived: chunks ",
        offset < received_ ? "overlap or repeat"
                           : "are missing bytes or out of order")));
  }
  if (data.size() > kMaxChunkBytes) {
    return fail(absl::InvalidArgumentError(
        absl::StrCat("chunk of ", data.size(), " bytes at offset ", offset,
                     " is larger than the maximum of ", kMaxChunkBytes)));
  }
  if (data.size() > total_ - received_) {
    return fail(absl::InvalidArgumentError(
        absl::StrCat("chunk of ", data.size(), " bytes at offset ", offset,
                     " runs past the end (", total_, " bytes)")));
  }
  const bool ends_stream = !data.empty() && data.size() == total_ - received_;
  if (min_chunk_bytes_ > 0 && data.size() < min_chunk_bytes_ && !ends_stream) {
    return fail(absl::InvalidArgumentError(
        absl::StrCat("chunk of ", data.size(), " bytes at offset ", offset,
                     " is smaller than the minimum of ", min_chunk_bytes_,
                     " (only the chunk that ends the stream may be smaller)")));
  }
  const char* in = data.data();
  uint64_t left = data.size();
  while (left > 0) {
    const TransferEntry& entry = entries_[current_];
    if (!builder_) {
      absl::StatusOr<TensorBuilder> builder =
          TensorBuilder::CreateUninitialized(entry.dtype, entry.shape);
      if (!builder.ok()) return fail(builder.status());
      builder_.emplace(*std::move(builder));
    }
    const uint64_t take = std::min(left, sizes_[current_] - current_filled_);
    std::memcpy(builder_->mutable_data() + current_filled_, in, take);
    current_filled_ += take;
    in += take;
    left -= take;
    received_ += take;
    absl::Status completed = CompleteFullTensors();
    if (!completed.ok()) return fail(completed);
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<Tensor>> ChunkReceiver::Finish(
    uint64_t total_bytes) {
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
  return std::move(done_);
}

ChunkSender::ChunkSender(std::vector<Tensor> tensors, uint64_t chunk_bytes)
    : tensors_(std::move(tensors)),
      chunk_bytes_(std::max<uint64_t>(chunk_bytes, 1)) {
  for (const Tensor& tensor : tensors_) total_ += tensor.num_bytes();
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
    if (take > 0) {
      chunk->pieces.emplace_back(tensor.data() + within_, take);
      chunk->owners.push_back(tensor.storage());
    }
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

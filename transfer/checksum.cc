#include "transfer/checksum.h"

#include "model/tensor.h"
#include "xxhash.h"

namespace modelstate {

void ChecksumCursor::FreeState::operator()(XXH3_state_s* state) const {
  XXH3_freeState(state);
}

ChecksumCursor::ChecksumCursor() : state_(XXH3_createState()) {
  XXH3_64bits_reset(state_.get());
}

ChecksumCursor::~ChecksumCursor() = default;
ChecksumCursor::ChecksumCursor(ChecksumCursor&&) noexcept = default;
ChecksumCursor& ChecksumCursor::operator=(ChecksumCursor&&) noexcept = default;

void ChecksumCursor::Begin(uint64_t size) {
  size_ = size;
  hashed_ = 0;
  one_piece_ = false;
}

void ChecksumCursor::Update(const void* data, uint64_t size) {
  if (size == 0) return;
  if (hashed_ == 0 && size == size_) {
    one_piece_checksum_ = ChecksumOf(data, size);
    one_piece_ = true;
  } else {
    // The streaming state is reset lazily, only for items that need it.
    if (hashed_ == 0) XXH3_64bits_reset(state_.get());
    XXH3_64bits_update(state_.get(), data, size);
  }
  hashed_ += size;
}

uint64_t ChecksumCursor::Digest() const {
  if (hashed_ == 0) return ChecksumOf(nullptr, 0);
  if (one_piece_) return one_piece_checksum_;
  return XXH3_64bits_digest(state_.get());
}

}  // namespace modelstate

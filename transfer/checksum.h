// The protocol's per-tensor checksum (XXH3-64) over bytes that pass in pieces:
// a receiver hashing chunks as it copies them (cache-hot), a sender hashing
// the pieces it sends. Bytes all at hand are hashed with ChecksumOf
// (model/tensor.h), which gives the same value.
#ifndef MODELSTATE_TRANSFER_CHECKSUM_H_
#define MODELSTATE_TRANSFER_CHECKSUM_H_

#include <cstddef>
#include <cstdint>
#include <memory>

struct XXH3_state_s;

namespace modelstate {

// The checksum of one item of known size at a time, fed its bytes in order.
// Not thread-safe.
class ChecksumCursor {
 public:
  ChecksumCursor();
  ~ChecksumCursor();
  ChecksumCursor(ChecksumCursor&&) noexcept;
  ChecksumCursor& operator=(ChecksumCursor&&) noexcept;

  // Starts the checksum of an item of `size` bytes.
  void Begin(uint64_t size);
  // Adds the item's next `size` bytes.
  void Update(const void* data, uint64_t size);
  // The checksum of the bytes added since Begin: the item's, once all
  // arrived.
  uint64_t Digest() const;
  // Bytes added since Begin.
  uint64_t hashed() const { return hashed_; }

 private:
  struct FreeState {
    void operator()(XXH3_state_s* state) const;
  };

  std::unique_ptr<XXH3_state_s, FreeState> state_;
  uint64_t size_ = 0;
  uint64_t hashed_ = 0;
  // An item whose bytes came in one piece (most small tensors) is hashed in
  // one call, without the streaming state's reset, buffering and digest.
  bool one_piece_ = false;
  uint64_t one_piece_checksum_ = 0;
};

}  // namespace modelstate

#endif  // MODELSTATE_TRANSFER_CHECKSUM_H_

// Remembers dtype conversions of tensors for as long as their source bytes
// live, so that many workers fetching the same model as bfloat16 pay for the
// conversion once.
#ifndef MODELSTATE_MODEL_CAST_CACHE_H_
#define MODELSTATE_MODEL_CAST_CACHE_H_

#include <cstdint>
#include <memory>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "model/tensor.h"

namespace modelstate {

// Thread-safe.
class CastCache {
 public:
  // Returns `tensor` converted to `dtype` (torch's conversion), reusing an
  // earlier conversion of the same bytes if their storage is still alive. With
  // `remember` false the result is computed but not kept. Errors as
  // Tensor::CastTo.
  absl::StatusOr<Tensor> Get(const Tensor& tensor, DType dtype,
                             bool remember = true);

  // Drops conversions whose source storage has died. Returns how many were
  // dropped.
  size_t Purge();

  size_t size() const;

 private:
  struct Key {
    const Storage* storage;
    size_t offset;
    size_t bytes;
    DType dtype;
    template <typename H>
    friend H AbslHashValue(H h, const Key& k) {
      return H::combine(std::move(h), k.storage, k.offset, k.bytes, k.dtype);
    }
    bool operator==(const Key& o) const {
      return storage == o.storage && offset == o.offset && bytes == o.bytes &&
             dtype == o.dtype;
    }
  };
  struct Entry {
    std::weak_ptr<const Storage>
        source;  // A new storage at the same address is a miss.
    Tensor cast;
  };

  mutable absl::Mutex mu_;
  absl::flat_hash_map<Key, Entry> entries_ ABSL_GUARDED_BY(mu_);
};

}  // namespace modelstate

#endif  // MODELSTATE_MODEL_CAST_CACHE_H_

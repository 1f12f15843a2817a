#include "model/cast_cache.h"

#include "common/status_macros.h"

namespace modelstate {

absl::StatusOr<Tensor> CastCache::Get(const Tensor& tensor, DType dtype,
                                      bool remember) {
  if (tensor.dtype() == dtype) return tensor;
  const Key key{tensor.storage().get(), tensor.storage_offset(),
                tensor.num_bytes(), dtype};
  {
    absl::MutexLock lock(&mu_);
    auto it = entries_.find(key);
    if (it != entries_.end()) {
      if (!it->second.source.expired() &&
          it->second.source.lock() == tensor.storage()) {
        return it->second.cast.Reshape(tensor.shape());
      }
      entries_.erase(it);
    }
  }
  // Convert outside the lock: other fetches go on meanwhile.
  ASSIGN_OR_RETURN(Tensor cast, tensor.CastTo(dtype));
  if (remember) {
    absl::MutexLock lock(&mu_);
    entries_.insert_or_assign(key, Entry{tensor.storage(), cast});
  }
  return cast;
}

size_t CastCache::Purge() {
  absl::MutexLock lock(&mu_);
  size_t dropped = 0;
  for (auto it = entries_.begin(); it != entries_.end();) {
    if (it->second.source.expired()) {
      entries_.erase(it++);
      ++dropped;
    } else {
      ++it;
    }
  }
  return dropped;
}

size_t CastCache::size() const {
  absl::MutexLock lock(&mu_);
  return entries_.size();
}

}  // namespace modelstate

// The store's memory accountant: what its tensors and their metadata hold,
// what pending loads have reserved, and the limit those share with the
// process's storage pool of freed blocks (model/tensor.h).
//
// Thread-safety: every method may be called from any thread. Its lock is a
// leaf: nothing but the storage pool is called with it held, so it may be
// taken with any of the store's other locks held.
#ifndef MODELSTATE_STORE_STORE_MEMORY_H_
#define MODELSTATE_STORE_STORE_MEMORY_H_

#include <atomic>
#include <cstdint>
#include <memory>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "model/module.h"
#include "model/tensor.h"

namespace modelstate {

class StoreMemory {
 public:
  // `limit_bytes` as ModelStore::Options::memory_limit_bytes; 0 is unlimited.
  explicit StoreMemory(int64_t limit_bytes);
  ~StoreMemory();
  StoreMemory(const StoreMemory&) = delete;
  StoreMemory& operator=(const StoreMemory&) = delete;

  int64_t limit_bytes() const { return limit_bytes_; }

  // ResourceExhausted if `extra_bytes` more live bytes would exceed the limit
  // (with what is reserved); OK otherwise, after giving back pooled blocks
  // that stand in their way (pooled memory makes room, it never fails one).
  absl::Status CheckFits(int64_t extra_bytes) const;
  // As CheckFits, and holds `bytes` reserved until Release.
  absl::Status Reserve(int64_t bytes);
  // As Reserve, for a load that begins: ResourceExhausted as well when
  // `max_pending_loads` (> 0) loads are pending already. Counts it pending
  // until Release with `finished_load`.
  absl::Status ReserveForLoad(int64_t bytes, int max_pending_loads);
  // Gives back `bytes` of a reservation; `finished_load` also ends its load's
  // count.
  void Release(int64_t bytes, bool finished_load);

  // ResourceExhausted when `num_tensors` storages' overhead alone would pass
  // the limit (see ModelStore::CheckLoadSize).
  absl::Status CheckLoadSize(int64_t num_tensors) const;
  // Charges `bytes` and `metadata_bytes` to `charge` once they fit (see
  // ModelStore::ChargeIfFits); ResourceExhausted, charging nothing, if not.
  absl::Status ChargeIfFits(const MemoryCharge& charge, int64_t bytes,
                            int64_t metadata_bytes) const;

  // Counts a tree's modules and storages for as long as they live. A module
  // counted before had its whole subtree counted with it, so the walk stops
  // there: a load that changed one tensor walks only the modules it copied.
  void AttachTree(const Module& root);
  // Counts `tensor`'s storage for as long as it lives.
  void AttachStorage(const Tensor& tensor);

  // Stops limiting the storage pool; done before the store's models are freed,
  // so that their blocks are pooled as if this store were gone.
  void StopBudgetingPool();

  int64_t live_bytes() const { return accountant_->live_bytes(); }
  int64_t metadata_bytes() const { return accountant_->metadata_bytes(); }
  int64_t reserved_bytes() const { return reserved_bytes_.load(); }
  int pending_loads() const;

 private:
  // Keeps the storage pool within the limit (registered only when there is
  // one).
  class PoolBudget;

  absl::Status CheckFitsLocked(int64_t extra_bytes) const
      ABSL_SHARED_LOCKS_REQUIRED(mu_);

  const int64_t limit_bytes_;
  const std::shared_ptr<MemoryAccountant> accountant_;
  std::unique_ptr<PoolBudget> pool_budget_;

  // Makes a check and the reservation that follows it one step.
  mutable absl::Mutex mu_;
  // Written with mu_ held; atomic because the pool budget reads it from
  // whichever thread frees a storage, possibly one holding mu_.
  std::atomic<int64_t> reserved_bytes_{0};
  int pending_loads_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace modelstate

#endif  // MODELSTATE_STORE_STORE_MEMORY_H_

#include "store/store_memory.h"

#include "absl/strings/str_cat.h"
#include "common/limits.h"
#include "common/status_macros.h"

namespace modelstate {

class StoreMemory::PoolBudget : public StoragePoolBudget {
 public:
  explicit PoolBudget(const StoreMemory& memory) : memory_(memory) {}
  int64_t HeadroomBytes() const override {
    return memory_.limit_bytes_ - memory_.accountant_->live_bytes() -
           memory_.accountant_->metadata_bytes() -
           memory_.reserved_bytes_.load();
  }

 private:
  const StoreMemory& memory_;
};

StoreMemory::StoreMemory(int64_t limit_bytes)
    : limit_bytes_(limit_bytes),
      accountant_(std::make_shared<MemoryAccountant>()) {
  if (limit_bytes_ > 0) {
    pool_budget_ = std::make_unique<PoolBudget>(*this);
    Storage::AddPoolBudget(pool_budget_.get());
  }
}

StoreMemory::~StoreMemory() { StopBudgetingPool(); }

void StoreMemory::StopBudgetingPool() {
  if (pool_budget_ == nullptr) return;
  Storage::RemovePoolBudget(pool_budget_.get());
  pool_budget_.reset();
}

absl::Status StoreMemory::CheckFitsLocked(int64_t extra_bytes) const {
  if (limit_bytes_ <= 0) return absl::OkStatus();
  const int64_t in_use = accountant_->live_bytes() +
                         accountant_->metadata_bytes() + reserved_bytes_;
  if (in_use + extra_bytes > limit_bytes_) {
    return absl::ResourceExhaustedError(
        absl::StrCat("memory limit: ", extra_bytes, " more bytes needed, ",
                     in_use, " of ", limit_bytes_, " bytes in use"));
  }
  // Pooled memory is spare: it makes room rather than failing the request.
  const int64_t over = in_use + extra_bytes +
                       static_cast<int64_t>(Storage::pooled_bytes()) -
                       limit_bytes_;
  if (over > 0) Storage::TrimPool(static_cast<size_t>(over));
  return absl::OkStatus();
}

absl::Status StoreMemory::CheckFits(int64_t extra_bytes) const {
  absl::ReaderMutexLock lock(&mu_);
  return CheckFitsLocked(extra_bytes);
}

absl::Status StoreMemory::Reserve(int64_t bytes) {
  absl::MutexLock lock(&mu_);
  RETURN_IF_ERROR(CheckFitsLocked(bytes));
  reserved_bytes_ += bytes;
  return absl::OkStatus();
}

absl::Status StoreMemory::ReserveForLoad(int64_t bytes, int max_pending_loads) {
  absl::MutexLock lock(&mu_);
  if (max_pending_loads > 0 && pending_loads_ >= max_pending_loads) {
    return absl::ResourceExhaustedError(
        absl::StrCat(pending_loads_,
                     " loads are in flight, the most this server takes; "
                     "retry later"));
  }
  RETURN_IF_ERROR(CheckFitsLocked(bytes));
  reserved_bytes_ += bytes;
  ++pending_loads_;
  return absl::OkStatus();
}

void StoreMemory::Release(int64_t bytes, bool finished_load) {
  absl::MutexLock lock(&mu_);
  reserved_bytes_ -= bytes;
  if (finished_load) --pending_loads_;
}

absl::Status StoreMemory::CheckLoadSize(int64_t num_tensors) const {
  if (limit_bytes_ <= 0) return absl::OkStatus();
  // Past limit / overhead the product would only say "over the limit".
  const int64_t bytes = num_tensors > limit_bytes_ / kStorageOverheadBytes
                            ? limit_bytes_ + 1
                            : num_tensors * kStorageOverheadBytes;
  return CheckFits(bytes);
}

absl::Status StoreMemory::ChargeIfFits(const MemoryCharge& charge,
                                       int64_t bytes,
                                       int64_t metadata_bytes) const {
  absl::ReaderMutexLock lock(&mu_);
  RETURN_IF_ERROR(CheckFitsLocked(bytes + metadata_bytes));
  charge.Charge(accountant_, bytes, metadata_bytes);
  return absl::OkStatus();
}

namespace {

void AttachTreeTo(const Module& module,
                  const std::shared_ptr<MemoryAccountant>& accountant) {
  if (!module.ChargeTo(accountant)) return;
  for (const auto* slots : {&module.parameters(), &module.buffers()}) {
    for (const TensorSlot& slot : *slots) {
      if (slot.tensor) slot.tensor->storage()->AttachAccountant(accountant);
    }
  }
  for (const ChildSlot& child : module.children()) {
    if (child.module) AttachTreeTo(*child.module, accountant);
  }
}

}  // namespace

void StoreMemory::AttachTree(const Module& root) {
  AttachTreeTo(root, accountant_);
}

void StoreMemory::AttachStorage(const Tensor& tensor) {
  tensor.storage()->AttachAccountant(accountant_);
}

int StoreMemory::pending_loads() const {
  absl::ReaderMutexLock lock(&mu_);
  return pending_loads_;
}

}  // namespace modelstate

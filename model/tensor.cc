#include "model/tensor.h"

#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <iterator>
#include <new>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/mutex.h"
#include "common/sanitizers.h"
#include "common/status_macros.h"
#include "xxhash.h"

namespace modelstate {
namespace {
constexpr size_t kAlignment = kStorageAlignment;
constexpr size_t kHugePage = kHugePageBytes;

#ifdef MODELSTATE_ASAN
extern "C" void __asan_poison_memory_region(void const volatile*, size_t);
extern "C" void __asan_unpoison_memory_region(void const volatile*, size_t);
// Pooled blocks are poisoned, so a use after the storage died is still
// reported under ASan although the block is not freed.
void Poison(void* data, size_t bytes) {
  __asan_poison_memory_region(data, bytes);
}
void Unpoison(void* data, size_t bytes) {
  __asan_unpoison_memory_region(data, bytes);
}
#else
void Poison(void*, size_t) {}
void Unpoison(void*, size_t) {}
#endif

// Maps `bytes` (a multiple of kHugePage) of fresh anonymous memory at a
// kHugePage boundary, advised to use transparent huge pages. Returns null if
// the mapping fails.
uint8_t* MapHugeAligned(size_t bytes) {
  const size_t span = bytes + kHugePage;
  if (span < bytes) return nullptr;
  void* raw = mmap(nullptr, span, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) return nullptr;
  const uintptr_t start = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t aligned = (start + kHugePage - 1) & ~(kHugePage - 1);
  if (aligned > start) munmap(raw, aligned - start);
  const uintptr_t tail = start + span - (aligned + bytes);
  if (tail > 0) munmap(reinterpret_cast<void*>(aligned + bytes), tail);
  void* data = reinterpret_cast<void*>(aligned);
  madvise(data, bytes, MADV_HUGEPAGE);
  return static_cast<uint8_t*>(data);
}

// Unmaps a block of MapHugeAligned memory (or part of one).
void Unmap(uint8_t* data, size_t bytes) {
  Unpoison(data, bytes);
  munmap(data, bytes);
}

// Moves the pages of `bytes` at `from` to `to` (both kHugePage-aligned, sizes
// multiples of it) without copying: the page tables move, huge pages stay
// huge, and `from` is unmapped. mremap moves within one mapping only, and a
// block assembled earlier spans several, so a failed move is retried a huge
// page at a time; a huge page that still cannot move is given back to the
// kernel, and `to` keeps the fresh page that was mapped there.
void MovePages(uint8_t* from, size_t bytes, uint8_t* to) {
  Unpoison(from, bytes);
  constexpr int kFlags = MREMAP_MAYMOVE | MREMAP_FIXED;
  if (mremap(from, bytes, bytes, kFlags, to) != MAP_FAILED) return;
  for (size_t at = 0; at < bytes; at += kHugePage) {
    if (mremap(from + at, kHugePage, kHugePage, kFlags, to + at) ==
        MAP_FAILED) {
      munmap(from + at, kHugePage);
    }
  }
}

// Freed huge-page blocks kept for reuse by later large allocations. Giving a
// block back to the kernel is what makes the next large allocation slow: its
// pages must be faulted and zeroed again, and in a virtual machine with free
// page reporting the host has usually reclaimed them, so each fault waits for
// the host too (docs/performance.md, "P1: why it was bimodal"). Bounded by
// `limit_` bytes and by the registered budgets; when full, a freed block goes
// back to the kernel and the pooled ones stay, so a steady workload keeps
// reusing the same blocks.
class BlockPool {
 public:
  static BlockPool& Get() {
    static auto* pool = new BlockPool;
    return *pool;
  }

  // Returns `rounded` bytes (a multiple of kHugePage) at a kHugePage
  // boundary: a pooled block of exactly that size if there is one, else fresh
  // memory into which as much pooled memory as there is has been moved. Null
  // if the mapping fails.
  uint8_t* Allocate(size_t rounded) {
    if (uint8_t* exact = TakeExact(rounded)) return exact;
    uint8_t* data = MapHugeAligned(rounded);
    if (data == nullptr) return nullptr;
    size_t filled = 0;
    for (const Block& piece : TakePieces(rounded)) {
      MovePages(piece.data, piece.bytes, data + filled);
      filled += piece.bytes;
    }
    return data;
  }

  // Keeps `data` (`rounded` bytes) if the bound and the budgets allow, else
  // unmaps it.
  void Give(uint8_t* data, size_t rounded) {
    {
      absl::MutexLock lock(&mu_);
      if (pooled_ + rounded <= limit_ && WithinBudgets(pooled_ + rounded)) {
        Poison(data, rounded);
        blocks_.push_back({data, rounded});
        pooled_ += rounded;
        return;
      }
    }
    Unmap(data, rounded);
  }

  void SetLimit(size_t bytes) {
    std::vector<Block> freed;
    {
      absl::MutexLock lock(&mu_);
      limit_ = bytes;
      freed = PopOldest(pooled_ > limit_ ? pooled_ - limit_ : 0);
    }
    for (const Block& block : freed) Unmap(block.data, block.bytes);
  }

  size_t Trim(size_t bytes) {
    std::vector<Block> freed;
    {
      absl::MutexLock lock(&mu_);
      freed = PopOldest(bytes);
    }
    size_t trimmed = 0;
    for (const Block& block : freed) {
      Unmap(block.data, block.bytes);
      trimmed += block.bytes;
    }
    return trimmed;
  }

  void AddBudget(const StoragePoolBudget* budget) {
    absl::MutexLock lock(&mu_);
    budgets_.push_back(budget);
  }

  void RemoveBudget(const StoragePoolBudget* budget) {
    absl::MutexLock lock(&mu_);
    budgets_.erase(std::remove(budgets_.begin(), budgets_.end(), budget),
                   budgets_.end());
  }

  size_t pooled_bytes() {
    absl::MutexLock lock(&mu_);
    return pooled_;
  }

 private:
  struct Block {
    uint8_t* data;
    size_t bytes;
  };

  // A pooled block of exactly `rounded` bytes, newest first, or null.
  uint8_t* TakeExact(size_t rounded) {
    absl::MutexLock lock(&mu_);
    for (auto it = blocks_.rbegin(); it != blocks_.rend(); ++it) {
      if (it->bytes != rounded) continue;
      uint8_t* data = it->data;
      pooled_ -= rounded;
      blocks_.erase(std::next(it).base());
      Unpoison(data, rounded);
      return data;
    }
    return nullptr;
  }

  // Removes up to `rounded` bytes of pooled memory, newest first, splitting
  // the last block it needs (its tail goes, its head stays pooled). The pieces
  // still hold pooled (poisoned) pages, to be moved by the caller.
  std::vector<Block> TakePieces(size_t rounded) {
    std::vector<Block> pieces;
    absl::MutexLock lock(&mu_);
    size_t taken = 0;
    while (taken < rounded && !blocks_.empty()) {
      Block& newest = blocks_.back();
      const size_t piece = std::min(newest.bytes, rounded - taken);
      pieces.push_back({newest.data + newest.bytes - piece, piece});
      newest.bytes -= piece;
      if (newest.bytes == 0) blocks_.pop_back();
      pooled_ -= piece;
      taken += piece;
    }
    return pieces;
  }

  // Removes the oldest blocks until at least `bytes` have gone (or none are
  // left), for the caller to unmap outside the lock.
  std::vector<Block> PopOldest(size_t bytes)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    std::vector<Block> popped;
    size_t removed = 0;
    while (removed < bytes && !blocks_.empty()) {
      popped.push_back(blocks_.front());
      removed += blocks_.front().bytes;
      pooled_ -= blocks_.front().bytes;
      blocks_.pop_front();
    }
    return popped;
  }

  bool WithinBudgets(size_t pooled) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    for (const StoragePoolBudget* budget : budgets_) {
      if (static_cast<int64_t>(pooled) > budget->HeadroomBytes()) return false;
    }
    return true;
  }

  absl::Mutex mu_;
  std::deque<Block> blocks_ ABSL_GUARDED_BY(mu_);  // oldest first
  size_t pooled_ ABSL_GUARDED_BY(mu_) = 0;
  size_t limit_ ABSL_GUARDED_BY(mu_) = Storage::kDefaultPoolLimitBytes;
  std::vector<const StoragePoolBudget*> budgets_ ABSL_GUARDED_BY(mu_);
};

// The alignment of a block of `bytes`, also the unit its size is rounded up
// to: large blocks are whole huge pages, which is what the pool keys on.
size_t Alignment(size_t bytes) {
  return bytes >= kHugePage ? kHugePage : kAlignment;
}

// True when `bytes` at `offset` lie within `storage`.
bool FitsIn(const Storage& storage, size_t offset, int64_t bytes) {
  return offset <= storage.size() &&
         static_cast<uint64_t>(bytes) <= storage.size() - offset;
}

const std::shared_ptr<const Storage>& EmptyStorage() {
  static const auto* empty =
      new std::shared_ptr<const Storage>(Storage::Allocate(0).value());
  return *empty;
}
}  // namespace

Storage::Storage(const uint8_t* data, uint8_t* allocated, size_t size,
                 std::shared_ptr<const void> owner)
    : data_(data),
      allocated_(allocated),
      size_(size),
      owner_(std::move(owner)) {}

Storage::~Storage() {
  if (allocated_ == nullptr) return;
  if (Alignment(size_) == kHugePage) {
    // Uncharged first: a budget deciding whether the pool may keep the block
    // must not count its bytes as live as well.
    charge_.Release();
    BlockPool::Get().Give(allocated_,
                          (size_ + kHugePage - 1) / kHugePage * kHugePage);
  } else {
    std::free(allocated_);
  }
}

MemoryCharge::~MemoryCharge() { Release(); }

void MemoryCharge::Release() const {
  if (accountant_ == nullptr) return;
  accountant_->live_bytes_.fetch_sub(tensor_bytes_, std::memory_order_relaxed);
  accountant_->metadata_bytes_.fetch_sub(metadata_bytes_,
                                         std::memory_order_relaxed);
  accountant_ = nullptr;
}

bool MemoryCharge::Charge(const std::shared_ptr<MemoryAccountant>& accountant,
                          int64_t tensor_bytes, int64_t metadata_bytes) const {
  if (charged_.test_and_set(std::memory_order_acq_rel)) return false;
  accountant_ = accountant;
  tensor_bytes_ = tensor_bytes;
  metadata_bytes_ = metadata_bytes;
  accountant_->live_bytes_.fetch_add(tensor_bytes, std::memory_order_relaxed);
  accountant_->metadata_bytes_.fetch_add(metadata_bytes,
                                         std::memory_order_relaxed);
  return true;
}

namespace {
std::atomic<size_t> max_allocation{SIZE_MAX};
}  // namespace

void Storage::SetMaxAllocation(size_t bytes) {
  max_allocation.store(bytes, std::memory_order_relaxed);
}

void Storage::SetPoolLimit(size_t bytes) { BlockPool::Get().SetLimit(bytes); }

size_t Storage::pooled_bytes() { return BlockPool::Get().pooled_bytes(); }

size_t Storage::TrimPool(size_t bytes) { return BlockPool::Get().Trim(bytes); }

void Storage::AddPoolBudget(const StoragePoolBudget* budget) {
  BlockPool::Get().AddBudget(budget);
}

void Storage::RemovePoolBudget(const StoragePoolBudget* budget) {
  BlockPool::Get().RemoveBudget(budget);
}

absl::StatusOr<std::shared_ptr<Storage>> Storage::Allocate(size_t bytes) {
  ASSIGN_OR_RETURN(std::shared_ptr<Storage> storage,
                   AllocateUninitialized(bytes));
  std::memset(storage->mutable_data(), 0, bytes);
  return storage;
}

absl::StatusOr<std::shared_ptr<Storage>> Storage::AllocateUninitialized(
    size_t bytes) {
  // Large buffers get 2 MiB alignment and transparent huge pages: filling a
  // fresh 1 GiB tensor then takes 512 page faults instead of 262,144, which is
  // most of the cost of receiving it. The pool maps them (reusing freed ones);
  // aligned_alloc needs a non-zero multiple of the alignment.
  const size_t alignment = Alignment(bytes);
  const size_t rounded =
      bytes == 0 ? alignment : (bytes + alignment - 1) / alignment * alignment;
  if (rounded < bytes) return absl::ResourceExhaustedError("tensor too large");
  if (rounded > max_allocation.load(std::memory_order_relaxed)) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "cannot allocate ", bytes, " bytes: over the allocation ceiling"));
  }
  uint8_t* allocated =
      alignment == kHugePage
          ? BlockPool::Get().Allocate(rounded)
          : static_cast<uint8_t*>(std::aligned_alloc(alignment, rounded));
  if (allocated == nullptr) {
    return absl::ResourceExhaustedError(
        absl::StrCat("cannot allocate ", bytes, " bytes"));
  }
  return Make(allocated, allocated, bytes, /*owner=*/nullptr);
}

std::shared_ptr<Storage> Storage::Make(const uint8_t* data, uint8_t* allocated,
                                       size_t size,
                                       std::shared_ptr<const void> owner) {
  // make_shared puts the storage and its control block in one allocation;
  // it needs a public constructor, which this local class lends it.
  struct Made : Storage {
    Made(const uint8_t* data, uint8_t* allocated, size_t size,
         std::shared_ptr<const void> owner)
        : Storage(data, allocated, size, std::move(owner)) {}
  };
  return std::make_shared<Made>(data, allocated, size, std::move(owner));
}

std::shared_ptr<const Storage> Storage::Borrow(
    const uint8_t* data, size_t bytes, std::shared_ptr<const void> owner) {
  return Make(data, /*allocated=*/nullptr, bytes, std::move(owner));
}

void Storage::AttachAccountant(
    const std::shared_ptr<MemoryAccountant>& accountant) const {
  charge_.Charge(accountant, static_cast<int64_t>(size_),
                 kStorageOverheadBytes);
}

absl::StatusOr<int64_t> NumElements(const Shape& shape) {
  int64_t count = 1;
  for (int64_t dim : shape) {
    if (dim < 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "negative dimension in shape [", absl::StrJoin(shape, ", "), "]"));
    }
    if (__builtin_mul_overflow(count, dim, &count)) {
      return absl::InvalidArgumentError(absl::StrCat("element count of shape [",
                                                     absl::StrJoin(shape, ", "),
                                                     "] overflows"));
    }
  }
  return count;
}

absl::StatusOr<int64_t> NumBytes(DType dtype, const Shape& shape) {
  ASSIGN_OR_RETURN(int64_t count, NumElements(shape));
  int64_t bytes;
  if (__builtin_mul_overflow(count, static_cast<int64_t>(ElementSize(dtype)),
                             &bytes)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "byte size of shape [", absl::StrJoin(shape, ", "), "] overflows"));
  }
  return bytes;
}

std::string TorchSizeString(const Shape& shape) {
  return absl::StrCat("torch.Size([", absl::StrJoin(shape, ", "), "])");
}

Tensor::Tensor() : Tensor(DType::kFloat32, Shape{0}, 0, EmptyStorage(), 0) {}

Tensor::Tensor(DType dtype, Shape shape, int64_t num_elements,
               std::shared_ptr<const Storage> storage, size_t offset,
               std::shared_ptr<ChecksumCell> checksum)
    : dtype_(dtype),
      shape_(std::move(shape)),
      num_elements_(num_elements),
      storage_(std::move(storage)),
      offset_(offset),
      checksum_(checksum ? std::move(checksum)
                         : std::make_shared<ChecksumCell>()) {}

Tensor::Tensor(DType dtype, Shape shape, int64_t num_elements,
               std::shared_ptr<const Storage> storage, size_t offset,
               uint64_t known_checksum)
    : dtype_(dtype),
      shape_(std::move(shape)),
      num_elements_(num_elements),
      storage_(std::move(storage)),
      offset_(offset),
      known_checksum_(known_checksum) {}

absl::StatusOr<Tensor> Tensor::Zeros(DType dtype, const Shape& shape) {
  ASSIGN_OR_RETURN(TensorBuilder builder, TensorBuilder::Create(dtype, shape));
  return std::move(builder).Build();
}

absl::StatusOr<Tensor> Tensor::FromBytes(DType dtype, const Shape& shape,
                                         absl::Span<const uint8_t> bytes) {
  ASSIGN_OR_RETURN(TensorBuilder builder, TensorBuilder::Create(dtype, shape));
  if (bytes.size() != builder.num_bytes()) {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor of shape [", absl::StrJoin(shape, ", "),
                     "] and dtype ", TorchName(dtype), " needs ",
                     builder.num_bytes(), " bytes, got ", bytes.size()));
  }
  if (!bytes.empty())
    std::memcpy(builder.mutable_data(), bytes.data(), bytes.size());
  return std::move(builder).Build();
}

absl::StatusOr<Tensor> Tensor::View(DType dtype, const Shape& shape,
                                    std::shared_ptr<const Storage> storage,
                                    size_t offset) {
  ASSIGN_OR_RETURN(int64_t bytes, NumBytes(dtype, shape));
  if (!FitsIn(*storage, offset, bytes)) {
    return absl::InvalidArgumentError("tensor view exceeds its storage");
  }
  ASSIGN_OR_RETURN(int64_t count, NumElements(shape));
  return Tensor(dtype, shape, count, std::move(storage), offset);
}

absl::StatusOr<Tensor> Tensor::CastTo(DType dtype) const {
  if (dtype == dtype_) return *this;
  ASSIGN_OR_RETURN(TensorBuilder builder,
                   TensorBuilder::CreateUninitialized(dtype, shape_));
  ConvertElements(dtype_, data(), dtype, builder.mutable_data(), num_elements_);
  return std::move(builder).Build();
}

absl::StatusOr<Tensor> Tensor::Reshape(const Shape& shape) const {
  ASSIGN_OR_RETURN(int64_t count, NumElements(shape));
  if (count != num_elements_) {
    return absl::InvalidArgumentError(
        absl::StrCat("cannot reshape ", TorchSizeString(shape_), " to ",
                     TorchSizeString(shape)));
  }
  if (checksum_ == nullptr)
    return Tensor(dtype_, shape, count, storage_, offset_, known_checksum_);
  return Tensor(dtype_, shape, count, storage_, offset_, checksum_);
}

uint64_t ChecksumOf(const void* data, size_t size) {
  return XXH3_64bits(data, size);
}

uint64_t Tensor::Checksum() const {
  if (checksum_ == nullptr) return known_checksum_;
  if (checksum_->known.load(std::memory_order_acquire)) {
    return checksum_->value.load(std::memory_order_relaxed);
  }
  const uint64_t checksum = ChecksumOf(data(), num_bytes());
  checksum_->value.store(checksum, std::memory_order_relaxed);
  checksum_->known.store(true, std::memory_order_release);
  return checksum;
}

bool Tensor::BitwiseEquals(const Tensor& other) const {
  return dtype_ == other.dtype_ && shape_ == other.shape_ &&
         (num_bytes() == 0 ||
          std::memcmp(data(), other.data(), num_bytes()) == 0);
}

absl::StatusOr<TensorBuilder> TensorBuilder::Create(DType dtype,
                                                    const Shape& shape) {
  ASSIGN_OR_RETURN(TensorBuilder builder, CreateUninitialized(dtype, shape));
  std::memset(builder.mutable_data(), 0, builder.num_bytes());
  return builder;
}

absl::StatusOr<TensorBuilder> TensorBuilder::CreateUninitialized(
    DType dtype, const Shape& shape) {
  ASSIGN_OR_RETURN(int64_t bytes, NumBytes(dtype, shape));
  ASSIGN_OR_RETURN(std::shared_ptr<Storage> storage,
                   Storage::AllocateUninitialized(static_cast<size_t>(bytes)));
  return InBlock(dtype, shape, std::move(storage), 0);
}

absl::StatusOr<TensorBuilder> TensorBuilder::InBlock(
    DType dtype, const Shape& shape, std::shared_ptr<Storage> block,
    size_t offset) {
  ASSIGN_OR_RETURN(int64_t bytes, NumBytes(dtype, shape));
  ASSIGN_OR_RETURN(int64_t count, NumElements(shape));
  if (!FitsIn(*block, offset, bytes)) {
    return absl::InvalidArgumentError("tensor does not fit in its block");
  }
  return TensorBuilder(dtype, shape, count, static_cast<size_t>(bytes),
                       std::move(block), offset);
}

Tensor TensorBuilder::Build() && {
  return Tensor(dtype_, std::move(shape_), num_elements_, std::move(storage_),
                offset_);
}

Tensor TensorBuilder::Build(uint64_t checksum) && {
  return Tensor(dtype_, std::move(shape_), num_elements_, std::move(storage_),
                offset_, checksum);
}

}  // namespace modelstate

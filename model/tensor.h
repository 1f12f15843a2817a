// Tensors: a dtype, a shape and an immutable, reference-counted byte storage.
//
// Thread-safety: a Tensor is an immutable value; copies share storage and may
// be used from any thread. A TensorBuilder is owned by one thread until Build()
// publishes its bytes.
#ifndef MODELSTATE_MODEL_TENSOR_H_
#define MODELSTATE_MODEL_TENSOR_H_

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "model/dtype.h"

namespace modelstate {

using Shape = std::vector<int64_t>;

// Counts the bytes of storages attached to it, for as long as they live, and
// the metadata of the objects charged to it (see MemoryCharge). Storages held
// only by snapshots still count, which is the point: they are memory the
// process really holds.
class MemoryAccountant {
 public:
  // Returns the bytes of all attached storages that are still alive.
  int64_t live_bytes() const {
    return live_bytes_.load(std::memory_order_relaxed);
  }
  // Returns the estimated bytes of the live objects around those storages
  // (storage objects, modules, names, shapes).
  int64_t metadata_bytes() const {
    return metadata_bytes_.load(std::memory_order_relaxed);
  }

 private:
  friend class MemoryCharge;
  std::atomic<int64_t> live_bytes_{0};
  std::atomic<int64_t> metadata_bytes_{0};
};

// A one-time charge against a MemoryAccountant, given back when its holder
// dies. A copy starts uncharged (a copied object is a new object and is
// charged on its own). Charge may be called from several threads; the first
// call wins.
class MemoryCharge {
 public:
  MemoryCharge() = default;
  MemoryCharge(const MemoryCharge&) noexcept {}
  MemoryCharge& operator=(const MemoryCharge&) noexcept { return *this; }
  ~MemoryCharge();

  // Gives the charge back now (the destructor then gives back nothing).
  // Called by the holder's destructor when something must see the
  // accountant's figures without this charge before the holder is gone.
  void Release() const;

  // Charges `tensor_bytes` and `metadata_bytes` to `accountant`, which is kept
  // alive until the charge is given back. Returns false, changing nothing,
  // when this was charged before.
  bool Charge(const std::shared_ptr<MemoryAccountant>& accountant,
              int64_t tensor_bytes, int64_t metadata_bytes) const;

 private:
  mutable std::shared_ptr<MemoryAccountant> accountant_;
  mutable int64_t tensor_bytes_ = 0;
  mutable int64_t metadata_bytes_ = 0;
  mutable std::atomic_flag charged_ = ATOMIC_FLAG_INIT;
};

// A memory limit that the storage pool (see Storage) keeps within: the pool
// keeps a freed block only while HeadroomBytes() covers every pooled byte,
// that block included. ModelStore registers one when it has a memory limit,
// so pooled memory and the memory the store counts never pass that limit
// together.
class StoragePoolBudget {
 public:
  virtual ~StoragePoolBudget() = default;
  // The limit less the bytes counted against it, pooled bytes excluded (may
  // be negative). Called with the pool's lock held, from whichever thread
  // frees a storage: it must only read atomics (no locks, no allocation).
  virtual int64_t HeadroomBytes() const = 0;
};

// What one storage costs beyond its bytes, as charged to an accountant: the
// Storage object and its shared_ptr control block, the allocator's smallest
// aligned block (a zero-byte tensor still takes one) with its alignment
// padding, and the checksum cell of the Tensor made over it. Measured at
// about 300 bytes with glibc's malloc; rounded up.
inline constexpr int64_t kStorageOverheadBytes = 384;

// Every allocated storage starts at a kStorageAlignment boundary (what SIMD
// loads and torch's CPU allocator want); those of kHugePageBytes and more at a
// huge page boundary.
inline constexpr size_t kStorageAlignment = 64;
inline constexpr size_t kHugePageBytes = size_t{2} << 20;

// A contiguous block of bytes: either allocated here, or borrowed from memory
// an owner keeps alive (a memory-mapped file).
//
// Allocated blocks start at a 64-byte boundary; blocks of 2 MiB and more start
// at a 2 MiB boundary and are advised (MADV_HUGEPAGE) to use transparent huge
// pages, so filling a fresh large tensor takes few page faults. A borrowed
// block has whatever alignment its owner gives it.
//
// Freed blocks of 2 MiB and more go to a process-wide pool, bounded by
// SetPoolLimit (1 GiB unless set) and by every registered StoragePoolBudget,
// and later large allocations of any size reuse them: their pages are already
// faulted in, which spares a refetch (or a load staged into fresh tensors) the
// cost of faulting and zeroing fresh memory (and, in a VM with free page
// reporting, of the host refilling it). An allocation takes a pooled block of
// its exact rounded size if there is one; otherwise it is assembled from
// pooled memory by moving whole pages into place (mremap, no copy), part of a
// larger block or several smaller ones, with fresh pages for whatever the
// pool lacks. So pooled memory is never stranded by a size it cannot serve
// (e.g. a load's float16 tensors freed after their conversion to float32).
// Pooled memory goes back to the kernel when SetPoolLimit lowers the bound,
// TrimPool asks for room, or a budget has no headroom for it.
//
// Writing: Allocate returns the only writable handle (a non-const Storage);
// fill the bytes through mutable_data() before sharing the storage with
// Tensors, which assume their bytes never change afterwards. Borrowed blocks
// are read-only.
class Storage {
 public:
  // Allocates `bytes` zeroed bytes, aligned as above. Returns ResourceExhausted
  // if the allocation fails.
  static absl::StatusOr<std::shared_ptr<Storage>> Allocate(size_t bytes);

  // As Allocate, but the bytes are left uninitialised: for buffers about to be
  // overwritten whole.
  static absl::StatusOr<std::shared_ptr<Storage>> AllocateUninitialized(
      size_t bytes);

  // Wraps read-only memory that `owner` keeps alive (e.g. a mapping). Never
  // copies.
  static std::shared_ptr<const Storage> Borrow(
      const uint8_t* data, size_t bytes, std::shared_ptr<const void> owner);

  // The largest storage AllocateUninitialized hands out; larger requests get
  // ResourceExhausted. Unlimited unless set. The fuzzers set it: ASan's
  // max_allocation_size_mb caps malloc, not the mappings large storages are.
  // Thread-safe.
  static void SetMaxAllocation(size_t bytes);

  // The pool's bound unless SetPoolLimit changes it: one 1 GiB state dict.
  static constexpr size_t kDefaultPoolLimitBytes = size_t{1} << 30;

  // Bounds the pool of freed large blocks to `bytes`, freeing the oldest
  // pooled blocks beyond it (0 empties the pool and disables it).
  // Thread-safe.
  static void SetPoolLimit(size_t bytes);

  // Returns the bytes of the blocks the pool holds now. Thread-safe.
  static size_t pooled_bytes();

  // Gives pooled blocks back to the kernel, oldest first, until at least
  // `bytes` have gone or the pool is empty. Returns the bytes given back.
  // Thread-safe.
  static size_t TrimPool(size_t bytes);

  // Makes the pool keep within `budget` until RemovePoolBudget; `budget`
  // must stay valid until then. Thread-safe.
  static void AddPoolBudget(const StoragePoolBudget* budget);
  static void RemovePoolBudget(const StoragePoolBudget* budget);

  ~Storage();
  Storage(const Storage&) = delete;
  Storage& operator=(const Storage&) = delete;

  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }

  // The writable bytes of an allocated storage (only Allocate and
  // AllocateUninitialized hand out non-const storages).
  uint8_t* mutable_data() { return allocated_; }

  // Makes `accountant` count this storage's bytes (and kStorageOverheadBytes
  // of metadata) until the storage dies. Attaching to the same accountant
  // again is a no-op; a storage counts towards at most one accountant (the
  // first), which the storage keeps alive.
  void AttachAccountant(
      const std::shared_ptr<MemoryAccountant>& accountant) const;

 private:
  Storage(const uint8_t* data, uint8_t* allocated, size_t size,
          std::shared_ptr<const void> owner);
  static std::shared_ptr<Storage> Make(const uint8_t* data, uint8_t* allocated,
                                       size_t size,
                                       std::shared_ptr<const void> owner);

  const uint8_t* data_;
  uint8_t* allocated_;  // data_ when allocated here (freed with the storage),
                        // null when borrowed.
  size_t size_;
  std::shared_ptr<const void> owner_;
  MemoryCharge charge_;
};

// Returns the number of elements of `shape`, or InvalidArgument for a negative
// dimension or a count that overflows int64.
absl::StatusOr<int64_t> NumElements(const Shape& shape);

// Returns the byte size of a tensor of `dtype` and `shape`, with the same
// errors as NumElements plus InvalidArgument when the byte count overflows
// int64.
absl::StatusOr<int64_t> NumBytes(DType dtype, const Shape& shape);

// XXH3-64 of `size` bytes at `data`: the protocol's per-tensor checksum, in
// one call over bytes that are all at hand (transfer/checksum.h hashes bytes
// that arrive in pieces).
uint64_t ChecksumOf(const void* data, size_t size);

// Formats a shape the way torch prints it: "torch.Size([3, 4])",
// "torch.Size([])".
std::string TorchSizeString(const Shape& shape);

class Tensor {
 public:
  // An empty float32 tensor of shape [0]; mostly for containers.
  Tensor();

  // Returns a tensor of zeros. Errors as NumBytes, or ResourceExhausted.
  static absl::StatusOr<Tensor> Zeros(DType dtype, const Shape& shape);

  // Returns a tensor whose bytes are a copy of `bytes`, which must hold exactly
  // NumBytes(dtype, shape) bytes (InvalidArgument otherwise).
  static absl::StatusOr<Tensor> FromBytes(DType dtype, const Shape& shape,
                                          absl::Span<const uint8_t> bytes);

  // Returns a view of `storage` starting at `offset`; never copies.
  // InvalidArgument when the view does not fit inside the storage.
  static absl::StatusOr<Tensor> View(DType dtype, const Shape& shape,
                                     std::shared_ptr<const Storage> storage,
                                     size_t offset);

  DType dtype() const { return dtype_; }
  const Shape& shape() const { return shape_; }
  int64_t num_elements() const { return num_elements_; }
  size_t num_bytes() const { return num_elements_ * ElementSize(dtype_); }
  // The first byte. Tensors made here (Zeros, FromBytes, CastTo,
  // TensorBuilder) start at a kStorageAlignment boundary of their storage
  // (its start, or their place in a shared block); a View is aligned only as
  // far as its storage and offset make it (a safetensors file's tensors may
  // not be).
  const uint8_t* data() const { return storage_->data() + offset_; }
  absl::Span<const uint8_t> bytes() const { return {data(), num_bytes()}; }
  const std::shared_ptr<const Storage>& storage() const { return storage_; }
  size_t storage_offset() const { return offset_; }

  // data() as T*; the caller must know data() is aligned for T.
  template <typename T>
  const T* data_as() const {
    return reinterpret_cast<const T*>(data());
  }

  // Returns a tensor of `dtype` holding this tensor's values converted as
  // torch's copy_ does (see ConvertElements). Shares storage, without copying,
  // when the dtype is already `dtype`.
  absl::StatusOr<Tensor> CastTo(DType dtype) const;

  // Returns a tensor of the same bytes under another shape with the same
  // element count; shares storage. InvalidArgument when the counts differ.
  absl::StatusOr<Tensor> Reshape(const Shape& shape) const;

  // True when both tensors are views of the same bytes (same storage, offset
  // and size): torch's "tied" parameters.
  bool SharesBytesWith(const Tensor& other) const {
    return storage_ == other.storage_ && offset_ == other.offset_ &&
           num_bytes() == other.num_bytes();
  }

  // XXH3-64 of the tensor's bytes (the protocol's per-tensor checksum).
  // Computed on first use and remembered by every copy and reshape of this
  // tensor (threads that ask at the same moment may each compute it once).
  uint64_t Checksum() const;

  // True when dtype, shape and bytes are all equal.
  bool BitwiseEquals(const Tensor& other) const;

 private:
  friend class TensorBuilder;  // Build(checksum) knows the checksum.
  struct ChecksumCell {
    std::atomic<bool> known{false};
    std::atomic<uint64_t> value{0};
  };

  // A tensor whose checksum is computed on first use, into `checksum` (a new
  // cell when null).
  Tensor(DType dtype, Shape shape, int64_t num_elements,
         std::shared_ptr<const Storage> storage, size_t offset,
         std::shared_ptr<ChecksumCell> checksum = nullptr);
  // A tensor whose checksum is already known: it needs no cell.
  Tensor(DType dtype, Shape shape, int64_t num_elements,
         std::shared_ptr<const Storage> storage, size_t offset,
         uint64_t known_checksum);

  DType dtype_;
  Shape shape_;
  int64_t num_elements_;
  std::shared_ptr<const Storage> storage_;
  size_t offset_;
  // The checksum, when known as the tensor was made (bytes hashed as they
  // arrived); otherwise the cell copies share, null until then. Received
  // tensors, a hundred thousand at a time for a model of small tensors, so
  // skip one allocation each.
  uint64_t known_checksum_ = 0;
  std::shared_ptr<ChecksumCell> checksum_;
};

// Writable tensor under construction. Fill mutable_data(), then Build() to
// freeze it.
class TensorBuilder {
 public:
  // Allocates a zeroed tensor. Errors as Tensor::Zeros.
  static absl::StatusOr<TensorBuilder> Create(DType dtype, const Shape& shape);

  // As Create, but the bytes start uninitialised; the caller must write every
  // byte.
  static absl::StatusOr<TensorBuilder> CreateUninitialized(DType dtype,
                                                           const Shape& shape);

  // A tensor of uninitialised bytes at `offset` in `block`, a storage that
  // several tensors share (many small tensors received into one allocation).
  // The caller writes every byte of this tensor and no byte of a tensor
  // already built in the block. InvalidArgument when the tensor does not fit.
  static absl::StatusOr<TensorBuilder> InBlock(DType dtype, const Shape& shape,
                                               std::shared_ptr<Storage> block,
                                               size_t offset);

  DType dtype() const { return dtype_; }
  const Shape& shape() const { return shape_; }
  size_t num_bytes() const { return num_bytes_; }
  int64_t num_elements() const { return num_elements_; }
  uint8_t* mutable_data() { return storage_->mutable_data() + offset_; }
  template <typename T>
  T* mutable_data_as() {
    return reinterpret_cast<T*>(mutable_data());
  }

  // Freezes the bytes into an immutable Tensor. The builder must not be used
  // afterwards.
  Tensor Build() &&;
  // Build, for bytes whose XXH3-64 the caller computed as it wrote them
  // (e.g. while they arrived, cache-hot): Checksum() returns `checksum`
  // without another pass over the bytes.
  Tensor Build(uint64_t checksum) &&;

 private:
  TensorBuilder(DType dtype, Shape shape, int64_t num_elements,
                size_t num_bytes, std::shared_ptr<Storage> storage,
                size_t offset)
      : dtype_(dtype),
        shape_(std::move(shape)),
        num_elements_(num_elements),
        num_bytes_(num_bytes),
        storage_(std::move(storage)),
        offset_(offset) {}

  DType dtype_;
  Shape shape_;
  int64_t num_elements_;
  size_t num_bytes_;
  std::shared_ptr<Storage> storage_;
  size_t offset_;
};

}  // namespace modelstate

#endif  // MODELSTATE_MODEL_TENSOR_H_

// Sealed memfd exports of tensors, for the same-host fetch
// (server/local_transfer.h): the daemon copies the tensors of a fetch once
// into a memfd sealed against every change (F_SEAL_WRITE | F_SEAL_SHRINK |
// F_SEAL_GROW | F_SEAL_SEAL) and hands a descriptor of it to every local
// client that fetches those tensors later. Each client maps it privately, so
// no byte is copied per fetch, and nobody can change what another reads.
//
// An export is tied to its source tensors' storages, not to a model name or a
// version: it serves any fetch whose tensors are all in it (the same version,
// a subset of its keys, or a later version that shares those tensors), and it
// is dropped once one of those storages has died (its version is neither
// retained nor held by a snapshot any more). A client's mapping keeps the
// export's pages alive until the client unmaps it, whatever the daemon drops.
//
// Thread-safety: a MemfdExport is immutable and may be used from any thread;
// ExportCache is thread-safe.
#ifndef MODELSTATE_STORE_MEMFD_EXPORT_H_
#define MODELSTATE_STORE_MEMFD_EXPORT_H_

#include <cstdint>
#include <list>
#include <memory>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/optional.h"
#include "model/tensor.h"
#include "transfer/export_seals.h"

namespace modelstate {

class MemfdExport {
 public:
  // Copies tensors[i] to offsets[i] of a new memfd of `size` bytes, seals it
  // with kExportSeals, and checks every copy against its tensor's XXH3-64, so
  // that clients may trust it without hashing. Returns InvalidArgument when
  // the vectors differ in length or a tensor falls outside `size`,
  // ResourceExhausted when the memory cannot be had, DataLoss when a copy
  // does not match its checksum, Internal when sealing fails.
  static absl::StatusOr<std::shared_ptr<const MemfdExport>> Create(
      const std::vector<Tensor>& tensors, const std::vector<uint64_t>& offsets,
      uint64_t size);

  ~MemfdExport();
  MemfdExport(const MemfdExport&) = delete;
  MemfdExport& operator=(const MemfdExport&) = delete;

  // The sealed memfd; owned by the export, which closes it when it dies.
  int fd() const { return fd_; }
  uint64_t size() const { return size_; }

  // The offsets in this export of `tensors`' bytes, or nullopt unless every
  // one of them is in it (a view of the same live storage, at the same place
  // and of the same length as a tensor it was made from).
  absl::optional<std::vector<uint64_t>> Locate(
      const std::vector<Tensor>& tensors) const;

  // True once a storage it was made from has died.
  bool Stale() const;

  // Held by the export: whoever keeps exports charges their bytes to it
  // (ModelStore::ChargeIfFits), and the charge goes with the export.
  const MemoryCharge& charge() const { return charge_; }

 private:
  struct Key {
    const Storage* storage;
    size_t offset;
    size_t bytes;
    template <typename H>
    friend H AbslHashValue(H h, const Key& k) {
      return H::combine(std::move(h), k.storage, k.offset, k.bytes);
    }
    bool operator==(const Key& o) const {
      return storage == o.storage && offset == o.offset && bytes == o.bytes;
    }
  };
  static Key KeyOf(const Tensor& tensor);

  MemfdExport(int fd, uint64_t size) : fd_(fd), size_(size) {}

  const int fd_;
  const uint64_t size_;
  absl::flat_hash_map<Key, uint64_t> offsets_;
  // A storage that died may be replaced by another at the same address: the
  // weak pointers tell the two apart.
  std::vector<std::weak_ptr<const Storage>> sources_;
  MemoryCharge charge_;
};

// The exports a daemon keeps, most recently used first, within a bound on
// their total bytes.
class ExportCache {
 public:
  // Keeps at most `capacity_bytes` of exports; 0 keeps none.
  explicit ExportCache(uint64_t capacity_bytes)
      : capacity_bytes_(capacity_bytes) {}

  struct Found {
    std::shared_ptr<const MemfdExport> source;
    std::vector<uint64_t> offsets;  // Of each tensor asked for.
  };

  // Returns a live export that holds every one of `tensors` (marking it most
  // recently used) and their offsets in it; nullopt when none does.
  absl::optional<Found> Find(const std::vector<Tensor>& tensors);

  // True when an export of `bytes` may be kept (it is within the capacity;
  // none is with a capacity of 0).
  bool Admits(uint64_t bytes) const {
    return capacity_bytes_ > 0 && bytes <= capacity_bytes_;
  }

  // Keeps `source` as the most recently used export, dropping the least
  // recently used ones beyond the capacity. Returns false, keeping nothing,
  // when `source` alone exceeds the capacity.
  bool Add(std::shared_ptr<const MemfdExport> source);

  // Drops the exports whose sources have died. Returns how many it dropped.
  size_t Purge();

  uint64_t bytes() const;
  size_t size() const;

 private:
  const uint64_t capacity_bytes_;
  mutable absl::Mutex mu_;
  std::list<std::shared_ptr<const MemfdExport>> exports_ ABSL_GUARDED_BY(mu_);
  uint64_t bytes_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace modelstate

#endif  // MODELSTATE_STORE_MEMFD_EXPORT_H_

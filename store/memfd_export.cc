#include "store/memfd_export.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/file_util.h"
#include "common/status_macros.h"

namespace modelstate {
namespace {

absl::Status NoMemory(absl::string_view what) {
  return absl::ResourceExhaustedError(absl::StrCat(
      "cannot export tensors: ", what, ": ", std::strerror(errno)));
}

// Writes `tensor` at `at` of `fd`: pwrite is the fastest way to fill shmem
// measured here (docs/design.md, "Same-host shared memory"), and two threads
// writing one memfd gain nothing (its writes serialise on the inode).
absl::Status WriteAt(int fd, const Tensor& tensor, uint64_t at) {
  const absl::Status written =
      WriteFullyAt(fd, at, tensor.data(), tensor.num_bytes(), "the export");
  if (written.ok()) return written;
  return absl::ResourceExhaustedError(
      absl::StrCat("cannot export tensors: ", written.message()));
}

// MADV_POPULATE_READ, which older C libraries do not name.
constexpr int kPopulateRead = 22;

// Maps in the pages of [data, data + bytes) in one call rather than one fault
// per page (Linux 5.14; on older kernels the hash faults them in).
void Populate(const uint8_t* data, size_t bytes) {
  const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const uintptr_t begin = reinterpret_cast<uintptr_t>(data) / page * page;
  const uintptr_t end = reinterpret_cast<uintptr_t>(data) + bytes;
  if (end > begin)
    madvise(reinterpret_cast<void*>(begin), end - begin, kPopulateRead);
}

// Writes each tensor at its offset of `fd` while a second thread checks the
// copies already written against their checksums, through a private
// read-only mapping (which maps the memfd's pages, copying none): the check
// costs little more than the copy. Returns the first error of either.
absl::Status CopyAndVerify(int fd, uint64_t size,
                           const std::vector<Tensor>& tensors,
                           const std::vector<uint64_t>& offsets) {
  if (size == 0) return absl::OkStatus();
  void* mapped = mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  if (mapped == MAP_FAILED) return NoMemory("mmap");
  const uint8_t* base = static_cast<const uint8_t*>(mapped);
  std::mutex mu;
  std::condition_variable landed;
  size_t written = 0;    // Guarded by mu: tensors [0, written) are in place.
  bool stopped = false;  // Guarded by mu: no more will be.
  absl::Status corrupt;  // Set by the checker only.
  std::thread checker([&] {
    for (size_t i = 0; i < tensors.size(); ++i) {
      {
        std::unique_lock<std::mutex> lock(mu);
        landed.wait(lock, [&] { return written > i || stopped; });
        if (written <= i) return;
      }
      Populate(base + offsets[i], tensors[i].num_bytes());
      if (ChecksumOf(base + offsets[i], tensors[i].num_bytes()) ==
          tensors[i].Checksum())
        continue;
      corrupt = absl::DataLossError(
          absl::StrCat("the export's copy of tensor ", i, " is corrupt"));
      return;
    }
  });
  absl::Status status;
  for (size_t i = 0; i < tensors.size() && status.ok(); ++i) {
    status = WriteAt(fd, tensors[i], offsets[i]);
    std::lock_guard<std::mutex> lock(mu);
    if (status.ok()) written = i + 1;
    landed.notify_one();
  }
  {
    std::lock_guard<std::mutex> lock(mu);
    stopped = true;
    landed.notify_one();
  }
  checker.join();
  munmap(mapped, size);
  return status.ok() ? corrupt : status;
}

}  // namespace

absl::StatusOr<std::shared_ptr<const MemfdExport>> MemfdExport::Create(
    const std::vector<Tensor>& tensors, const std::vector<uint64_t>& offsets,
    uint64_t size) {
  if (offsets.size() != tensors.size())
    return absl::InvalidArgumentError("one offset per exported tensor needed");
  for (size_t i = 0; i < tensors.size(); ++i) {
    if (offsets[i] > size || tensors[i].num_bytes() > size - offsets[i])
      return absl::InvalidArgumentError(
          absl::StrCat("exported tensor ", i, " falls outside the export"));
  }
  const int fd =
      memfd_create("modelstate-export", MFD_CLOEXEC | MFD_ALLOW_SEALING);
  if (fd < 0) return NoMemory("memfd_create");
  // Owned from here, so that every error path closes it.
  std::shared_ptr<MemfdExport> made(new MemfdExport(fd, size));
  if (ftruncate(fd, static_cast<off_t>(size)) != 0)
    return NoMemory("ftruncate");
  RETURN_IF_ERROR(CopyAndVerify(fd, size, tensors, offsets));
  // Only this process has the descriptor yet, so nothing changed the copies
  // between the check and the seals.
  if (fcntl(fd, F_ADD_SEALS, kExportSeals) != 0)
    return absl::InternalError(
        absl::StrCat("cannot seal an export: ", std::strerror(errno)));
  for (size_t i = 0; i < tensors.size(); ++i) {
    made->offsets_.emplace(KeyOf(tensors[i]), offsets[i]);
    made->sources_.push_back(tensors[i].storage());
  }
  return std::shared_ptr<const MemfdExport>(std::move(made));
}

MemfdExport::~MemfdExport() { close(fd_); }

MemfdExport::Key MemfdExport::KeyOf(const Tensor& tensor) {
  return Key{tensor.storage().get(), tensor.storage_offset(),
             tensor.num_bytes()};
}

absl::optional<std::vector<uint64_t>> MemfdExport::Locate(
    const std::vector<Tensor>& tensors) const {
  // A live source cannot share its address with another storage, so a hit
  // on a fresh export is the same bytes; Stale() rules out dead sources.
  if (Stale()) return absl::nullopt;
  std::vector<uint64_t> found;
  found.reserve(tensors.size());
  for (const Tensor& tensor : tensors) {
    const auto it = offsets_.find(KeyOf(tensor));
    if (it == offsets_.end()) return absl::nullopt;
    found.push_back(it->second);
  }
  return found;
}

bool MemfdExport::Stale() const {
  for (const std::weak_ptr<const Storage>& source : sources_)
    if (source.expired()) return true;
  return false;
}

absl::optional<ExportCache::Found> ExportCache::Find(
    const std::vector<Tensor>& tensors) {
  absl::MutexLock lock(&mu_);
  for (auto it = exports_.begin(); it != exports_.end(); ++it) {
    absl::optional<std::vector<uint64_t>> offsets = (*it)->Locate(tensors);
    if (!offsets.has_value()) continue;
    exports_.splice(exports_.begin(), exports_, it);
    return Found{exports_.front(), *std::move(offsets)};
  }
  return absl::nullopt;
}

bool ExportCache::Add(std::shared_ptr<const MemfdExport> source) {
  if (!Admits(source->size())) return false;
  std::vector<std::shared_ptr<const MemfdExport>> dropped;  // Freed unlocked.
  absl::MutexLock lock(&mu_);
  bytes_ += source->size();
  exports_.push_front(std::move(source));
  // The new export alone fits, so it is never the one dropped.
  while (bytes_ > capacity_bytes_) {
    bytes_ -= exports_.back()->size();
    dropped.push_back(std::move(exports_.back()));
    exports_.pop_back();
  }
  return true;
}

size_t ExportCache::Purge() {
  std::vector<std::shared_ptr<const MemfdExport>> dropped;  // Freed unlocked.
  {
    absl::MutexLock lock(&mu_);
    for (auto it = exports_.begin(); it != exports_.end();) {
      if (!(*it)->Stale()) {
        ++it;
        continue;
      }
      bytes_ -= (*it)->size();
      dropped.push_back(std::move(*it));
      it = exports_.erase(it);
    }
  }
  return dropped.size();
}

uint64_t ExportCache::bytes() const {
  absl::MutexLock lock(&mu_);
  return bytes_;
}

size_t ExportCache::size() const {
  absl::MutexLock lock(&mu_);
  return exports_.size();
}

}  // namespace modelstate

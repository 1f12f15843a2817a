// Durable storage of committed model versions in a directory (modelstated
// --data_dir).
//
// Layout: DIR/<model>/<version, 20 digits>.safetensors holds the tensors and
// DIR/<model>/<version>.manifest.json the architecture spec, tensor kinds and
// XXH3-64 checksums. Each file is written to a temporary name, fsynced,
// renamed, and the directory fsynced; the manifest goes last, so a version
// whose manifest exists is complete. DIR/.lineage.json holds the store's
// lineage (store/lineage.h): its epoch and the deletions it remembers. See
// docs/operations.md.
#ifndef MODELSTATE_STORE_DATA_DIR_H_
#define MODELSTATE_STORE_DATA_DIR_H_

#include <sys/types.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/optional.h"
#include "store/lineage.h"
#include "store/model_store.h"

namespace modelstate {

struct DataDirOptions {
  // Durable versions kept per model (the newest ones); older files are deleted
  // once a newer version is durable.
  int keep_versions = 1;
  // The write(2) used for every file; tests substitute one that fails (a full
  // disk).
  std::function<ssize_t(int fd, const void* data, size_t size)> write = nullptr;
};

struct RestoredModel {
  Snapshot snapshot;
};

struct RestoreReport {
  std::vector<RestoredModel> models;
  // What the directory's lineage record says; empty (epoch 0) without one.
  Lineage lineage;
  // One line per file or version that was skipped, and why.
  std::vector<std::string> problems;
};

// Thread-safety: Persist and Remove may be called from several threads, for
// different models.
class DataDir : public StatePersister {
 public:
  // Opens (creating if needed) the directory. Returns an I/O error status if it
  // cannot.
  static absl::StatusOr<std::unique_ptr<DataDir>> Open(
      const std::string& path, DataDirOptions options = {});

  // Writes `snapshot` durably (see the layout above), then deletes versions
  // beyond keep_versions. Returns ResourceExhausted for a full disk and
  // Unavailable/PermissionDenied for other I/O errors; on error no new version
  // is visible on disk.
  absl::Status Persist(const Snapshot& snapshot) override;

  // Deletes the model's directory.
  absl::Status Remove(const std::string& model) override;

  // Replaces DIR/.lineage.json with `lineage`, atomically and durably.
  // Errors as Persist.
  absl::Status PersistLineage(const Lineage& lineage) override;

  // Reads every model's newest version that verifies: manifest parsed, file
  // read (memory-mapped when large), every tensor's name, dtype, shape and
  // checksum matching the manifest, and the model rebuilt. Anything that fails
  // is reported and skipped (an older durable version is tried next); unrelated
  // files are reported and left alone; leftover temporary files are deleted.
  // A lineage record that does not parse is reported and read as none.
  RestoreReport Restore() const;

  // Records, durably, that a daemon with an access policy used the
  // directory: its models may be ones the policy protects.
  absl::Status RecordAccessPolicy();
  // Whether RecordAccessPolicy was ever called on this directory.
  bool WrittenUnderAccessPolicy() const;

  const std::string& path() const { return path_; }

 private:
  DataDir(std::string path, DataDirOptions options)
      : path_(std::move(path)), options_(std::move(options)) {}
  absl::Status WriteFileAtomically(
      const std::string& dir, const std::string& name,
      const std::function<absl::Status(
          const std::function<absl::Status(const void*, size_t)>&)>& produce)
      const;

  const std::string path_;
  const DataDirOptions options_;
};

// Persists in the background: Persist only records the newest snapshot of each
// model and returns; a writer thread makes it durable, skipping versions
// already superseded. Failures are logged to stderr and counted. Thread-safe.
class AsyncPersister : public StatePersister {
 public:
  // `target` must outlive this object.
  explicit AsyncPersister(StatePersister* target);
  // Writes what is pending, then stops the writer.
  ~AsyncPersister() override;

  absl::Status Persist(const Snapshot& snapshot) override;
  absl::Status Remove(const std::string& model) override;
  absl::Status PersistLineage(const Lineage& lineage) override;

  // Blocks until nothing is pending or being written.
  void Flush();

  int64_t failures() const { return failures_.load(); }
  int64_t written() const { return written_.load(); }

 private:
  void Run();

  StatePersister* target_;
  absl::Mutex mu_;
  // Per model: the newest snapshot to write, or nothing to remove it.
  std::map<std::string, absl::optional<Snapshot>> pending_ ABSL_GUARDED_BY(mu_);
  // The newest lineage to write, written after the models pending with it.
  absl::optional<Lineage> pending_lineage_ ABSL_GUARDED_BY(mu_);
  bool busy_ ABSL_GUARDED_BY(mu_) = false;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::atomic<int64_t> failures_{0};
  std::atomic<int64_t> written_{0};
  std::thread writer_;
};

}  // namespace modelstate

#endif  // MODELSTATE_STORE_DATA_DIR_H_

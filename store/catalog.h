// The catalog of models the store holds: each one's current version, the older
// versions it retains, its commit lock, and its lineage (store/lineage.h): the
// epoch its versions belong to and the last version of deleted names (so that
// a name used again continues its numbering).
//
// Thread-safety: every method may be called from any thread. Readers hold the
// catalog's lock only to copy a pointer, and writers only to validate and swap
// pointers, so no reader ever waits for a writer's data transfer or dtype
// conversion. Writers of a model serialise on its commit mutex (CommitMutex)
// first; the catalog's lock is taken last, after StoreEvents' (store/events.h).
#ifndef MODELSTATE_STORE_CATALOG_H_
#define MODELSTATE_STORE_CATALOG_H_

#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "store/lineage.h"
#include "store/snapshot.h"

namespace modelstate {

class Catalog {
 public:
  // `retain_versions` as ModelStore::Options::retain_versions.
  explicit Catalog(int retain_versions) : retain_versions_(retain_versions) {}
  Catalog(const Catalog&) = delete;
  Catalog& operator=(const Catalog&) = delete;

  // Version `version` of `name` if it is current or retained (0 means
  // current); NotFound otherwise.
  absl::StatusOr<Snapshot> GetSnapshot(const std::string& name,
                                       int64_t version = 0) const;
  // As GetSnapshot, and sets `retained` to the versions of `name` held, newest
  // (the current one) first, read at the same instant.
  absl::StatusOr<Snapshot> GetSnapshotAndVersions(
      const std::string& name, int64_t version,
      std::vector<int64_t>* retained) const;
  // The versions of `name` held, newest first, or NotFound.
  absl::StatusOr<std::vector<int64_t>> RetainedVersions(
      const std::string& name) const;
  // The current version of every model, ordered by name.
  std::vector<Snapshot> List() const;

  // The commit mutex of `name`, which serialises its writers, or NotFound. A
  // model deleted and created again has a new one.
  absl::StatusOr<std::shared_ptr<absl::Mutex>> CommitMutex(
      const std::string& name) const;

  // The version a new model `name` gets: `version` if positive, else one past
  // the last version of a deleted model of that name, else 1. AlreadyExists
  // if the name is taken.
  absl::StatusOr<int64_t> VersionForNew(const std::string& name,
                                        int64_t version) const;
  // Adds `snapshot` as a new model. The caller makes sure that its name is
  // free (VersionForNew, under a lock that serialises adds and removes).
  void Insert(Snapshot snapshot);
  // Makes `next` the current version of its model, retaining the previous one
  // as Options::retain_versions says, with a memo of its own. `commit_mu`
  // (held by the caller) identifies the model: NotFound if it was deleted
  // since, even if created again.
  absl::Status Advance(const std::shared_ptr<absl::Mutex>& commit_mu,
                       const Snapshot& next);
  // Removes `name` and returns its current version, or NotFound. With
  // `remember`, the name's last version is remembered (lineage().deleted) as
  // the later of its current version and `deleted_at`.
  absl::StatusOr<Snapshot> Remove(const std::string& name,
                                  int64_t deleted_at = 0, bool remember = true);

  // The epoch and the deleted names not held now.
  Lineage lineage() const;
  uint64_t epoch() const;
  // Replaces the lineage; deleted names that are held are left out.
  void SetLineage(Lineage lineage);
  // The version `name` had when it was deleted; 0 if it is held or none is
  // remembered.
  int64_t DeletedVersion(const std::string& name) const;
  // Remembers that `name` was deleted at `version` unless it is held or a
  // later deletion is remembered. Returns whether anything changed.
  bool RecordDeletion(const std::string& name, int64_t version);

 private:
  struct Entry {
    Snapshot current;
    std::deque<Snapshot> history;  // Older retained versions, newest first.
    // Serialises commits of this model, including their persisting; readers
    // never take it.
    std::shared_ptr<absl::Mutex> commit_mu = std::make_shared<absl::Mutex>();
  };

  // Version `version` (0: current) of a model's entry, or NotFound.
  static absl::StatusOr<Snapshot> FindVersion(const Entry& entry,
                                              int64_t version);

  const int retain_versions_;
  mutable absl::Mutex mu_;
  std::map<std::string, Entry> models_ ABSL_GUARDED_BY(mu_);
  Lineage lineage_ ABSL_GUARDED_BY(mu_);
};

// Returns OK for a model name of 1 to 128 characters from [A-Za-z0-9._-] that
// does not start with '.'; InvalidArgument otherwise.
absl::Status ValidateModelName(absl::string_view name);

// NotFound naming model `name`.
absl::Status ModelNotFound(const std::string& name);

// InvalidArgument for a model of `modules` modules, more than kMaxModules.
absl::Status TooManyModules(int64_t modules);

}  // namespace modelstate

#endif  // MODELSTATE_STORE_CATALOG_H_

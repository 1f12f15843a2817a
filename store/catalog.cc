#include "store/catalog.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/limits.h"

namespace modelstate {

absl::Status ValidateModelName(absl::string_view name) {
  if (name.empty() || name.size() > kMaxModelNameLength) {
    return absl::InvalidArgumentError(absl::StrCat(
        "model name must have 1 to ", kMaxModelNameLength, " characters"));
  }
  if (name[0] == '.')
    return absl::InvalidArgumentError("model name must not start with '.'");
  for (char c : name) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
                    (c >= '0' && c <= '9') || c == '.' || c == '_' || c == '-';
    if (!ok) {
      return absl::InvalidArgumentError(
          absl::StrCat("model name \"", name,
                       "\" may only use letters, digits, '.', '_' and '-'"));
    }
  }
  return absl::OkStatus();
}

absl::Status ModelNotFound(const std::string& name) {
  return absl::NotFoundError(absl::StrCat("model \"", name, "\" not found"));
}

absl::Status TooManyModules(int64_t modules) {
  return absl::InvalidArgumentError(
      absl::StrCat("the model would have ", modules,
                   " modules, more than kMaxModules (", kMaxModules, ")"));
}

absl::StatusOr<Snapshot> Catalog::FindVersion(const Entry& entry,
                                              int64_t version) {
  if (version == 0 || version == entry.current.version) return entry.current;
  for (const Snapshot& old : entry.history) {
    if (old.version == version) return old;
  }
  return absl::NotFoundError(absl::StrCat("version ", version, " of model \"",
                                          entry.current.model,
                                          "\" is not retained"));
}

absl::StatusOr<Snapshot> Catalog::GetSnapshot(const std::string& name,
                                              int64_t version) const {
  absl::ReaderMutexLock lock(&mu_);
  auto it = models_.find(name);
  if (it == models_.end()) return ModelNotFound(name);
  return FindVersion(it->second, version);
}

absl::StatusOr<Snapshot> Catalog::GetSnapshotAndVersions(
    const std::string& name, int64_t version,
    std::vector<int64_t>* retained) const {
  absl::ReaderMutexLock lock(&mu_);
  auto it = models_.find(name);
  if (it == models_.end()) return ModelNotFound(name);
  absl::StatusOr<Snapshot> snapshot = FindVersion(it->second, version);
  if (!snapshot.ok()) return snapshot;
  retained->assign({it->second.current.version});
  for (const Snapshot& old : it->second.history)
    retained->push_back(old.version);
  return snapshot;
}

absl::StatusOr<std::vector<int64_t>> Catalog::RetainedVersions(
    const std::string& name) const {
  std::vector<int64_t> versions;
  absl::StatusOr<Snapshot> current =
      GetSnapshotAndVersions(name, /*version=*/0, &versions);
  if (!current.ok()) return current.status();
  return versions;
}

std::vector<Snapshot> Catalog::List() const {
  absl::ReaderMutexLock lock(&mu_);
  std::vector<Snapshot> out;
  out.reserve(models_.size());
  for (const auto& [name, entry] : models_) out.push_back(entry.current);
  return out;
}

absl::StatusOr<std::shared_ptr<absl::Mutex>> Catalog::CommitMutex(
    const std::string& name) const {
  absl::ReaderMutexLock lock(&mu_);
  auto it = models_.find(name);
  if (it == models_.end()) return ModelNotFound(name);
  return it->second.commit_mu;
}

absl::StatusOr<int64_t> Catalog::VersionForNew(const std::string& name,
                                               int64_t version) const {
  absl::ReaderMutexLock lock(&mu_);
  if (models_.count(name) > 0) {
    return absl::AlreadyExistsError(
        absl::StrCat("model \"", name, "\" already exists"));
  }
  if (version > 0) return version;
  auto deleted = lineage_.deleted.find(name);
  return deleted == lineage_.deleted.end() ? 1 : deleted->second + 1;
}

void Catalog::Insert(Snapshot snapshot) {
  absl::MutexLock lock(&mu_);
  std::string name = snapshot.model;
  lineage_.deleted.erase(name);
  models_[std::move(name)].current = std::move(snapshot);
}

absl::Status Catalog::Advance(const std::shared_ptr<absl::Mutex>& commit_mu,
                              const Snapshot& next) {
  absl::MutexLock lock(&mu_);
  auto it = models_.find(next.model);
  if (it == models_.end() || it->second.commit_mu != commit_mu) {
    return absl::NotFoundError(absl::StrCat(
        "model \"", next.model, "\" was deleted during the update"));
  }
  Entry& entry = it->second;
  if (retain_versions_ > 1) {
    entry.history.push_front(std::move(entry.current));
    while (entry.history.size() > static_cast<size_t>(retain_versions_ - 1)) {
      entry.history.pop_back();
    }
  }
  entry.current = next;
  entry.current.memo = std::make_shared<StateDictMemo>();
  return absl::OkStatus();
}

absl::StatusOr<Snapshot> Catalog::Remove(const std::string& name,
                                         int64_t deleted_at, bool remember) {
  absl::MutexLock lock(&mu_);
  auto it = models_.find(name);
  if (it == models_.end()) return ModelNotFound(name);
  Snapshot removed = std::move(it->second.current);
  if (remember) lineage_.deleted[name] = std::max(removed.version, deleted_at);
  models_.erase(it);
  return removed;
}

Lineage Catalog::lineage() const {
  absl::ReaderMutexLock lock(&mu_);
  return lineage_;
}

uint64_t Catalog::epoch() const {
  absl::ReaderMutexLock lock(&mu_);
  return lineage_.epoch;
}

void Catalog::SetLineage(Lineage lineage) {
  absl::MutexLock lock(&mu_);
  for (const auto& [name, entry] : models_) lineage.deleted.erase(name);
  lineage_ = std::move(lineage);
}

int64_t Catalog::DeletedVersion(const std::string& name) const {
  absl::ReaderMutexLock lock(&mu_);
  auto deleted = lineage_.deleted.find(name);
  return deleted == lineage_.deleted.end() ? 0 : deleted->second;
}

bool Catalog::RecordDeletion(const std::string& name, int64_t version) {
  absl::MutexLock lock(&mu_);
  if (models_.count(name) > 0) return false;
  int64_t& known = lineage_.deleted[name];
  if (known >= version) return false;
  known = version;
  return true;
}

}  // namespace modelstate

#include "store/data_dir.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/strip.h"
#include "common/file_util.h"
#include "common/status_macros.h"
#include "model/module_factory.h"
#include "model/safetensors.h"
#include "nlohmann/json.hpp"

namespace modelstate {
namespace {

using Json = nlohmann::ordered_json;

constexpr char kManifestSuffix[] = ".manifest.json";
// Present once a daemon with an access policy has used the directory. Model
// names never start with '.', so it cannot be a model's.
constexpr char kAccessPolicyMarker[] = ".written-under-auth-policy";
// The lineage record (store/lineage.h); not a model's name either.
constexpr char kLineageFile[] = ".lineage.json";
constexpr char kLineageFormat[] = "modelstate-lineage-v1";
constexpr char kDataSuffix[] = ".safetensors";
constexpr char kTempPrefix[] = ".tmp-";
constexpr char kManifestFormat[] = "modelstate-manifest-v1";

absl::Status MakeDir(const std::string& path) {
  if (mkdir(path.c_str(), 0755) == 0 || errno == EEXIST)
    return absl::OkStatus();
  return ErrnoToStatus(errno, "cannot create directory", path);
}

absl::Status SyncDir(const std::string& path) {
  const int fd = open(path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return ErrnoToStatus(errno, "cannot open directory", path);
  const int rc = fsync(fd);
  const int err = errno;
  close(fd);
  return rc == 0 ? absl::OkStatus()
                 : ErrnoToStatus(err, "cannot sync directory", path);
}

std::vector<std::string> ListDir(const std::string& path) {
  std::vector<std::string> names;
  DIR* dir = opendir(path.c_str());
  if (dir == nullptr) return names;
  while (struct dirent* entry = readdir(dir)) {
    std::string name = entry->d_name;
    if (name != "." && name != "..") names.push_back(std::move(name));
  }
  closedir(dir);
  std::sort(names.begin(), names.end());
  return names;
}

bool IsDirectory(const std::string& path) {
  struct stat info;
  return stat(path.c_str(), &info) == 0 && S_ISDIR(info.st_mode);
}

std::string VersionName(int64_t version) {
  return absl::StrFormat("%020d", version);
}

// Parses "<20 digits><suffix>"; returns the version or nothing.
absl::optional<int64_t> ParseVersionFile(absl::string_view name,
                                         absl::string_view suffix) {
  if (!absl::ConsumeSuffix(&name, suffix) || name.size() != 20)
    return absl::nullopt;
  int64_t version;
  if (!absl::SimpleAtoi(name, &version) || version <= 0) return absl::nullopt;
  return version;
}

// The manifest of a persisted version. A tensor held under several keys
// (tied parameters) names its first key as "shared_with", so that it is held
// once again when read back; the safetensors file has it under every key.
Json ManifestOf(const Snapshot& snapshot, const StateDict& state) {
  Json tensors = Json::array();
  const std::vector<int64_t> shared = SharedEntries(state);
  for (size_t i = 0; i < state.size(); ++i) {
    const StateDict::Entry& entry = state.entries()[i];
    tensors.push_back(
        {{"name", entry.key},
         {"kind", entry.kind == TensorKind::kBuffer ? "buffer" : "parameter"},
         {"dtype", std::string(SafetensorsName(entry.tensor.dtype()))},
         {"shape", entry.tensor.shape()},
         {"xxh3", absl::StrFormat("%016x", entry.tensor.Checksum())}});
    if (shared[i] >= 0)
      tensors.back()["shared_with"] = state.entries()[shared[i]].key;
  }
  return Json{{"format", kManifestFormat},
              {"model", snapshot.model},
              {"version", snapshot.version},
              {"architecture", snapshot.architecture},
              {"root_class", snapshot.root->type_name()},
              {"tensors", std::move(tensors)}};
}

// Whether `json` is an object whose `key` is the string `value` (nlohmann's
// value() throws for a field of another type).
bool HasString(const Json& json, const char* key, absl::string_view value) {
  return json.is_object() && json.contains(key) && json[key].is_string() &&
         json[key].get<std::string>() == value;
}

// Reads the manifest of version `version` of `model` at `base` (the version's
// path without suffix). DataLoss unless it is a modelstate manifest of that
// version.
absl::StatusOr<Json> ReadManifest(const std::string& base,
                                  const std::string& model, int64_t version) {
  ASSIGN_OR_RETURN(std::string text, ReadFileToString(base + kManifestSuffix));
  Json manifest = Json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (manifest.is_discarded() ||
      !HasString(manifest, "format", kManifestFormat) ||
      !manifest.contains("tensors") || !manifest["tensors"].is_array() ||
      !manifest.contains("version") ||
      !manifest["version"].is_number_integer() ||
      !manifest.contains("architecture") ||
      !manifest["architecture"].is_string()) {
    return absl::DataLossError(
        absl::StrCat(base, kManifestSuffix, ": not a modelstate manifest"));
  }
  if (!HasString(manifest, "model", model) ||
      manifest["version"].get<int64_t>() != version) {
    return absl::DataLossError(absl::StrCat(
        base, kManifestSuffix, ": names another model or version"));
  }
  return manifest;
}

// Checks `tensor` against its manifest entry `info`: dtype, shape, checksum.
absl::Status CheckAgainstManifest(const std::string& base,
                                  const std::string& name, const Json& info,
                                  const Tensor& tensor) {
  uint64_t checksum = 0;
  if (!info.contains("xxh3") || !info["xxh3"].is_string() ||
      !absl::SimpleHexAtoi(info["xxh3"].get<std::string>(), &checksum) ||
      !HasString(info, "dtype", SafetensorsName(tensor.dtype())) ||
      !info.contains("shape") || !info["shape"].is_array() ||
      info["shape"].get<Shape>() != tensor.shape()) {
    return absl::DataLossError(absl::StrCat(base, kDataSuffix, ": tensor \"",
                                            name,
                                            "\" differs from its manifest"));
  }
  if (tensor.Checksum() != checksum) {
    return absl::DataLossError(absl::StrCat(
        base, kDataSuffix, ": checksum mismatch for tensor \"", name, "\""));
  }
  return absl::OkStatus();
}

// The tensor to hold for manifest entry `info` (whose file tensor,
// `tensor`, passed its checks): the earlier entry it names as "shared_with",
// or `tensor`. DataLoss when that entry is missing or holds other bytes.
absl::StatusOr<const Tensor*> SharedSource(const std::string& base,
                                           const Json& info,
                                           const StateDict& earlier,
                                           const Tensor* tensor) {
  if (!info.contains("shared_with")) return tensor;
  const Tensor* source =
      info["shared_with"].is_string()
          ? earlier.Find(info["shared_with"].get<std::string>())
          : nullptr;
  if (source == nullptr || !source->BitwiseEquals(*tensor)) {
    return absl::DataLossError(absl::StrCat(
        base, kManifestSuffix, ": tensor \"", info["name"].get<std::string>(),
        "\" is shared with a tensor it does not equal"));
  }
  return source;
}

// The tensors of `file`, checked against the manifest's `tensors` and in its
// order (the state dict's), with the keys of buffers added to `buffer_keys`.
absl::StatusOr<StateDict> TensorsInManifestOrder(
    const std::string& base, const Json& tensors, const SafetensorsFile& file,
    std::vector<std::string>* buffer_keys) {
  if (tensors.size() != file.tensors.size()) {
    return absl::DataLossError(
        absl::StrCat(base, kDataSuffix, ": holds ", file.tensors.size(),
                     " tensors, the manifest lists ", tensors.size()));
  }
  StateDict ordered;
  for (const Json& info : tensors) {
    if (!info.is_object() || !info.contains("name") ||
        !info["name"].is_string()) {
      return absl::DataLossError(
          absl::StrCat(base, kManifestSuffix, ": bad tensor entry"));
    }
    const std::string name = info["name"].get<std::string>();
    const Tensor* tensor = file.tensors.Find(name);
    if (tensor == nullptr) {
      return absl::DataLossError(
          absl::StrCat(base, kDataSuffix, ": tensor \"", name, "\" missing"));
    }
    RETURN_IF_ERROR(CheckAgainstManifest(base, name, info, *tensor));
    ASSIGN_OR_RETURN(tensor, SharedSource(base, info, ordered, tensor));
    const TensorKind kind = HasString(info, "kind", "buffer")
                                ? TensorKind::kBuffer
                                : TensorKind::kParameter;
    if (kind == TensorKind::kBuffer) buffer_keys->push_back(name);
    ordered.Set(name, *tensor, kind);
  }
  return ordered;
}

// The module tree of a persisted state: built from `architecture` when it has
// one, else from the keys.
absl::StatusOr<ModulePtr> RebuildTree(const std::string& architecture,
                                      const StateDict& ordered,
                                      const std::vector<std::string>& buffers) {
  if (architecture.empty()) return BuildModuleFromStateDict(ordered, buffers);
  ASSIGN_OR_RETURN(ModulePtr built, BuildModuleFromSpec(architecture));
  LoadOptions exact;
  exact.assign = true;  // Keep the persisted tensors (and dtypes) as they
                        // are, unconverted.
  ASSIGN_OR_RETURN(LoadResult loaded, LoadStateDict(built, ordered, exact));
  return std::move(loaded.model);
}

// Rebuilds one persisted version, checking everything against its manifest.
absl::StatusOr<Snapshot> ReadVersion(const std::string& dir,
                                     const std::string& model,
                                     int64_t version) {
  const std::string base = dir + "/" + VersionName(version);
  ASSIGN_OR_RETURN(const Json manifest, ReadManifest(base, model, version));
  ASSIGN_OR_RETURN(SafetensorsFile file,
                   ReadSafetensorsFile(base + kDataSuffix));
  std::vector<std::string> buffer_keys;
  ASSIGN_OR_RETURN(
      StateDict ordered,
      TensorsInManifestOrder(base, manifest["tensors"], file, &buffer_keys));
  const std::string architecture = manifest["architecture"].get<std::string>();
  ASSIGN_OR_RETURN(ModulePtr root,
                   RebuildTree(architecture, ordered, buffer_keys));
  return Snapshot{model, version, std::move(root), architecture,
                  /*memo=*/nullptr};
}

std::string LineageText(const Lineage& lineage) {
  Json deleted = Json::object();
  for (const auto& [model, version] : lineage.deleted) deleted[model] = version;
  return Json{{"format", kLineageFormat},
              {"epoch", EpochName(lineage.epoch)},
              {"adopting", lineage.adopting},
              {"deleted", std::move(deleted)}}
             .dump(1) +
         "\n";
}

// The lineage of `text` (LineageText's); DataLoss if it is not one.
absl::StatusOr<Lineage> ParseLineage(const std::string& path,
                                     const std::string& text) {
  const Json json = Json::parse(text, nullptr, /*allow_exceptions=*/false);
  Lineage lineage;
  const bool shaped =
      !json.is_discarded() && HasString(json, "format", kLineageFormat) &&
      json.contains("epoch") && json["epoch"].is_string() &&
      absl::SimpleHexAtoi(json["epoch"].get<std::string>(), &lineage.epoch) &&
      json.contains("adopting") && json["adopting"].is_boolean() &&
      json.contains("deleted") && json["deleted"].is_object();
  if (!shaped) {
    return absl::DataLossError(
        absl::StrCat(path, ": not a modelstate lineage record"));
  }
  lineage.adopting = json["adopting"].get<bool>();
  for (const auto& [model, version] : json["deleted"].items()) {
    if (!ValidateModelName(model).ok() || !version.is_number_integer() ||
        version.get<int64_t>() <= 0) {
      return absl::DataLossError(
          absl::StrCat(path, ": bad deletion entry \"", model, "\""));
    }
    lineage.deleted[model] = version.get<int64_t>();
  }
  return lineage;
}

// The lineage kept at `dir`: none (epoch 0) without a record; a record that
// does not parse is reported to `problems` and read as none.
Lineage ReadLineage(const std::string& dir,
                    std::vector<std::string>* problems) {
  const std::string path = dir + "/" + kLineageFile;
  struct stat info;
  if (stat(path.c_str(), &info) != 0) return Lineage{};
  absl::StatusOr<std::string> text = ReadFileToString(path);
  absl::StatusOr<Lineage> lineage =
      text.ok() ? ParseLineage(path, *text) : text.status();
  if (lineage.ok()) return *std::move(lineage);
  problems->push_back(absl::StrCat(lineage.status().message(),
                                   "; read as no lineage (a new epoch for a "
                                   "primary)"));
  return Lineage{};
}

}  // namespace

absl::StatusOr<std::unique_ptr<DataDir>> DataDir::Open(const std::string& path,
                                                       DataDirOptions options) {
  if (path.empty())
    return absl::InvalidArgumentError("empty data directory path");
  RETURN_IF_ERROR(MakeDir(path));
  if (!IsDirectory(path))
    return absl::InvalidArgumentError(
        absl::StrCat(path, " is not a directory"));
  if (options.keep_versions < 1) options.keep_versions = 1;
  return std::unique_ptr<DataDir>(new DataDir(path, std::move(options)));
}

absl::Status DataDir::RecordAccessPolicy() {
  if (WrittenUnderAccessPolicy()) return absl::OkStatus();
  return WriteFileAtomically(
      path_, kAccessPolicyMarker,
      [](const std::function<absl::Status(const void*, size_t)>& write) {
        static constexpr char kText[] =
            "models here were written by a daemon with an --auth_policy\n";
        return write(kText, sizeof(kText) - 1);
      });
}

bool DataDir::WrittenUnderAccessPolicy() const {
  struct stat info;
  return stat((path_ + "/" + kAccessPolicyMarker).c_str(), &info) == 0;
}

absl::Status DataDir::WriteFileAtomically(
    const std::string& dir, const std::string& name,
    const std::function<absl::Status(
        const std::function<absl::Status(const void*, size_t)>&)>& produce)
    const {
  static std::atomic<uint64_t> counter{0};
  const std::string temp = absl::StrCat(dir, "/", kTempPrefix, name, ".",
                                        getpid(), ".", counter.fetch_add(1));
  const std::string final_path = dir + "/" + name;
  const int fd =
      open(temp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd < 0) return ErrnoToStatus(errno, "cannot create", temp);
  auto write_all = [&](const void* data, size_t size) {
    return WriteAll(fd, data, size, temp, options_.write);
  };
  absl::Status status = produce(write_all);
  if (status.ok() && fsync(fd) != 0)
    status = ErrnoToStatus(errno, "cannot sync", temp);
  if (close(fd) != 0 && status.ok())
    status = ErrnoToStatus(errno, "cannot close", temp);
  if (status.ok() && rename(temp.c_str(), final_path.c_str()) != 0) {
    status = ErrnoToStatus(errno, "cannot rename", temp);
  }
  if (!status.ok()) {
    unlink(temp.c_str());
    return status;
  }
  return SyncDir(dir);
}

absl::Status DataDir::Persist(const Snapshot& snapshot) {
  RETURN_IF_ERROR(ValidateModelName(snapshot.model));
  const std::string dir = path_ + "/" + snapshot.model;
  RETURN_IF_ERROR(MakeDir(dir));
  ASSIGN_OR_RETURN(StateDict state, GetStateDict(snapshot.root));
  const std::string base = VersionName(snapshot.version);
  const SafetensorsMetadata metadata = {
      {"format", "pt"},
      {"modelstate.model", snapshot.model},
      {"modelstate.version", std::to_string(snapshot.version)}};
  RETURN_IF_ERROR(
      WriteFileAtomically(dir, base + kDataSuffix, [&](const auto& write_all) {
        return WriteSafetensors(state, metadata,
                                [&](absl::Span<const uint8_t> piece) {
                                  return write_all(piece.data(), piece.size());
                                });
      }));
  const std::string manifest = ManifestOf(snapshot, state).dump(1) + "\n";
  absl::Status written = WriteFileAtomically(
      dir, base + kManifestSuffix, [&](const auto& write_all) {
        return write_all(manifest.data(), manifest.size());
      });
  if (!written.ok()) {
    unlink((dir + "/" + base + kDataSuffix).c_str());
    return written;
  }
  // Prune: keep the newest keep_versions complete versions.
  std::vector<int64_t> versions;
  for (const std::string& name : ListDir(dir)) {
    if (absl::optional<int64_t> v = ParseVersionFile(name, kManifestSuffix))
      versions.push_back(*v);
  }
  std::sort(versions.rbegin(), versions.rend());
  for (size_t i = static_cast<size_t>(options_.keep_versions);
       i < versions.size(); ++i) {
    const std::string old = dir + "/" + VersionName(versions[i]);
    unlink((old + kManifestSuffix).c_str());
    unlink((old + kDataSuffix).c_str());
  }
  return absl::OkStatus();
}

absl::Status DataDir::PersistLineage(const Lineage& lineage) {
  const std::string text = LineageText(lineage);
  return WriteFileAtomically(path_, kLineageFile, [&](const auto& write_all) {
    return write_all(text.data(), text.size());
  });
}

absl::Status DataDir::Remove(const std::string& model) {
  RETURN_IF_ERROR(ValidateModelName(model));
  const std::string dir = path_ + "/" + model;
  if (!IsDirectory(dir)) return absl::OkStatus();
  for (const std::string& name : ListDir(dir)) {
    const std::string file = dir + "/" + name;
    if (unlink(file.c_str()) != 0 && errno != ENOENT)
      return ErrnoToStatus(errno, "cannot remove", file);
  }
  if (rmdir(dir.c_str()) != 0 && errno != ENOENT)
    return ErrnoToStatus(errno, "cannot remove", dir);
  return SyncDir(path_);
}

RestoreReport DataDir::Restore() const {
  RestoreReport report;
  report.lineage = ReadLineage(path_, &report.problems);
  for (const std::string& model : ListDir(path_)) {
    if (model == kAccessPolicyMarker || model == kLineageFile) continue;
    const std::string dir = path_ + "/" + model;
    if (absl::StartsWith(model, kTempPrefix)) {
      unlink(dir.c_str());  // An interrupted write of a record here.
      continue;
    }
    if (!IsDirectory(dir) || !ValidateModelName(model).ok()) {
      report.problems.push_back(
          absl::StrCat(dir, ": not a model directory; left alone"));
      continue;
    }
    std::vector<int64_t> versions;
    for (const std::string& name : ListDir(dir)) {
      const std::string file = dir + "/" + name;
      if (absl::StartsWith(name, kTempPrefix)) {
        unlink(file.c_str());  // An interrupted write; never part of a durable
                               // version.
        continue;
      }
      if (absl::optional<int64_t> v = ParseVersionFile(name, kManifestSuffix)) {
        versions.push_back(*v);
      } else if (!ParseVersionFile(name, kDataSuffix).has_value()) {
        report.problems.push_back(
            absl::StrCat(file, ": unrelated file; left alone"));
      }
    }
    std::sort(versions.rbegin(), versions.rend());
    bool restored = false;
    for (int64_t version : versions) {
      absl::StatusOr<Snapshot> snapshot = ReadVersion(dir, model, version);
      if (snapshot.ok()) {
        report.models.push_back(RestoredModel{*std::move(snapshot)});
        restored = true;
        break;
      }
      report.problems.push_back(
          absl::StrCat("model ", model, " version ", version,
                       " skipped: ", snapshot.status().message()));
    }
    if (!restored && !versions.empty()) {
      report.problems.push_back(
          absl::StrCat("model ", model, ": no version verifies"));
    }
  }
  return report;
}

AsyncPersister::AsyncPersister(StatePersister* target)
    : target_(target), writer_([this] { Run(); }) {}

AsyncPersister::~AsyncPersister() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  writer_.join();
}

absl::Status AsyncPersister::Persist(const Snapshot& snapshot) {
  absl::MutexLock lock(&mu_);
  pending_[snapshot.model] =
      snapshot;  // Supersedes any version not yet written.
  return absl::OkStatus();
}

absl::Status AsyncPersister::Remove(const std::string& model) {
  absl::MutexLock lock(&mu_);
  pending_[model] = absl::nullopt;
  return absl::OkStatus();
}

absl::Status AsyncPersister::PersistLineage(const Lineage& lineage) {
  absl::MutexLock lock(&mu_);
  pending_lineage_ = lineage;
  return absl::OkStatus();
}

void AsyncPersister::Flush() {
  absl::MutexLock lock(&mu_);
  mu_.Await(absl::Condition(
      +[](AsyncPersister* self) ABSL_NO_THREAD_SAFETY_ANALYSIS {
        return self->pending_.empty() && !self->pending_lineage_ &&
               !self->busy_;
      },
      this));
}

void AsyncPersister::Run() {
  while (true) {
    std::string model;
    absl::optional<Snapshot> work;
    absl::optional<Lineage> lineage;
    {
      absl::MutexLock lock(&mu_);
      mu_.Await(absl::Condition(
          +[](AsyncPersister* self) ABSL_NO_THREAD_SAFETY_ANALYSIS {
            return !self->pending_.empty() || self->pending_lineage_ ||
                   self->stopping_;
          },
          this));
      if (pending_.empty() && !pending_lineage_) return;  // Stopping, done.
      if (!pending_.empty()) {
        auto next = pending_.begin();
        model = next->first;
        work = std::move(next->second);
        pending_.erase(next);
      } else {
        // After the models: a deletion it remembers follows its removal.
        lineage = std::move(pending_lineage_);
        pending_lineage_.reset();
        model = "the lineage record";
      }
      busy_ = true;
    }
    absl::Status status = lineage ? target_->PersistLineage(*lineage)
                          : work  ? target_->Persist(*work)
                                  : target_->Remove(model);
    if (status.ok()) {
      ++written_;
    } else {
      ++failures_;
      std::fprintf(stderr, "modelstated: async persist of %s failed: %s\n",
                   model.c_str(), status.ToString().c_str());
    }
    absl::MutexLock lock(&mu_);
    busy_ = false;
  }
}

}  // namespace modelstate

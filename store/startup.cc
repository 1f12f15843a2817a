#include "store/startup.h"

#include <set>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "store/model_files.h"

namespace modelstate {
namespace {

// Adds `model` (or its error) as `name`, naming the model in any error.
absl::Status AddSeed(const std::string& name,
                     absl::StatusOr<ModelFromFile> model, ModelStore* store) {
  absl::Status status = model.status();
  if (status.ok())
    status = store->Create(name, model->root, model->architecture);
  if (status.ok()) return status;
  return absl::Status(status.code(),
                      absl::StrCat("preload ", name, ": ", status.message()));
}

}  // namespace

absl::Status PopulateStore(const StartupModels& models, DataDir* data_dir,
                           ModelStore* store, std::vector<std::string>* notes) {
  std::set<std::string> restored;
  if (data_dir != nullptr) {
    RestoreReport report = data_dir->Restore();
    for (const std::string& problem : report.problems)
      notes->push_back(absl::StrCat("restore: ", problem));
    store->RestoreLineage(report.lineage);
    for (RestoredModel& model : report.models) {
      const Snapshot& snapshot = model.snapshot;
      RETURN_IF_ERROR(store->Restore(snapshot.model, snapshot.root,
                                     snapshot.architecture, snapshot.version));
      notes->push_back(absl::StrCat("restored ", snapshot.model, " at version ",
                                    snapshot.version));
      restored.insert(snapshot.model);
    }
  }
  if (!models.demo_model.empty() && restored.count(models.demo_model) == 0) {
    ASSIGN_OR_RETURN(ModulePtr demo, BuildModuleFromSpec(kDemoArchitecture));
    RETURN_IF_ERROR(store->Create(models.demo_model, demo, kDemoArchitecture));
  }
  for (const auto& [name, path] : models.preload) {
    if (restored.count(name) > 0) continue;
    RETURN_IF_ERROR(AddSeed(name, LoadModelFile(path), store));
  }
  return absl::OkStatus();
}

absl::Status EstablishPrimaryEpoch(bool new_epoch, ModelStore* store,
                                   std::vector<std::string>* notes) {
  const uint64_t kept = store->epoch();
  if (kept != 0 && !new_epoch) {
    notes->push_back(absl::StrCat("epoch ", EpochName(kept)));
    return absl::OkStatus();
  }
  const uint64_t epoch = NewEpoch();
  RETURN_IF_ERROR(store->RecordEpoch(epoch));
  notes->push_back(absl::StrCat(
      "epoch ", EpochName(epoch), " (new: ",
      new_epoch ? absl::StrCat("--new_epoch; it was ", EpochName(kept))
                : "no lineage record; followers of an earlier epoch keep "
                  "theirs until told to adopt this one",
      ")"));
  return absl::OkStatus();
}

}  // namespace modelstate

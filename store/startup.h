// What a daemon's store holds when it starts serving: what its data directory
// restores, then the demo and preloaded models.
#ifndef MODELSTATE_STORE_STARTUP_H_
#define MODELSTATE_STORE_STARTUP_H_

#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "store/data_dir.h"
#include "store/model_store.h"

namespace modelstate {

// What a daemon puts in its store when it starts, besides what its data
// directory restores.
struct StartupModels {
  // Name of the built-in demo model; empty for none.
  std::string demo_model;
  // name -> .safetensors or architecture .json path.
  std::vector<std::pair<std::string, std::string>> preload;
};

// Fills `store` at start: first the lineage and every model `data_dir`
// restores (when set), then the demo and the preloads of `models` that were
// not restored (the persisted state wins over the seed). Appends one line per
// restored model and per damaged file skipped to `notes`. Returns the first
// preload's or create's error, prefixed with the model's name.
absl::Status PopulateStore(const StartupModels& models, DataDir* data_dir,
                           ModelStore* store, std::vector<std::string>* notes);

// A primary's epoch (store/lineage.h), once PopulateStore ran: the one its data
// dir kept, or a new one when it kept none (no data dir, an empty one, or one
// from before epochs) or when `new_epoch` asks for it. Appends a line naming
// the epoch and why to `notes`. Returns the persister's error.
absl::Status EstablishPrimaryEpoch(bool new_epoch, ModelStore* store,
                                   std::vector<std::string>* notes);

}  // namespace modelstate

#endif  // MODELSTATE_STORE_STARTUP_H_

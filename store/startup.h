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

// Fills `store` at start: first every model `data_dir` restores (when set),
// then the demo and the preloads of `models` that were not restored (the
// persisted state wins over the seed). Appends one line per restored model
// and per damaged file skipped to `notes`. Returns the first preload's or
// create's error, prefixed with the model's name.
absl::Status PopulateStore(const StartupModels& models, DataDir* data_dir,
                           ModelStore* store, std::vector<std::string>* notes);

}  // namespace modelstate

#endif  // MODELSTATE_STORE_STARTUP_H_

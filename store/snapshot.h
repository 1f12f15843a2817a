// A point-in-time view of one model version, as the store hands it out.
//
// Thread-safety: a Snapshot is a value; its tree is immutable and its memo is
// thread-safe (store/state_dict_memo.h).
#ifndef MODELSTATE_STORE_SNAPSHOT_H_
#define MODELSTATE_STORE_SNAPSHOT_H_

#include <cstdint>
#include <memory>
#include <string>

#include "model/module.h"
#include "store/state_dict_memo.h"

namespace modelstate {

// An immutable point-in-time view of a model. It shares storage with the model
// and is never changed by later loads.
struct Snapshot {
  std::string model;
  int64_t version = 0;
  ModulePtr root;
  // The architecture spec the model was created from; empty for models made
  // from a checkpoint.
  std::string architecture;
  // The whole state dict that every fetch of this version shares, once built.
  // The store gives each version it holds a memo of its own.
  std::shared_ptr<StateDictMemo> memo;
};

}  // namespace modelstate

#endif  // MODELSTATE_STORE_SNAPSHOT_H_

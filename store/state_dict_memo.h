// One model version's whole state dict, built by the first fetch that needs it
// and shared by every later fetch of that version. A version's module tree is
// immutable, so the memo never goes stale; it lives as long as the version's
// snapshots (each of which holds the tree too).
// For a model of many small tensors, walking the tree and building the entries
// and their keys costs a fetch as much as sending the bytes does
// (docs/performance.md, P5).
#ifndef MODELSTATE_STORE_STATE_DICT_MEMO_H_
#define MODELSTATE_STORE_STATE_DICT_MEMO_H_

#include <cstdint>
#include <functional>
#include <memory>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "model/module.h"
#include "model/state_dict.h"
#include "model/tensor.h"

namespace modelstate {

// Thread-safe.
class StateDictMemo {
 public:
  // Charges `charge` with `metadata_bytes` when they fit the memory limit and
  // returns true, or returns false and charges nothing.
  using ChargeIfFits =
      std::function<bool(const MemoryCharge& charge, int64_t metadata_bytes)>;

  // Returns GetStateDict(root), kept once `charge_if_fits` accepts its size
  // (StateDict::HeapBytes and the object itself). The charge lasts as long as
  // the state dict does, in the memo or in a fetch still sending it.
  // Concurrent first callers wait for one build rather than each making their
  // own; once a build did not fit, each caller builds its own without waiting
  // (and the next that fits is kept). GetStateDict's errors.
  absl::StatusOr<std::shared_ptr<const StateDict>> Get(
      const ModulePtr& root, const ChargeIfFits& charge_if_fits);

  // True once a state dict is kept.
  bool kept() const;

 private:
  // A state dict and the charge for its heap, which go together.
  struct Charged {
    StateDict state;
    MemoryCharge charge;
  };

  static absl::StatusOr<std::shared_ptr<Charged>> Build(const ModulePtr& root);
  // Keeps `charged` if nothing is kept yet and it fits; returns its state dict
  // either way.
  std::shared_ptr<const StateDict> Offer(std::shared_ptr<Charged> charged,
                                         const ChargeIfFits& charge_if_fits)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  mutable absl::Mutex mu_;
  std::shared_ptr<const StateDict> kept_ ABSL_GUARDED_BY(mu_);
  // A build did not fit the memory limit: builds no longer hold the lock.
  bool declined_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace modelstate

#endif  // MODELSTATE_STORE_STATE_DICT_MEMO_H_

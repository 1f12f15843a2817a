// Reads of the store's models: state dicts (whole, selected or cast),
// manifests and summaries, from the catalog's snapshots without holding any
// lock of the store while they are built.
//
// Thread-safety: every method may be called from any thread.
#ifndef MODELSTATE_STORE_STATE_READER_H_
#define MODELSTATE_STORE_STATE_READER_H_

#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "model/cast_cache.h"
#include "model/state_dict.h"
#include "store/catalog.h"
#include "store/requests.h"
#include "store/snapshot.h"
#include "store/store_memory.h"

namespace modelstate {

class StateReader {
 public:
  // Every argument must outlive this. Conversions kept in `cast_cache` are
  // charged to `memory`.
  StateReader(const Catalog& catalog, StoreMemory& memory,
              CastCache& cast_cache);
  StateReader(const StateReader&) = delete;
  StateReader& operator=(const StateReader&) = delete;

  // See ModelStore::Fetch, Describe, Summaries and CastFloatingForFetch.
  absl::StatusOr<FetchPlan> Fetch(const FetchRequest& request);
  absl::StatusOr<ModelManifest> Describe(const FetchRequest& request) const;
  std::vector<ModelSummary> Summaries() const;
  absl::StatusOr<StateDict> CastFloatingForFetch(const StateDict& state,
                                                 DType dtype);

 private:
  // `state` with each floating tensor cast to its key's entry of
  // `request.key_dtypes`, else to `request.dtype` when set. InvalidArgument
  // for a key `state` lacks or a cast that is not floating to floating.
  absl::StatusOr<StateDict> CastForFetch(const StateDict& state,
                                         const FetchRequest& request);
  // `tensor` as `dtype`, through the cast cache.
  absl::StatusOr<Tensor> CastTensor(const Tensor& tensor, DType dtype);

  // The state dict `options` select from `snapshot`: its memo's when they
  // select the whole model, else built for the request.
  absl::StatusOr<std::shared_ptr<const StateDict>> SelectState(
      const Snapshot& snapshot, const StateDictOptions& options) const;

  const Catalog& catalog_;
  StoreMemory& memory_;
  CastCache& cast_cache_;
};

// A model's summary: its root class, and the tensor count and bytes of its
// full state dict.
ModelSummary Summarize(const Snapshot& snapshot);

}  // namespace modelstate

#endif  // MODELSTATE_STORE_STATE_READER_H_

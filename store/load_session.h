// Load sessions: a load is validated and its memory reserved from its
// manifest alone (BeginLoad), then its tensors arrive and it commits as one
// atomic step (CommitLoad), or it is dropped and changes nothing.
//
// Thread-safety: LoadSessions' methods may be called from any thread; a
// PendingLoad belongs to one thread at a time. Conversions and tree rebuilds
// run before any lock of the store is taken, so no reader waits for them.
#ifndef MODELSTATE_STORE_LOAD_SESSION_H_
#define MODELSTATE_STORE_LOAD_SESSION_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "model/state_dict.h"
#include "store/catalog.h"
#include "store/catalog_writer.h"
#include "store/requests.h"
#include "store/snapshot.h"
#include "store/store_memory.h"

namespace modelstate {

// A load that passed validation and holds its memory reservation. Receive the
// tensors `inputs()` describes, then hand them with it to
// ModelStore::CommitLoad. Destroying it without committing aborts the load,
// releases the reservation and leaves the model unchanged.
class PendingLoad {
 public:
  ~PendingLoad();
  PendingLoad(const PendingLoad&) = delete;
  PendingLoad& operator=(const PendingLoad&) = delete;

  const std::string& model() const { return request_.model; }
  const std::vector<TensorSpec>& inputs() const { return inputs_; }
  // Missing and unexpected keys as torch reports them (also when the load is
  // not strict).
  const LoadPlan& plan() const { return plan_; }
  bool creates_model() const { return creates_model_; }
  int64_t base_version() const { return base_.version; }
  // Bytes reserved against the store's memory limit until commit or abort.
  int64_t reserved_bytes() const { return reserved_bytes_; }

 private:
  friend class LoadSessions;
  PendingLoad() = default;

  // Gives the reservation back early, once the load's memory is counted as
  // live instead.
  void ReleaseReservation();

  StoreMemory* memory_ = nullptr;
  std::vector<TensorSpec> inputs_;
  LoadRequest request_;
  LoadPlan plan_;
  Snapshot base_;
  bool creates_model_ = false;
  int64_t reserved_bytes_ = 0;
};

// Begins and commits loads (ModelStore::BeginLoad and CommitLoad).
class LoadSessions {
 public:
  // Every argument must outlive this and the loads it begins.
  // `max_pending_loads` as ModelStore::Options::max_pending_loads.
  LoadSessions(const Catalog& catalog, CatalogWriter& writer,
               StoreMemory& memory, int max_pending_loads);
  LoadSessions(const LoadSessions&) = delete;
  LoadSessions& operator=(const LoadSessions&) = delete;

  // As ModelStore::BeginLoad, without the follower-mode check.
  absl::StatusOr<std::unique_ptr<PendingLoad>> Begin(
      const LoadRequest& request, std::vector<TensorSpec> inputs);
  // As ModelStore::CommitLoad.
  absl::StatusOr<LoadOutcome> Commit(std::unique_ptr<PendingLoad> load,
                                     std::vector<Tensor> tensors);

 private:
  // Plans a load into the existing `base`; returns the bytes it needs beyond
  // receiving its inputs (conversions and copied modules).
  absl::StatusOr<int64_t> PlanUpdatingLoad(
      PendingLoad& load, Snapshot base,
      absl::Span<const TensorSpec> inputs) const;
  // Validates a load that creates its model, which needs `receiving_bytes` to
  // receive its inputs; returns the metadata bytes of the tree it builds.
  absl::StatusOr<int64_t> PlanCreatingLoad(PendingLoad& load,
                                           absl::Span<const TensorSpec> inputs,
                                           int64_t receiving_bytes) const;
  // The commit of a load that creates its model.
  absl::StatusOr<LoadOutcome> CommitCreating(PendingLoad& load,
                                             absl::Span<const Tensor> tensors);
  // Rebuilds the tree with `converted` (re-planned if another load committed
  // first) and publishes it; returns the new version.
  absl::StatusOr<int64_t> CommitConverted(const PendingLoad& load,
                                          absl::Span<const Tensor> converted);

  const Catalog& catalog_;
  CatalogWriter& writer_;
  StoreMemory& memory_;
  const int max_pending_loads_;
};

}  // namespace modelstate

#endif  // MODELSTATE_STORE_LOAD_SESSION_H_

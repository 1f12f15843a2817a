#include "store/state_dict_memo.h"

#include <utility>

#include "common/status_macros.h"

namespace modelstate {

absl::StatusOr<std::shared_ptr<const StateDict>> StateDictMemo::Get(
    const ModulePtr& root, const ChargeIfFits& charge_if_fits) {
  absl::ReleasableMutexLock lock(&mu_);
  if (kept_ != nullptr) return kept_;
  if (!declined_) {
    ASSIGN_OR_RETURN(std::shared_ptr<Charged> charged, Build(root));
    return Offer(std::move(charged), charge_if_fits);
  }
  // Under a tight limit, fetches must not queue behind each other's builds.
  lock.Release();
  ASSIGN_OR_RETURN(std::shared_ptr<Charged> charged, Build(root));
  absl::MutexLock relock(&mu_);
  return Offer(std::move(charged), charge_if_fits);
}

absl::StatusOr<std::shared_ptr<StateDictMemo::Charged>> StateDictMemo::Build(
    const ModulePtr& root) {
  ASSIGN_OR_RETURN(StateDict state, GetStateDict(root));
  auto charged = std::make_shared<Charged>();
  charged->state = std::move(state);
  return charged;
}

std::shared_ptr<const StateDict> StateDictMemo::Offer(
    std::shared_ptr<Charged> charged, const ChargeIfFits& charge_if_fits) {
  const int64_t bytes = sizeof(Charged) + charged->state.HeapBytes();
  const MemoryCharge& charge = charged->charge;
  const StateDict* const dict = &charged->state;
  // Shares ownership of the whole, so the charge goes with the last user.
  std::shared_ptr<const StateDict> state(std::move(charged), dict);
  if (kept_ == nullptr) {
    if (charge_if_fits(charge, bytes)) {
      kept_ = state;
    } else {
      declined_ = true;
    }
  }
  return state;
}

bool StateDictMemo::kept() const {
  absl::MutexLock lock(&mu_);
  return kept_ != nullptr;
}

}  // namespace modelstate

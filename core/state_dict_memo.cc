#include "core/state_dict_memo.h"

#include <utility>

#include "core/status_macros.h"

namespace modelstate {
absl::StatusOr<std::shared_ptr<const StateDict>> StateDictMemo::Get(
    const ModulePtr& root, const ChargeIfFits& charge_if_fits) {
  absl::MutexLock lock(&mu_);
  if (state_ != nullptr) return state_;
  ASSIGN_OR_RETURN(StateDict built, GetStateDict(root));
  auto state = std::make_shared<const StateDict>(std::move(built));
  const int64_t bytes = sizeof(StateDict) + state->HeapBytes();
  if (charge_if_fits(charge_, bytes)) state_ = state;
  return state;
}

bool StateDictMemo::kept() const {
  absl::MutexLock lock(&mu_);
  return state_ != nullptr;
}

}  // namespace modelstate

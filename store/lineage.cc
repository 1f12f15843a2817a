#include "store/lineage.h"

#include <algorithm>
#include <random>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace modelstate {

uint64_t NewEpoch() {
  std::random_device device;
  uint64_t epoch = 0;
  while (epoch == 0) {
    epoch = (static_cast<uint64_t>(device()) << 32) ^ device();
  }
  return epoch;
}

std::string EpochName(uint64_t epoch) {
  return absl::StrFormat("%016x", epoch);
}

absl::StatusOr<uint64_t> ParseEpoch(absl::string_view text) {
  uint64_t epoch = 0;
  const bool hex = !text.empty() && text.size() <= 16 &&
                   std::all_of(text.begin(), text.end(), [](char c) {
                     return absl::ascii_isxdigit(static_cast<unsigned char>(c));
                   });
  if (!hex || !absl::SimpleHexAtoi(text, &epoch) || epoch == 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "\"", text, "\" is not an epoch (1 to 16 hex digits, not all zero)"));
  }
  return epoch;
}

absl::StatusOr<EpochAdoption> ParseEpochAdoption(absl::string_view text) {
  EpochAdoption adoption;
  if (text.empty()) return adoption;
  if (text == "any") {
    adoption.any = true;
    return adoption;
  }
  absl::StatusOr<uint64_t> epoch = ParseEpoch(text);
  if (!epoch.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--adopt_epoch wants an epoch or \"any\": ", epoch.status().message()));
  }
  adoption.epoch = *epoch;
  return adoption;
}

EpochDecision DecideEpoch(const Lineage& held, bool holds_models,
                          uint64_t upstream_epoch,
                          const EpochAdoption& adoption) {
  if (upstream_epoch == 0) {
    // An upstream from before epochs cannot complete an adoption.
    if (held.adopting) return {EpochAction::kRefuse, held.epoch};
    return {EpochAction::kFollow, held.epoch};
  }
  if (upstream_epoch == held.epoch) {
    return {held.adopting ? EpochAction::kAdopt : EpochAction::kFollow,
            held.epoch};
  }
  // A first epoch: what a data dir from before epochs holds came from this
  // upstream's history, as far as anyone can tell.
  if (held.epoch == 0) return {EpochAction::kFollow, upstream_epoch};
  if (!holds_models || adoption.Allows(upstream_epoch))
    return {EpochAction::kAdopt, upstream_epoch};
  return {EpochAction::kRefuse, held.epoch};
}

}  // namespace modelstate

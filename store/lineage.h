// Lineages: whose history a store's version numbers belong to.
//
// A primary names its history with an epoch: a random 64-bit id made when it
// starts without one (no data dir, a data dir without a lineage record, or
// --new_epoch) and kept in its data dir. Every follower down the tree holds
// the epoch of the versions it mirrored, and serves it on. Version numbers
// compare only within one epoch: of the same epoch, a lower version from an
// upstream means that upstream lags; a different epoch means another history
// (a primary that lost its data), which a follower takes on only when its
// operator says so. See docs/operations.md, "Primary lost its data".
//
// Thread-safety: values and pure functions.
#ifndef MODELSTATE_STORE_LINEAGE_H_
#define MODELSTATE_STORE_LINEAGE_H_

#include <cstdint>
#include <map>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace modelstate {

// What a store knows of its history, as its data dir keeps it.
struct Lineage {
  // The epoch its versions belong to; 0 when unknown (a follower that has
  // not followed anyone yet, or a data dir from before epochs).
  uint64_t epoch = 0;
  // A follower taking on a new epoch (Follower, "adoption") until its first
  // full listing of that epoch is mirrored: models held meanwhile may still be
  // of the previous one.
  bool adopting = false;
  // Model name -> the version it had when it was deleted, for names not held
  // now: a name created again continues after it, and a follower does not
  // take back from a lagging upstream a model it saw deleted.
  std::map<std::string, int64_t> deleted;

  bool operator==(const Lineage& other) const {
    return epoch == other.epoch && adopting == other.adopting &&
           deleted == other.deleted;
  }
};

// A fresh random nonzero epoch.
uint64_t NewEpoch();

// `epoch` as 16 lowercase hex digits (how logs, metrics, flags and the data
// dir spell it).
std::string EpochName(uint64_t epoch);

// The epoch spelled as EpochName spells it (1 to 16 hex digits).
// InvalidArgument for anything else, and for 0.
absl::StatusOr<uint64_t> ParseEpoch(absl::string_view text);

// Which epoch other than its own a follower may take on: none (the default),
// one named by its operator, or any (a follower that should always mirror its
// upstream, whatever happened to it).
struct EpochAdoption {
  bool any = false;
  uint64_t epoch = 0;  // With !any: the one epoch allowed; 0: none.

  bool Allows(uint64_t upstream_epoch) const {
    return any || (epoch != 0 && epoch == upstream_epoch);
  }
};

// --adopt_epoch's value: "" (none), "any", or an epoch (ParseEpoch).
// InvalidArgument otherwise.
absl::StatusOr<EpochAdoption> ParseEpochAdoption(absl::string_view text);

// What a follower does with an upstream's listing, given the epochs.
enum class EpochAction {
  // Follow it: same epoch, an upstream that sends none (it predates epochs),
  // or a follower's first epoch (`epoch` then names it). Version rules apply:
  // never backwards, never a delete the upstream has not seen.
  kFollow,
  // Take on the upstream's epoch: mirror its listing whatever the versions,
  // replacing every model held (the operator allowed it, the follower held
  // nothing, or an adoption was under way when it stopped).
  kAdopt,
  // Another history the operator has not allowed: keep serving what is held,
  // change nothing, say so loudly.
  kRefuse,
};

struct EpochDecision {
  EpochAction action = EpochAction::kRefuse;
  // The epoch the follower holds after acting (its own for kRefuse).
  uint64_t epoch = 0;
};

// Decides for a follower holding `held` (and `holds_models` models) and
// allowed `adoption`, shown a listing of `upstream_epoch` (0: unknown).
EpochDecision DecideEpoch(const Lineage& held, bool holds_models,
                          uint64_t upstream_epoch,
                          const EpochAdoption& adoption);

}  // namespace modelstate

#endif  // MODELSTATE_STORE_LINEAGE_H_

// torch's per-class module `_version`, which state dicts record in their
// metadata and which decides how old checkpoints load. One rule for every
// builder of module trees (architecture specs and checkpoints).
#ifndef MODELSTATE_MODEL_MODULE_VERSION_H_
#define MODELSTATE_MODEL_MODULE_VERSION_H_

#include "absl/strings/string_view.h"

namespace modelstate {

// Returns true for torch.nn's _NormBase family: BatchNorm1d/2d/3d,
// SyncBatchNorm, InstanceNorm1d/2d/3d and their Lazy variants
// (LazyBatchNorm1d, LazyInstanceNorm2d, ...).
bool IsNormBaseClass(absl::string_view class_name);

// Returns torch's `_version` of class `class_name`: 2 for the _NormBase family
// (whose version 2 added num_batches_tracked), 1 for every other class,
// including unknown ones.
int TorchModuleVersion(absl::string_view class_name);

}  // namespace modelstate

#endif  // MODELSTATE_MODEL_MODULE_VERSION_H_

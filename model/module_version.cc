#include "model/module_version.h"

#include <algorithm>
#include <iterator>

namespace modelstate {

bool IsNormBaseClass(absl::string_view class_name) {
  static constexpr absl::string_view kNormBase[] = {
      "BatchNorm1d",        "BatchNorm2d",        "BatchNorm3d",
      "SyncBatchNorm",      "InstanceNorm1d",     "InstanceNorm2d",
      "InstanceNorm3d",     "LazyBatchNorm1d",    "LazyBatchNorm2d",
      "LazyBatchNorm3d",    "LazyInstanceNorm1d", "LazyInstanceNorm2d",
      "LazyInstanceNorm3d",
  };
  return std::find(std::begin(kNormBase), std::end(kNormBase), class_name) !=
         std::end(kNormBase);
}

int TorchModuleVersion(absl::string_view class_name) {
  return IsNormBaseClass(class_name) ? 2 : 1;
}

}  // namespace modelstate

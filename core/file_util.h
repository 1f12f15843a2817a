// Small file helpers shared by the daemon, the client and the core.
#ifndef MODELSTATE_CORE_FILE_UTIL_H_
#define MODELSTATE_CORE_FILE_UTIL_H_

#include <string>

#include "absl/status/statusor.h"

namespace modelstate {

// Returns the whole contents of the file at `path`, or NotFound /
// PermissionDenied / Unavailable naming the path.
absl::StatusOr<std::string> ReadFileToString(const std::string& path);

}  // namespace modelstate

#endif  // MODELSTATE_CORE_FILE_UTIL_H_

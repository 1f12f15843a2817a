#include "core/file_util.h"

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <memory>

#include "absl/strings/str_cat.h"

namespace modelstate {

absl::StatusOr<std::string> ReadFileToString(const std::string& path) {
  std::unique_ptr<std::FILE, int (*)(std::FILE*)> file(
      std::fopen(path.c_str(), "rb"), std::fclose);
  if (file == nullptr) {
    const int err = errno;
    const std::string message =
        absl::StrCat("cannot read ", path, ": ", std::strerror(err));
    if (err == ENOENT) return absl::NotFoundError(message);
    if (err == EACCES || err == EPERM)
      return absl::PermissionDeniedError(message);
    return absl::UnavailableError(message);
  }
  std::string contents;
  char buffer[1 << 16];
  size_t got;
  while ((got = std::fread(buffer, 1, sizeof buffer, file.get())) > 0)
    contents.append(buffer, got);
  if (std::ferror(file.get())) {
    return absl::UnavailableError(absl::StrCat("cannot read ", path));
  }
  return contents;
}

}  // namespace modelstate

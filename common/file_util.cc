#include "common/file_util.h"

#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <memory>

#include "absl/strings/str_cat.h"

namespace modelstate {

absl::Status ErrnoToStatus(int err, absl::string_view what,
                           absl::string_view path) {
  std::string message = absl::StrCat(what, " ", path, ": ", std::strerror(err));
  switch (err) {
    case ENOENT:
      return absl::NotFoundError(message);
    case ENOSPC:
    case EDQUOT:
      return absl::ResourceExhaustedError(message);
    case EACCES:
    case EPERM:
    case EROFS:
      return absl::PermissionDeniedError(message);
    default:
      return absl::UnavailableError(message);
  }
}

absl::Status WriteAll(int fd, const void* data, size_t size,
                      absl::string_view path, const WriteFunction& write_fn) {
  const char* p = static_cast<const char*>(data);
  while (size > 0) {
    const ssize_t wrote = write_fn ? write_fn(fd, p, size) : write(fd, p, size);
    if (wrote < 0 && errno == EINTR) continue;
    if (wrote <= 0) {
      return ErrnoToStatus(wrote < 0 ? errno : ENOSPC, "cannot write", path);
    }
    p += wrote;
    size -= static_cast<size_t>(wrote);
  }
  return absl::OkStatus();
}

absl::Status WriteFullyAt(int fd, uint64_t offset, const void* data,
                          size_t size, absl::string_view path) {
  const uint8_t* p = static_cast<const uint8_t*>(data);
  size_t done = 0;
  while (done < size) {
    const ssize_t wrote =
        pwrite(fd, p + done, size - done, static_cast<off_t>(offset + done));
    if (wrote < 0 && errno == EINTR) continue;
    if (wrote <= 0) {
      return ErrnoToStatus(wrote < 0 ? errno : ENOSPC, "cannot write", path);
    }
    done += static_cast<size_t>(wrote);
  }
  return absl::OkStatus();
}

absl::Status ReadFully(int fd, uint64_t offset, void* out, size_t size,
                       absl::string_view path) {
  uint8_t* p = static_cast<uint8_t*>(out);
  size_t done = 0;
  while (done < size) {
    const ssize_t got =
        pread(fd, p + done, size - done, static_cast<off_t>(offset + done));
    if (got < 0 && errno == EINTR) continue;
    if (got < 0) return ErrnoToStatus(errno, "cannot read", path);
    if (got == 0) {
      return absl::DataLossError(
          absl::StrCat(path, " shrank while being read"));
    }
    done += static_cast<size_t>(got);
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> ReadFileToString(const std::string& path) {
  std::unique_ptr<std::FILE, int (*)(std::FILE*)> file(
      std::fopen(path.c_str(), "rb"), std::fclose);
  if (file == nullptr) return ErrnoToStatus(errno, "cannot read", path);
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

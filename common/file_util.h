// Small file helpers shared by the daemon, the client and the core: one place
// that turns errno into a status, and the loops that retry interrupted and
// partial reads and writes.
//
// Thread-safety: every function is safe to call from any thread.
#ifndef MODELSTATE_COMMON_FILE_UTIL_H_
#define MODELSTATE_COMMON_FILE_UTIL_H_

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace modelstate {

// Returns the status for the failed system call that set `err`, with the
// message "<what> <path>: <strerror(err)>": NotFound for ENOENT,
// ResourceExhausted for ENOSPC and EDQUOT (a full disk or quota),
// PermissionDenied for EACCES, EPERM and EROFS, and Unavailable for anything
// else (EIO and the like, which a retry may get past). Never returns OK.
absl::Status ErrnoToStatus(int err, absl::string_view what,
                           absl::string_view path);

// A write(2) look-alike; tests substitute one that fails.
using WriteFunction =
    std::function<ssize_t(int fd, const void* data, size_t size)>;

// Writes all `size` bytes of `data` to `fd` at its current position, retrying
// after EINTR and after short writes. `write_fn` replaces write(2) when set.
// Returns OK, or the ErrnoToStatus of the failure ("cannot write <path>"); a
// write that makes no progress counts as ENOSPC.
absl::Status WriteAll(int fd, const void* data, size_t size,
                      absl::string_view path,
                      const WriteFunction& write_fn = nullptr);

// Writes all `size` bytes of `data` at `offset` of `fd` (with pwrite(2), so
// the file position is untouched), retrying after EINTR and after short
// writes. Returns OK, or the ErrnoToStatus of the failure ("cannot write
// <path>"); a write that makes no progress counts as ENOSPC.
absl::Status WriteFullyAt(int fd, uint64_t offset, const void* data,
                          size_t size, absl::string_view path);

// Reads exactly `size` bytes at `offset` of `fd` into `out` (with pread(2), so
// the file position is untouched), retrying after EINTR and after short reads.
// Returns the ErrnoToStatus of a failed read ("cannot read <path>"), or
// DataLoss when the file ends first (it shrank after its size was taken).
absl::Status ReadFully(int fd, uint64_t offset, void* out, size_t size,
                       absl::string_view path);

// Returns the whole contents of the file at `path`, or the ErrnoToStatus of the
// failure ("cannot read <path>": NotFound, PermissionDenied, Unavailable).
absl::StatusOr<std::string> ReadFileToString(const std::string& path);

}  // namespace modelstate

#endif  // MODELSTATE_COMMON_FILE_UTIL_H_

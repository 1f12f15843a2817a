#include "proto/local_frame.h"

#include <poll.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstring>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"

namespace modelstate {
namespace {

// Descriptors one recvmsg accepts; more than one per frame is an error, but
// a few are taken so that they can be closed rather than left to the kernel.
constexpr int kMaxReceivedFds = 4;

absl::Status SocketError(int err, absl::string_view what) {
  if (err == EAGAIN || err == EWOULDBLOCK) {
    return absl::DeadlineExceededError(
        absl::StrCat(what, ": the peer did not respond in time"));
  }
  return absl::UnavailableError(absl::StrCat(what, ": ", std::strerror(err)));
}

// The socket's receive timeout (SetSocketTimeouts); infinite when it has none.
absl::Duration ReceiveTimeout(int socket) {
  timeval value{};
  socklen_t size = sizeof(value);
  if (getsockopt(socket, SOL_SOCKET, SO_RCVTIMEO, &value, &size) != 0 ||
      (value.tv_sec == 0 && value.tv_usec == 0))
    return absl::InfiniteDuration();
  return absl::DurationFromTimeval(value);
}

// Waits until `socket` has bytes, or its end, to read: until `deadline` at
// most, and no longer than the socket's receive timeout, which a poll would
// otherwise bypass.
absl::Status WaitReadable(int socket, absl::Time deadline) {
  const absl::Time gap_end = absl::Now() + ReceiveTimeout(socket);
  const absl::Time until = std::min(deadline, gap_end);
  for (absl::Duration left = until - absl::Now(); left > absl::ZeroDuration();
       left = until - absl::Now()) {
    pollfd watched{socket, POLLIN, 0};
    const int64_t wait_ms =
        absl::ToInt64Milliseconds(absl::Ceil(left, absl::Milliseconds(1)));
    const int ready = poll(
        &watched, 1, static_cast<int>(std::min<int64_t>(wait_ms, INT_MAX)));
    if (ready > 0) return absl::OkStatus();
    if (ready < 0 && errno != EINTR)
      return SocketError(errno, "cannot wait on the local socket");
  }
  if (gap_end < deadline)
    return SocketError(EAGAIN, "cannot read from the local socket");
  return absl::DeadlineExceededError(
      "the local frame did not arrive whole in time");
}

// Receives up to `size` bytes into `out`, appending any descriptors that came
// with them to `fds`, once some arrived by `deadline`. Returns the bytes read
// (0 at the end of the stream).
absl::StatusOr<size_t> ReceiveSome(int socket, char* out, size_t size,
                                   absl::Time deadline,
                                   std::vector<UniqueFd>* fds,
                                   bool* truncated) {
  // Without a deadline the socket's receive timeout alone governs, in recvmsg.
  if (deadline != absl::InfiniteFuture()) {
    absl::Status readable = WaitReadable(socket, deadline);
    if (!readable.ok()) return readable;
  }
  alignas(cmsghdr) char control[CMSG_SPACE(kMaxReceivedFds * sizeof(int))];
  iovec iov{out, size};
  msghdr header{};
  header.msg_iov = &iov;
  header.msg_iovlen = 1;
  header.msg_control = control;
  header.msg_controllen = sizeof(control);
  ssize_t got;
  do {
    got = recvmsg(socket, &header, MSG_CMSG_CLOEXEC);
  } while (got < 0 && errno == EINTR);
  if (got < 0) return SocketError(errno, "cannot read from the local socket");
  for (cmsghdr* message = CMSG_FIRSTHDR(&header); message != nullptr;
       message = CMSG_NXTHDR(&header, message)) {
    if (message->cmsg_level != SOL_SOCKET || message->cmsg_type != SCM_RIGHTS)
      continue;
    const size_t count = (message->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    for (size_t i = 0; i < count; ++i) {
      int fd;
      std::memcpy(&fd, CMSG_DATA(message) + i * sizeof(int), sizeof(int));
      fds->emplace_back(fd);
    }
  }
  if ((header.msg_flags & MSG_CTRUNC) != 0) *truncated = true;
  return static_cast<size_t>(got);
}

// Reads exactly `size` bytes by `deadline`. `started` says whether bytes of
// this frame were read before, which makes an end of stream a broken frame.
absl::Status ReceiveAll(int socket, char* out, size_t size, bool started,
                        absl::Time deadline, std::vector<UniqueFd>* fds,
                        bool* truncated) {
  size_t done = 0;
  while (done < size) {
    absl::StatusOr<size_t> got =
        ReceiveSome(socket, out + done, size - done, deadline, fds, truncated);
    if (!got.ok()) return got.status();
    if (*got == 0) {
      if (!started && done == 0)
        return absl::OutOfRangeError("the peer closed the local socket");
      return absl::UnavailableError(
          "the local socket closed in the middle of a frame");
    }
    done += *got;
  }
  return absl::OkStatus();
}

}  // namespace

UniqueFd& UniqueFd::operator=(UniqueFd&& other) noexcept {
  if (this != &other) {
    Reset();
    fd_ = other.Release();
  }
  return *this;
}

int UniqueFd::Release() {
  const int fd = fd_;
  fd_ = -1;
  return fd;
}

void UniqueFd::Reset() {
  if (fd_ >= 0) close(fd_);
  fd_ = -1;
}

absl::StatusOr<LocalRegionLayout> LayOutLocalRegion(
    const std::vector<uint64_t>& sizes) {
  LocalRegionLayout layout;
  layout.offsets.reserve(sizes.size());
  uint64_t end = 0;
  for (uint64_t size : sizes) {
    const uint64_t padding =
        (kLocalRegionAlignment - end % kLocalRegionAlignment) %
        kLocalRegionAlignment;
    if (end > UINT64_MAX - padding || size > UINT64_MAX - (end + padding))
      return absl::InvalidArgumentError("shared-memory region too large");
    layout.offsets.push_back(end + padding);
    end += padding + size;
  }
  layout.region_bytes = end;
  return layout;
}

absl::Status SetSocketTimeouts(int socket, absl::Duration timeout) {
  timeval value{};
  if (timeout != absl::InfiniteDuration()) value = absl::ToTimeval(timeout);
  if (setsockopt(socket, SOL_SOCKET, SO_RCVTIMEO, &value, sizeof(value)) != 0 ||
      setsockopt(socket, SOL_SOCKET, SO_SNDTIMEO, &value, sizeof(value)) != 0) {
    return SocketError(errno, "cannot set the local socket's timeouts");
  }
  return absl::OkStatus();
}

absl::Status WriteLocalFrame(int socket,
                             const google::protobuf::MessageLite& message,
                             int fd_to_pass) {
  const size_t size = message.ByteSizeLong();
  if (size > kMaxLocalFrameBytes)
    return absl::ResourceExhaustedError("local frame too large");
  std::string frame(4 + size, '\0');
  for (int i = 0; i < 4; ++i) frame[i] = static_cast<char>(size >> (8 * i));
  if (!message.SerializeToArray(&frame[4], static_cast<int>(size)))
    return absl::InternalError("cannot serialize a local frame");
  size_t sent = 0;
  while (sent < frame.size()) {
    iovec iov{&frame[sent], frame.size() - sent};
    msghdr header{};
    header.msg_iov = &iov;
    header.msg_iovlen = 1;
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
    if (fd_to_pass >= 0 && sent == 0) {  // The descriptor rides on byte 0.
      header.msg_control = control;
      header.msg_controllen = sizeof(control);
      cmsghdr* attached = CMSG_FIRSTHDR(&header);
      attached->cmsg_level = SOL_SOCKET;
      attached->cmsg_type = SCM_RIGHTS;
      attached->cmsg_len = CMSG_LEN(sizeof(int));
      std::memcpy(CMSG_DATA(attached), &fd_to_pass, sizeof(int));
    }
    const ssize_t wrote = sendmsg(socket, &header, MSG_NOSIGNAL);
    if (wrote < 0 && errno == EINTR) continue;
    if (wrote < 0)
      return SocketError(errno, "cannot write to the local socket");
    sent += static_cast<size_t>(wrote);
  }
  return absl::OkStatus();
}

absl::Status ReadLocalFrame(int socket, uint32_t max_bytes,
                            google::protobuf::MessageLite* message,
                            UniqueFd* received_fd, absl::Time deadline) {
  std::vector<UniqueFd> fds;  // Closed on every error path.
  bool truncated = false;
  unsigned char length[4];
  absl::Status read = ReceiveAll(socket, reinterpret_cast<char*>(length), 4,
                                 /*started=*/false, deadline, &fds, &truncated);
  if (!read.ok()) return read;
  const uint32_t size = length[0] | length[1] << 8 | length[2] << 16 |
                        static_cast<uint32_t>(length[3]) << 24;
  if (size > max_bytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "local frame of ", size, " bytes exceeds the limit of ", max_bytes));
  }
  std::string body(size, '\0');
  read = ReceiveAll(socket, body.data(), size, /*started=*/true, deadline, &fds,
                    &truncated);
  if (!read.ok()) return read;
  if (truncated || fds.size() > 1 || (!fds.empty() && received_fd == nullptr)) {
    return absl::InvalidArgumentError(
        "unexpected file descriptors on the local socket");
  }
  if (!message->ParseFromString(body))
    return absl::InvalidArgumentError("malformed local frame");
  if (received_fd != nullptr)
    *received_fd = fds.empty() ? UniqueFd() : std::move(fds[0]);
  return absl::OkStatus();
}

absl::Status AwaitLocalFrame(int socket, absl::Time deadline) {
  return WaitReadable(socket, deadline);
}

v1::LocalStatus ToLocalStatus(const absl::Status& status) {
  v1::LocalStatus local;
  local.set_code(static_cast<int>(status.code()));
  local.set_message(std::string(status.message()));
  return local;
}

absl::Status FromLocalStatus(const v1::LocalStatus& status) {
  const int code = status.code();
  const bool known =
      code > 0 && code <= static_cast<int>(absl::StatusCode::kUnauthenticated);
  return absl::Status(
      known ? static_cast<absl::StatusCode>(code) : absl::StatusCode::kUnknown,
      status.message());
}

}  // namespace modelstate

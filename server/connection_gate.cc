#include "server/connection_gate.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace modelstate {
namespace {

// How often connections are checked for having been closed by gRPC, and for
// having outlived the admission timeout.
constexpr absl::Duration kSweepInterval = absl::Milliseconds(250);
// How long the gate waits before accepting again after running out of
// descriptors, so that it does not spin while none are free.
constexpr absl::Duration kOutOfDescriptorsPause = absl::Milliseconds(100);
// Connections accepted per wake-up before sweeping and polling again.
constexpr int kAcceptBurst = 64;

struct HostPort {
  std::string host;
  std::string port;
};

absl::StatusOr<HostPort> SplitHostPort(const std::string& listen) {
  const size_t colon = listen.rfind(':');
  if (colon == std::string::npos || colon + 1 == listen.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("listen address \"", listen, "\" is not host:port"));
  }
  HostPort parts{listen.substr(0, colon), listen.substr(colon + 1)};
  if (parts.host.size() >= 2 && parts.host.front() == '[' &&
      parts.host.back() == ']') {
    parts.host = parts.host.substr(1, parts.host.size() - 2);
  }
  int port = 0;
  if (!absl::SimpleAtoi(parts.port, &port) || port < 0 || port > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("listen address \"", listen, "\" has no valid port"));
  }
  // "localhost" may resolve to ::1 first; clients try 127.0.0.1 as well.
  if (parts.host == "localhost") parts.host = "127.0.0.1";
  if (parts.host.empty() || parts.host == "*") parts.host = "::";
  return parts;
}

int BoundPort(int fd) {
  sockaddr_storage address{};
  socklen_t length = sizeof(address);
  if (getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length) != 0)
    return 0;
  if (address.ss_family == AF_INET)
    return ntohs(reinterpret_cast<sockaddr_in*>(&address)->sin_port);
  return ntohs(reinterpret_cast<sockaddr_in6*>(&address)->sin6_port);
}

// A listening socket on `parts`; the wildcard "::" takes IPv4 too.
absl::StatusOr<int> OpenListener(const std::string& listen,
                                 const HostPort& parts) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  addrinfo* found = nullptr;
  const int resolved =
      getaddrinfo(parts.host.c_str(), parts.port.c_str(), &hints, &found);
  if (resolved != 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen on ", listen,
                                               ": ", gai_strerror(resolved)));
  }
  std::unique_ptr<addrinfo, decltype(&freeaddrinfo)> owner(found,
                                                           &freeaddrinfo);
  const int fd =
      socket(found->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    return absl::UnavailableError(
        absl::StrCat("cannot listen on ", listen, ": ", std::strerror(errno)));
  }
  const int one = 1, zero = 0;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  if (found->ai_family == AF_INET6)
    setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof(zero));
  if (bind(fd, found->ai_addr, found->ai_addrlen) != 0 ||
      ::listen(fd, SOMAXCONN) != 0) {
    const int error = errno;
    close(fd);
    return absl::UnavailableError(
        absl::StrCat("cannot listen on ", listen, ": ", std::strerror(error)));
  }
  return fd;
}

// The peer as gRPC names it (grpc_sockaddr_to_uri): "ipv4:a.b.c.d:port",
// "ipv6:[addr]:port", with IPv4-mapped IPv6 addresses as IPv4.
std::string PeerUri(const sockaddr_storage& address) {
  char text[INET6_ADDRSTRLEN] = {};
  if (address.ss_family == AF_INET) {
    const auto& v4 = reinterpret_cast<const sockaddr_in&>(address);
    inet_ntop(AF_INET, &v4.sin_addr, text, sizeof(text));
    return absl::StrCat("ipv4:", text, ":", ntohs(v4.sin_port));
  }
  const auto& v6 = reinterpret_cast<const sockaddr_in6&>(address);
  if (IN6_IS_ADDR_V4MAPPED(&v6.sin6_addr)) {
    inet_ntop(AF_INET, &v6.sin6_addr.s6_addr[12], text, sizeof(text));
    return absl::StrCat("ipv4:", text, ":", ntohs(v6.sin6_port));
  }
  inet_ntop(AF_INET6, &v6.sin6_addr, text, sizeof(text));
  std::string host = text;
  if (v6.sin6_scope_id != 0) absl::StrAppend(&host, "%25", v6.sin6_scope_id);
  return absl::StrCat("ipv6:[", host, "]:", ntohs(v6.sin6_port));
}

ino_t SocketInode(int fd) {
  struct stat info;
  if (fstat(fd, &info) != 0 || !S_ISSOCK(info.st_mode)) return 0;
  return info.st_ino;
}

// Shuts down the socket that `fd` named when it was accepted, if it still
// does; gRPC then sees the connection end and closes it. Through a dup that
// is checked first, so that a number gRPC closed and something else reused
// is left alone.
void ShutDownIfSame(int fd, ino_t inode) {
  const int copy = fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (copy < 0) {
    // No descriptor to spare: the check and the shutdown are a moment apart.
    if (SocketInode(fd) == inode) shutdown(fd, SHUT_RDWR);
    return;
  }
  if (SocketInode(copy) == inode) shutdown(copy, SHUT_RDWR);
  close(copy);
}

int OpenReserve() { return open("/dev/null", O_RDONLY | O_CLOEXEC); }

}  // namespace

uint64_t RaiseOpenFileLimit() {
  rlimit limit{};
  if (getrlimit(RLIMIT_NOFILE, &limit) != 0) return 1024;
  if (limit.rlim_cur < limit.rlim_max) {
    rlimit raised = limit;
    raised.rlim_cur = limit.rlim_max;
    // An infinite hard limit is still bounded by fs.nr_open.
    if (setrlimit(RLIMIT_NOFILE, &raised) != 0 &&
        limit.rlim_max == RLIM_INFINITY) {
      raised.rlim_cur = 1 << 20;
      setrlimit(RLIMIT_NOFILE, &raised);
    }
    getrlimit(RLIMIT_NOFILE, &limit);
  }
  return limit.rlim_cur;
}

absl::StatusOr<std::unique_ptr<ConnectionGate>> ConnectionGate::Listen(
    ConnectionGateOptions options) {
  if (options.max_connections < 1)
    return absl::InvalidArgumentError("max_connections must be at least 1");
  if (options.admission_timeout <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError(
        "the unauthenticated connection timeout must be positive");
  }
  absl::StatusOr<HostPort> parts = SplitHostPort(options.listen);
  if (!parts.ok()) return parts.status();
  absl::StatusOr<int> listen_fd = OpenListener(options.listen, *parts);
  if (!listen_fd.ok()) return listen_fd.status();
  const int wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  rlimit files{};
  getrlimit(RLIMIT_NOFILE, &files);
  const int64_t usable =
      static_cast<int64_t>(std::min<rlim_t>(files.rlim_cur, 1 << 30)) * 3 / 4;
  const int64_t fd_cap =
      std::max<int64_t>(1, usable - options.reserved_descriptors);
  const int max_connections =
      static_cast<int>(std::min<int64_t>(options.max_connections, fd_cap));
  const int port = BoundPort(*listen_fd);
  return std::unique_ptr<ConnectionGate>(new ConnectionGate(
      std::move(options), *listen_fd, wake_fd, port, max_connections));
}

ConnectionGate::ConnectionGate(ConnectionGateOptions options, int listen_fd,
                               int wake_fd, int port, int max_connections)
    : options_(std::move(options)),
      listen_fd_(listen_fd),
      wake_fd_(wake_fd),
      port_(port),
      max_connections_(max_connections),
      reserve_fd_(OpenReserve()) {}

ConnectionGate::~ConnectionGate() { Stop(); }

void ConnectionGate::Stop() {
  if (listen_fd_ < 0) return;
  stop_ = true;
  const uint64_t one = 1;
  if (write(wake_fd_, &one, sizeof(one)) < 0) {
    // The thread still wakes at its next sweep.
  }
  if (thread_.joinable()) thread_.join();
  close(listen_fd_);
  close(wake_fd_);
  if (reserve_fd_ >= 0) close(reserve_fd_);
  listen_fd_ = wake_fd_ = reserve_fd_ = -1;
}

void ConnectionGate::Start(
    grpc::experimental::ExternalConnectionAcceptor* acceptor) {
  acceptor_ = acceptor;
  thread_ = std::thread([this] { Run(); });
}

void ConnectionGate::Admit(absl::string_view peer) {
  absl::MutexLock lock(&mu_);
  auto it = connections_.find(std::string(peer));
  if (it != connections_.end()) it->second.deadline = absl::InfiniteFuture();
}

ConnectionGate::Counts ConnectionGate::counts() const {
  absl::MutexLock lock(&mu_);
  Counts counts = counts_;
  counts.open = static_cast<int64_t>(connections_.size());
  return counts;
}

void ConnectionGate::Run() {
  while (!stop_) {
    const absl::Time now = absl::Now();
    const bool may_accept = now >= retry_accept_at_;
    pollfd fds[2] = {
        {wake_fd_, POLLIN, 0},
        {listen_fd_, static_cast<short>(may_accept ? POLLIN : 0), 0}};
    const int timeout_ms = static_cast<int>(
        std::max<int64_t>(1, absl::ToInt64Milliseconds(NextWake(now))));
    const int ready = poll(fds, 2, timeout_ms);
    if (stop_) break;
    if (ready > 0 && (fds[1].revents & POLLIN)) AcceptReady();
    if (!may_accept && absl::Now() >= retry_accept_at_) {
      AcceptReady();
      if (!accepting_.load()) ProbeDescriptors();
    }
    if (absl::Now() >= next_sweep_) {
      absl::MutexLock lock(&mu_);
      SweepLocked(absl::Now());
      next_sweep_ = absl::Now() + kSweepInterval;
    }
  }
}

absl::Duration ConnectionGate::NextWake(absl::Time now) const {
  absl::Time wake = next_sweep_;
  if (retry_accept_at_ > now) wake = std::min(wake, retry_accept_at_);
  return std::max(absl::ZeroDuration(), wake - now);
}

void ConnectionGate::AcceptReady() {
  for (int i = 0; i < kAcceptBurst && !stop_; ++i) {
    if (!AcceptOne()) return;
  }
}

bool ConnectionGate::AcceptOne() {
  const int fd =
      accept4(listen_fd_, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
  if (fd < 0) {
    const int error = errno;
    OnAcceptFailed(error);
    return error == ECONNABORTED || error == EINTR || error == EPROTO;
  }
  SetAccepting(true);
  HandOver(fd);
  return true;
}

void ConnectionGate::OnAcceptFailed(int error) {
  if (error == EAGAIN || error == EWOULDBLOCK || error == ECONNABORTED ||
      error == EINTR || error == EPROTO) {
    return;
  }
  if (error == EMFILE || error == ENFILE || error == ENOBUFS ||
      error == ENOMEM) {
    if (accepting_.load()) {
      std::fprintf(stderr,
                   "modelstated: cannot accept connections on port %d: %s; "
                   "refusing them until descriptors are free\n",
                   port_, std::strerror(error));
    }
    SetAccepting(false);
    {
      // A connection that has not proven itself gives its descriptor up.
      absl::MutexLock lock(&mu_);
      EvictOldestUnadmitted();
    }
    // The pending peer is closed rather than left waiting in the backlog.
    if (reserve_fd_ >= 0) {
      close(reserve_fd_);
      const int fd = accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
      if (fd >= 0) {
        close(fd);
        absl::MutexLock lock(&mu_);
        ++counts_.refused;
      }
      reserve_fd_ = OpenReserve();
    }
  }
  retry_accept_at_ = absl::Now() + kOutOfDescriptorsPause;
}

void ConnectionGate::ProbeDescriptors() {
  if (reserve_fd_ < 0) reserve_fd_ = OpenReserve();
  const int probe =
      reserve_fd_ < 0 ? -1 : fcntl(reserve_fd_, F_DUPFD_CLOEXEC, 0);
  if (probe < 0) {
    retry_accept_at_ = absl::Now() + kOutOfDescriptorsPause;
    return;
  }
  close(probe);
  SetAccepting(true);
}

void ConnectionGate::HandOver(int fd) {
  sockaddr_storage peer{};
  socklen_t length = sizeof(peer);
  const ino_t inode = SocketInode(fd);
  if (getpeername(fd, reinterpret_cast<sockaddr*>(&peer), &length) != 0 ||
      inode == 0) {
    close(fd);  // Already gone.
    return;
  }
  const int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  {
    absl::MutexLock lock(&mu_);
    if (static_cast<int>(connections_.size()) >= max_connections_) {
      SweepLocked(absl::Now());  // Frees the slots gRPC has closed.
    }
    if (static_cast<int>(connections_.size()) >= max_connections_ &&
        !EvictOldestUnadmitted()) {
      ++counts_.refused;
      close(fd);
      return;
    }
    connections_[PeerUri(peer)] =
        Connection{fd, inode, absl::Now() + options_.admission_timeout};
    ++counts_.accepted;
  }
  grpc::experimental::ExternalConnectionAcceptor::NewConnectionParameters
      parameters;
  parameters.listener_fd = listen_fd_;
  parameters.fd = fd;
  acceptor_->HandleNewConnection(&parameters);
}

void ConnectionGate::SweepLocked(absl::Time now) {
  for (auto it = connections_.begin(); it != connections_.end();) {
    const Connection& connection = it->second;
    if (SocketInode(connection.fd) != connection.inode) {
      it = connections_.erase(it);  // gRPC closed it.
    } else if (connection.deadline <= now) {
      ShutDownIfSame(connection.fd, connection.inode);
      ++counts_.expired;
      it = connections_.erase(it);
    } else {
      ++it;
    }
  }
}

bool ConnectionGate::EvictOldestUnadmitted() {
  auto oldest = connections_.end();
  for (auto it = connections_.begin(); it != connections_.end(); ++it) {
    if (it->second.deadline == absl::InfiniteFuture()) continue;
    if (oldest == connections_.end() ||
        it->second.deadline < oldest->second.deadline) {
      oldest = it;
    }
  }
  if (oldest == connections_.end()) return false;
  ShutDownIfSame(oldest->second.fd, oldest->second.inode);
  ++counts_.evicted;
  connections_.erase(oldest);
  return true;
}

void ConnectionGate::SetAccepting(bool accepting) {
  if (accepting_.exchange(accepting) == accepting) return;
  if (accepting) {
    std::fprintf(
        stderr, "modelstated: accepting connections on port %d again\n", port_);
  }
  if (options_.on_accepting_changed) options_.on_accepting_changed(accepting);
}

}  // namespace modelstate

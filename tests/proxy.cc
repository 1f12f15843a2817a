#include "tests/proxy.h"

#include <arpa/inet.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"

namespace modelstate::testing_support {

sockaddr_in LoopbackAddress(int port) {
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_port = htons(static_cast<uint16_t>(port));
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  return address;
}

int ListenOnLoopback(int* port) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in address = LoopbackAddress(0);
  socklen_t length = sizeof(address);
  if (fd < 0 || bind(fd, reinterpret_cast<sockaddr*>(&address), length) != 0 ||
      listen(fd, 16) != 0 ||
      getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length) != 0) {
    if (fd >= 0) close(fd);
    return -1;
  }
  *port = ntohs(address.sin_port);
  return fd;
}

int ConnectToLoopback(int port) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  const sockaddr_in address = LoopbackAddress(port);
  if (fd >= 0 && connect(fd, reinterpret_cast<const sockaddr*>(&address),
                         sizeof(address)) == 0) {
    return fd;
  }
  if (fd >= 0) close(fd);
  return -1;
}

bool SendAll(int fd, const char* data, size_t size) {
  while (size > 0) {
    const ssize_t n = send(fd, data, size, MSG_NOSIGNAL);
    if (n <= 0) return false;
    data += n;
    size -= static_cast<size_t>(n);
  }
  return true;
}

CuttingProxy::CuttingProxy(int upstream_port, std::vector<uint64_t> cuts)
    : upstream_port_(upstream_port), cuts_(std::move(cuts)) {
  listener_ = ListenOnLoopback(&port_);
  EXPECT_GE(listener_, 0);
  EXPECT_EQ(pipe(stop_pipe_), 0);
  EXPECT_EQ(pipe(order_pipe_), 0);
  thread_ = std::thread([this] { Run(); });
}

CuttingProxy::~CuttingProxy() {
  const char byte = 0;
  EXPECT_EQ(write(stop_pipe_[1], &byte, 1), 1);
  thread_.join();
  for (Pair& pair : pairs_) Close(pair);
  close(listener_);
  close(stop_pipe_[0]);
  close(stop_pipe_[1]);
  close(order_pipe_[0]);
  close(order_pipe_[1]);
}

void CuttingProxy::Redirect(int port) {
  redirect_to_ = port;
  drop_all_ = true;
  const char byte = 0;
  EXPECT_EQ(write(order_pipe_[1], &byte, 1), 1);
}

void CuttingProxy::Isolate() {
  isolated_ = true;
  drop_all_ = true;
  const char byte = 0;
  EXPECT_EQ(write(order_pipe_[1], &byte, 1), 1);
}

void CuttingProxy::Heal() { isolated_ = false; }

std::vector<absl::Time> CuttingProxy::accept_times() const {
  absl::MutexLock lock(&accepts_mu_);
  return accept_times_;
}

void CuttingProxy::TakeOrders() {
  char bytes[64];
  if (read(order_pipe_[0], bytes, sizeof bytes) <= 0) return;
  const int port = redirect_to_.exchange(-1);
  if (port >= 0) upstream_port_ = port;
  if (!drop_all_.exchange(false)) return;
  for (Pair& pair : pairs_) Close(pair);
  pairs_.clear();
}

std::string CuttingProxy::address() const {
  return absl::StrCat("127.0.0.1:", port_);
}

void CuttingProxy::Close(Pair& pair) {
  for (int* fd : {&pair.client, &pair.server}) {
    if (*fd < 0) continue;
    shutdown(*fd, SHUT_RDWR);
    close(*fd);
    *fd = -1;
  }
}

void CuttingProxy::Accept() {
  Pair pair;
  pair.client = accept(listener_, nullptr, nullptr);
  if (pair.client < 0) return;
  {
    absl::MutexLock lock(&accepts_mu_);
    accept_times_.push_back(absl::Now());
  }
  if (isolated_ || absl::Now() < refuse_until_ ||
      (pair.server = ConnectToLoopback(upstream_port_)) < 0) {
    Close(pair);
    return;
  }
  const int index = connections_++;
  if (index < static_cast<int>(cuts_.size())) pair.budget = cuts_[index];
  pairs_.push_back(pair);
}

// Forwards what one side has; false when the pair is done (closed or cut).
bool CuttingProxy::Forward(Pair& pair, bool downstream) {
  char buffer[64 << 10];
  size_t want = sizeof(buffer);
  if (downstream) {
    want = static_cast<size_t>(std::min<uint64_t>(want, pair.budget));
  }
  const int from = downstream ? pair.server : pair.client;
  const int to = downstream ? pair.client : pair.server;
  const ssize_t n = recv(from, buffer, want, 0);
  if (n <= 0 || !SendAll(to, buffer, static_cast<size_t>(n))) return false;
  if (!downstream) return true;
  if (const uint64_t rate = rate_.load(); rate > 0) {
    absl::SleepFor(absl::Seconds(static_cast<double>(n) / rate));
  }
  downstream_bytes_ += static_cast<uint64_t>(n);
  pair.budget -= static_cast<uint64_t>(n);
  if (pair.budget > 0) return true;
  ++cuts_made_;
  if (on_cut_) on_cut_(cuts_made_);
  return false;
}

void CuttingProxy::Run() {
  for (;;) {
    std::vector<pollfd> fds = {{stop_pipe_[0], POLLIN, 0},
                               {listener_, POLLIN, 0},
                               {order_pipe_[0], POLLIN, 0}};
    for (const Pair& pair : pairs_) {
      fds.push_back({pair.client, POLLIN, 0});
      fds.push_back({pair.server, POLLIN, 0});
    }
    if (poll(fds.data(), fds.size(), -1) < 0) return;
    if (fds[0].revents != 0) return;
    if (fds[2].revents != 0) {
      TakeOrders();
      continue;
    }
    for (size_t i = 0; i < pairs_.size(); ++i) {
      Pair& pair = pairs_[i];
      bool open = true;
      if (fds[3 + 2 * i].revents != 0) open = Forward(pair, false);
      if (open && fds[4 + 2 * i].revents != 0) open = Forward(pair, true);
      if (!open) Close(pair);
    }
    pairs_.erase(
        std::remove_if(pairs_.begin(), pairs_.end(),
                       [](const Pair& pair) { return pair.client < 0; }),
        pairs_.end());
    if (fds[1].revents != 0) Accept();
  }
}

}  // namespace modelstate::testing_support

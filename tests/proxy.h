// TCP on 127.0.0.1 for tests that come between a client and a daemon: small
// socket helpers, and a proxy that cuts connections at chosen byte counts.
#ifndef MODELSTATE_TESTS_PROXY_H_
#define MODELSTATE_TESTS_PROXY_H_

#include <netinet/in.h>

#include <atomic>
#include <cstdint>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace modelstate::testing_support {

// 127.0.0.1:`port`.
sockaddr_in LoopbackAddress(int port);
// A socket listening on 127.0.0.1:0; sets `*port`. -1 on failure.
int ListenOnLoopback(int* port);
// A socket connected to 127.0.0.1:`port`, or -1.
int ConnectToLoopback(int port);
// Sends all `size` bytes (no SIGPIPE); false if the peer is gone.
bool SendAll(int fd, const char* data, size_t size);

// A TCP proxy on 127.0.0.1:0 in front of 127.0.0.1:`upstream_port`. It cuts
// its i-th connection once it has forwarded cuts[i] bytes from the server to
// the client (connections past the list are never cut), and counts every byte
// it forwards that way. One thread serves every connection.
class CuttingProxy {
 public:
  CuttingProxy(int upstream_port, std::vector<uint64_t> cuts);
  ~CuttingProxy();
  CuttingProxy(const CuttingProxy&) = delete;
  CuttingProxy& operator=(const CuttingProxy&) = delete;

  std::string address() const;
  uint64_t downstream_bytes() const { return downstream_bytes_.load(); }
  int connections() const { return connections_.load(); }
  // Runs on the proxy's thread after each cut, before it accepts again, with
  // the number of cuts made so far. Set it before anything connects.
  void set_on_cut(std::function<void(int cuts)> on_cut) {
    on_cut_ = std::move(on_cut);
  }
  // Later connections go to 127.0.0.1:`port`; call it from on_cut.
  void set_upstream(int port) { upstream_port_ = port; }
  // Connections accepted before `until` are closed at once (the upstream is
  // away); call it from on_cut.
  void RefuseUntil(absl::Time until) { refuse_until_ = until; }

  // From any thread: drops every connection, and sends later ones to
  // 127.0.0.1:`port` (a load balancer that lands elsewhere).
  void Redirect(int port);
  // From any thread: drops every connection and closes new ones at once
  // until Heal() (a host that went away).
  void Isolate();
  void Heal();
  // From any thread: forwards at most about `bytes_per_second` from the server
  // to the client, over every connection together (a shaped link); 0: as
  // fast as it can.
  void Throttle(uint64_t bytes_per_second) { rate_ = bytes_per_second; }
  // When each connection was accepted, closed at once or not, oldest first.
  std::vector<absl::Time> accept_times() const;

 private:
  struct Pair {
    int client = -1;
    int server = -1;
    uint64_t budget = UINT64_MAX;  // Server-to-client bytes before the cut.
  };

  static void Close(Pair& pair);
  // Applies what Redirect, Isolate and Heal asked for.
  void TakeOrders();
  void Accept();
  bool Forward(Pair& pair, bool downstream);
  void Run();

  // Only the proxy's thread touches these once it runs.
  int upstream_port_;
  absl::Time refuse_until_ = absl::InfinitePast();
  int cuts_made_ = 0;
  std::vector<Pair> pairs_;

  const std::vector<uint64_t> cuts_;
  int listener_ = -1;
  int port_ = 0;
  int stop_pipe_[2] = {-1, -1};
  // Wakes the proxy's thread for TakeOrders.
  int order_pipe_[2] = {-1, -1};
  std::atomic<int> redirect_to_{-1};
  std::atomic<bool> drop_all_{false};
  std::atomic<bool> isolated_{false};
  std::atomic<uint64_t> rate_{0};
  mutable absl::Mutex accepts_mu_;
  std::vector<absl::Time> accept_times_ ABSL_GUARDED_BY(accepts_mu_);
  std::function<void(int)> on_cut_;
  std::atomic<uint64_t> downstream_bytes_{0};
  std::atomic<int> connections_{0};
  std::thread thread_;
};

}  // namespace modelstate::testing_support

#endif  // MODELSTATE_TESTS_PROXY_H_

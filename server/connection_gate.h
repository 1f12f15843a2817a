// The daemon's own accept loop for a gRPC port. gRPC's listener gives up for
// good when accept(2) fails for want of file descriptors, and it has no cap on
// connections nor on how long a connection may stay open without making a
// call. This gate owns the listening socket instead and hands each accepted
// connection to gRPC (an external connection acceptor), so it can:
//   - cap the connections open at once, below the open-file limit, evicting
//     the oldest connection that has not been admitted when the cap is
//     reached (so idle attackers cannot lock out real clients);
//   - close connections on which no call was admitted (authenticated, or any
//     call without an auth policy) within a short bound;
//   - survive EMFILE/ENFILE: a reserved descriptor is given up to accept and
//     close the pending peer, the listener stays armed, and accepting resumes
//     as soon as descriptors are free again; while it cannot accept, it says
//     so (health reports NOT_SERVING).
//
// gRPC owns each connection's descriptor once handed over. The gate only
// remembers its number and socket inode: it learns that gRPC closed it when
// the number no longer names that socket, and it closes one itself through a
// dup of the descriptor that it checked names that socket, so a reused number
// is never shut down by mistake.
//
// Thread-safety: Admit and the accessors may be called from any thread.
#ifndef MODELSTATE_SERVER_CONNECTION_GATE_H_
#define MODELSTATE_SERVER_CONNECTION_GATE_H_

#include <sys/types.h>

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "grpcpp/server_builder.h"

namespace modelstate {

struct ConnectionGateOptions {
  // host:port as for gRPC ("127.0.0.1:0", "0.0.0.0:50551", "[::]:50551",
  // "localhost:50551"); port 0 picks a free port.
  std::string listen;
  // Connections open at once. Lowered to three quarters of the open-file
  // limit when above it, so that the daemon's own files always have room.
  int max_connections = 4096;
  // Descriptors other listeners of the process may hold at once (the health
  // port's connections, the local socket's): the cap stays below three
  // quarters of the open-file limit less these.
  int reserved_descriptors = 0;
  // A connection on which no call was admitted (see Admit) within this long
  // is closed; infinite keeps them (max_connection_idle still applies).
  absl::Duration admission_timeout = absl::InfiniteDuration();
  // Told whenever the gate starts or stops being able to accept; may be
  // empty. Called on the gate's thread; must not call back into the gate.
  std::function<void(bool accepting)> on_accepting_changed;
};

// Descriptors the process may open: the soft limit, raised to the hard
// limit first when it is lower (as servers that hold many sockets do).
// Returns the limit in force.
uint64_t RaiseOpenFileLimit();

class ConnectionGate {
 public:
  // Binds and listens on options.listen. Unavailable when the address cannot
  // be bound, InvalidArgument when it does not parse or max_connections < 1.
  static absl::StatusOr<std::unique_ptr<ConnectionGate>> Listen(
      ConnectionGateOptions options);
  // Stop().
  ~ConnectionGate();

  // Stops accepting and closes the listener; connections handed to gRPC are
  // gRPC's to close. Idempotent; Admit and counts() still work after it.
  void Stop();

  // The port bound.
  int port() const { return port_; }
  // The cap in force (after lowering to the open-file limit).
  int max_connections() const { return max_connections_; }

  // Starts the accept loop, handing connections to `acceptor`, which must be
  // of a started gRPC server and outlive the gate.
  void Start(grpc::experimental::ExternalConnectionAcceptor* acceptor);

  // Marks the connection whose peer is `peer` (grpc::ServerContext::peer(),
  // "ipv4:127.0.0.1:40000") as admitted: it is no longer closed for want of
  // a call. Unknown peers are ignored.
  void Admit(absl::string_view peer);

  // False while accept(2) fails for want of descriptors or memory.
  bool accepting() const { return accepting_.load(); }

  struct Counts {
    int64_t open = 0;      // Handed to gRPC and not yet closed.
    int64_t accepted = 0;  // Since start.
    int64_t refused = 0;   // Closed at once: at the cap, or no descriptors.
    int64_t evicted = 0;   // Closed unadmitted to make room for a new one.
    int64_t expired = 0;   // Closed unadmitted after admission_timeout.
  };
  Counts counts() const;

 private:
  struct Connection {
    int fd = -1;
    ino_t inode = 0;
    absl::Time deadline;  // Infinite once admitted.
  };

  ConnectionGate(ConnectionGateOptions options, int listen_fd, int wake_fd,
                 int port, int max_connections);
  void Run();
  void AcceptReady();
  // Accepts one connection; false when none is pending or accept failed.
  bool AcceptOne();
  void OnAcceptFailed(int error);
  // While not accepting: accepting again once a descriptor can be had, even
  // if no client is waiting to connect (health must not stay NOT_SERVING
  // because the pod was taken out of its Service).
  void ProbeDescriptors();
  void HandOver(int fd);
  // Forgets connections gRPC has closed, closes the overdue ones.
  void SweepLocked(absl::Time now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Closes the oldest unadmitted connection; false if there is none.
  bool EvictOldestUnadmitted() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void SetAccepting(bool accepting);
  absl::Duration NextWake(absl::Time now) const;

  const ConnectionGateOptions options_;
  int listen_fd_;
  int wake_fd_;
  const int port_;
  const int max_connections_;
  int reserve_fd_ = -1;  // Given up to accept-and-close when out of fds.
  grpc::experimental::ExternalConnectionAcceptor* acceptor_ = nullptr;
  std::atomic<bool> accepting_{true};
  std::atomic<bool> stop_{false};
  absl::Time next_sweep_ = absl::InfinitePast();
  absl::Time retry_accept_at_ = absl::InfinitePast();

  mutable absl::Mutex mu_;
  // By peer URI, as gRPC spells it.
  std::map<std::string, Connection> connections_ ABSL_GUARDED_BY(mu_);
  Counts counts_ ABSL_GUARDED_BY(mu_);
  std::thread thread_;
};

}  // namespace modelstate

#endif  // MODELSTATE_SERVER_CONNECTION_GATE_H_

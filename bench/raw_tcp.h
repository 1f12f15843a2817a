// Contender (a): a minimal TCP sender/receiver over 127.0.0.1, the physical
// limit of a loopback transfer here. Protocol: 'G' asks for the file (answered
// with an 8-byte length and the bytes); 'P', an 8-byte length and that many
// bytes pushes them into fresh memory (answered with 'K').
#ifndef MODELSTATE_BENCH_RAW_TCP_H_
#define MODELSTATE_BENCH_RAW_TCP_H_

#include <cstdint>
#include <string>

namespace modelstate::bench {

// Child mode `serve-tcp FILE`: serves FILE's bytes, printing "PORT <n>" on
// stdout once it listens. Never returns.
[[noreturn]] void ServeTcp(const std::string& file);

// One connection to a ServeTcp server. Dies on any transport error. Not
// thread-safe.
class RawTcpClient {
 public:
  explicit RawTcpClient(int port);
  ~RawTcpClient();
  RawTcpClient(const RawTcpClient&) = delete;
  RawTcpClient& operator=(const RawTcpClient&) = delete;

  // Receives the server's file into fresh memory (FreshBuffer), freed again
  // before returning; returns its size.
  uint64_t Fetch();

  // Receives the server's file into `into` (reused memory, the in-place
  // refresh's baseline); returns its size. Dies if it exceeds `capacity`.
  uint64_t FetchInto(char* into, uint64_t capacity);

  // Sends `bytes` for the server to receive into fresh memory, and waits for
  // its acknowledgement.
  void Push(const std::string& bytes);

 private:
  // Asks for the file; returns the size the server announces.
  uint64_t Request();

  int fd_;
};

}  // namespace modelstate::bench

#endif  // MODELSTATE_BENCH_RAW_TCP_H_

// Helpers shared by the benchmark driver and its contenders: timing, fatal
// errors, model files, receive buffers and loopback sockets.
//
// The driver is a tool, not a library: any failure ends the process (Die), and
// the children it started die with it (PR_SET_PDEATHSIG).
#ifndef MODELSTATE_BENCH_COMMON_H_
#define MODELSTATE_BENCH_COMMON_H_

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <utility>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"

namespace modelstate::bench {

constexpr uint64_t kMiB = 1 << 20;
constexpr uint64_t kGiB = 1 << 30;

// Seconds on the monotonic clock.
double Seconds();

// Throughput in GB/s (10^9 bytes per second).
double GBps(uint64_t bytes, double seconds);

// Runs `transfer` of `bytes` once; returns its GB/s.
double TimedGBps(uint64_t bytes, const std::function<void()>& transfer);

// Prints `message` and exits with status 1.
[[noreturn]] void Die(const std::string& message);

// Returns the value of `value`, or dies naming `what`.
template <typename T>
T Check(absl::StatusOr<T> value, const char* what) {
  if (!value.ok()) Die(absl::StrCat(what, ": ", value.status().ToString()));
  return *std::move(value);
}

// Writes (once) a safetensors file of `tensors` float32 tensors totalling about
// `bytes` in `dir`, and returns its path.
std::string ModelFile(const std::string& dir, int64_t tensors, uint64_t bytes);

// Returns the size of the file at `path` (0 if it cannot be read).
uint64_t FileSize(const std::string& path);

std::string ReadWholeFile(const std::string& path);

// Every contender receives into memory allocated the way modelstate's client
// allocates tensors (Storage::AllocateUninitialized: huge pages for large
// buffers), freshly for each transfer, so the comparison is of transports, not
// allocators. The previous buffer of the calling thread is freed on the next
// call, or by ReleaseFreshBuffer.
char* FreshBuffer(uint64_t size);

// Frees the calling thread's FreshBuffer now: a contender calls it at the end
// of its transfer, inside the timing, as a fetched state dict is dropped inside
// modelstate's, and so that no two models' worth of buffers are alive at once
// (the 4 GiB size of P10).
void ReleaseFreshBuffer();

// Binds a listening TCP socket on 127.0.0.1 to a free port, stored in `*port`.
int Listen(int* port);

// Connects to 127.0.0.1:`port`; returns the socket, or -1 if nothing listens.
int TryConnect(int port);

// Connects to 127.0.0.1:`port` or dies.
int Connect(int port);

// Write or read exactly `size` bytes; false if the connection ends first.
bool WriteAll(int fd, const char* data, size_t size);
bool ReadAll(int fd, char* data, size_t size);

}  // namespace modelstate::bench

#endif  // MODELSTATE_BENCH_COMMON_H_

#include "bench/common.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>

#include "absl/strings/str_format.h"
#include "model/safetensors.h"
#include "model/state_dict.h"
#include "model/tensor.h"

namespace modelstate::bench {

double Seconds() {
  return std::chrono::duration<double>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

double GBps(uint64_t bytes, double seconds) { return bytes / seconds / 1e9; }

double TimedGBps(uint64_t bytes, const std::function<void()>& transfer) {
  const double start = Seconds();
  transfer();
  return GBps(bytes, Seconds() - start);
}

void Die(const std::string& message) {
  std::fprintf(stderr, "modelstate_bench: %s\n", message.c_str());
  std::exit(1);
}

std::string ModelFile(const std::string& dir, int64_t tensors, uint64_t bytes) {
  const std::string path =
      absl::StrCat(dir, "/model-", tensors, "x", bytes, ".safetensors");
  if (FileSize(path) > bytes) return path;
  const int64_t floats = static_cast<int64_t>(bytes / 4 / tensors);
  StateDict state;
  uint64_t x = 88172645463325252ull;
  for (int64_t t = 0; t < tensors; ++t) {
    TensorBuilder builder =
        Check(TensorBuilder::CreateUninitialized(DType::kFloat32, {floats}),
              "allocate");
    float* data = builder.mutable_data_as<float>();
    for (int64_t i = 0; i < floats; ++i) {
      x ^= x << 13, x ^= x >> 7, x ^= x << 17;
      data[i] = static_cast<float>(static_cast<int32_t>(x >> 40)) * 1e-6f;
    }
    state.Set(absl::StrFormat("layers.%d.weight", t),
              std::move(builder).Build());
  }
  absl::Status written = WriteSafetensorsFile(path + ".tmp", state);
  if (!written.ok()) Die(written.ToString());
  std::rename((path + ".tmp").c_str(), path.c_str());
  return path;
}

uint64_t FileSize(const std::string& path) {
  struct stat info;
  if (stat(path.c_str(), &info) != 0) return 0;
  return static_cast<uint64_t>(info.st_size);
}

std::string ReadWholeFile(const std::string& path) {
  // Read straight into a string of the file's size: one copy of the bytes in
  // memory, even for P10's 4 GiB file.
  std::string bytes(FileSize(path), '\0');
  std::ifstream in(path, std::ios::binary);
  in.read(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  bytes.resize(static_cast<size_t>(in.gcount()));
  return bytes;
}

namespace {

std::shared_ptr<Storage>& ThreadBuffer() {
  static thread_local std::shared_ptr<Storage> buffer;
  return buffer;
}

}  // namespace

char* FreshBuffer(uint64_t size) {
  std::shared_ptr<Storage>& buffer = ThreadBuffer();
  buffer.reset();
  buffer = Check(Storage::AllocateUninitialized(size), "allocate");
  return reinterpret_cast<char*>(buffer->mutable_data());
}

void ReleaseFreshBuffer() { ThreadBuffer().reset(); }

namespace {

sockaddr_in Loopback(int port) {
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(port);
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  return addr;
}

}  // namespace

int Listen(int* port) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  int one = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  sockaddr_in addr = Loopback(0);
  if (bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0)
    Die("bind");
  socklen_t len = sizeof addr;
  getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  *port = ntohs(addr.sin_port);
  listen(fd, 64);
  return fd;
}

int TryConnect(int port) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  const sockaddr_in addr = Loopback(port);
  if (connect(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof addr) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

int Connect(int port) {
  const int fd = TryConnect(port);
  if (fd < 0) Die("connect");
  return fd;
}

bool WriteAll(int fd, const char* data, size_t size) {
  while (size > 0) {
    const ssize_t wrote = write(fd, data, size);
    if (wrote <= 0) return false;
    data += wrote;
    size -= static_cast<size_t>(wrote);
  }
  return true;
}

bool ReadAll(int fd, char* data, size_t size) {
  while (size > 0) {
    const ssize_t got = read(fd, data, size);
    if (got <= 0) return false;
    data += got;
    size -= static_cast<size_t>(got);
  }
  return true;
}

}  // namespace modelstate::bench

#include "bench/raw_tcp.h"

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <memory>
#include <string_view>

#include "bench/common.h"
#include "model/tensor.h"

namespace modelstate::bench {
namespace {

// The bytes of `file` in memory allocated as the daemon holds tensors
// (Storage: huge pages for large blocks), so both senders copy out of the same
// kind of memory.
std::shared_ptr<Storage> ReadIntoStorage(const std::string& file) {
  const uint64_t size = FileSize(file);
  std::shared_ptr<Storage> bytes =
      Check(Storage::AllocateUninitialized(size), "allocate");
  std::ifstream in(file, std::ios::binary);
  if (!in.read(reinterpret_cast<char*>(bytes->mutable_data()),
               static_cast<std::streamsize>(size))) {
    Die("cannot read " + file);
  }
  return bytes;
}

}  // namespace

void ServeTcp(const std::string& file) {
  const std::shared_ptr<Storage> file_bytes = ReadIntoStorage(file);
  const std::string_view bytes(
      reinterpret_cast<const char*>(file_bytes->data()), file_bytes->size());
  int port;
  const int listener = Listen(&port);
  std::printf("PORT %d\n", port);
  std::fflush(stdout);
  while (true) {
    const int fd = accept(listener, nullptr, nullptr);
    if (fd < 0) continue;
    char command;
    while (ReadAll(fd, &command, 1)) {
      if (command == 'G') {
        uint64_t size = bytes.size();
        if (!WriteAll(fd, reinterpret_cast<char*>(&size), 8) ||
            !WriteAll(fd, bytes.data(), bytes.size())) {
          break;
        }
      } else if (command == 'P') {
        uint64_t size;
        if (!ReadAll(fd, reinterpret_cast<char*>(&size), 8)) break;
        char* into = FreshBuffer(size);
        if (!ReadAll(fd, into, size) || !WriteAll(fd, "K", 1)) break;
      }
    }
    close(fd);
  }
}

RawTcpClient::RawTcpClient(int port) : fd_(Connect(port)) {
  int one = 1;
  setsockopt(fd_, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

RawTcpClient::~RawTcpClient() { close(fd_); }

uint64_t RawTcpClient::Request() {
  uint64_t size;
  if (!WriteAll(fd_, "G", 1) ||
      !ReadAll(fd_, reinterpret_cast<char*>(&size), 8)) {
    Die("tcp fetch");
  }
  return size;
}

uint64_t RawTcpClient::Fetch() {
  const uint64_t size = Request();
  if (!ReadAll(fd_, FreshBuffer(size), size)) Die("tcp fetch");
  ReleaseFreshBuffer();
  return size;
}

uint64_t RawTcpClient::FetchInto(char* into, uint64_t capacity) {
  const uint64_t size = Request();
  if (size > capacity) Die("tcp fetch: the file outgrew the buffer");
  if (!ReadAll(fd_, into, size)) Die("tcp fetch");
  return size;
}

void RawTcpClient::Push(const std::string& bytes) {
  const uint64_t size = bytes.size();
  char ack;
  if (!WriteAll(fd_, "P", 1) ||
      !WriteAll(fd_, reinterpret_cast<const char*>(&size), 8) ||
      !WriteAll(fd_, bytes.data(), size) || !ReadAll(fd_, &ack, 1)) {
    Die("tcp push");
  }
}

}  // namespace modelstate::bench

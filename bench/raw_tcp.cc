#include "bench/raw_tcp.h"

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdio>

#include "bench/common.h"

namespace modelstate::bench {

void ServeTcp(const std::string& file) {
  const std::string bytes = ReadWholeFile(file);
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

#include "bench/nginx.h"

#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <thread>

#include "absl/strings/str_format.h"
#include "bench/common.h"

namespace modelstate::bench {
namespace {

void WriteNginxConfig(const std::string& dir, const std::string& root,
                      const std::string& tmpfs_dir, int port) {
  std::ofstream(dir + "/nginx.conf") << absl::StrFormat(
      "worker_processes 1; daemon off; master_process off; pid %s/nginx.pid;\n"
      "error_log %s/error.log;\n"
      "events { worker_connections 256; }\n"
      "http { access_log off; sendfile on; tcp_nopush on; default_type "
      "application/octet-stream;\n"
      "  client_body_temp_path %s; proxy_temp_path %s; fastcgi_temp_path %s;\n"
      "  uwsgi_temp_path %s; scgi_temp_path %s;\n"
      "  server { listen 127.0.0.1:%d; root %s;\n"
      "    location /tmpfs/ { alias %s/; } } }\n",
      dir, dir, dir, dir, dir, dir, dir, port, root, tmpfs_dir);
}

struct CurlTarget {
  char* into;
  uint64_t at;
  uint64_t capacity;
};

size_t CurlWrite(char* data, size_t size, size_t count, void* user) {
  auto* target = static_cast<CurlTarget*>(user);
  const size_t bytes = size * count;
  if (target->at + bytes > target->capacity) return 0;
  std::memcpy(target->into + target->at, data, bytes);
  target->at += bytes;
  return bytes;
}

struct FileTarget {
  FILE* file;
  uint64_t at;
};

size_t FileWrite(char* data, size_t size, size_t count, void* user) {
  auto* target = static_cast<FileTarget*>(user);
  const size_t wrote = std::fwrite(data, size, count, target->file);
  target->at += wrote * size;
  return wrote * size;
}

}  // namespace

Child StartNginx(const std::string& work_dir, const std::string& tmpfs_dir) {
  int port;
  close(Listen(&port));
  const std::string dir = work_dir + "/nginx";
  mkdir(dir.c_str(), 0755);
  WriteNginxConfig(dir, work_dir, tmpfs_dir, port);
  Child child =
      Spawn({"/usr/sbin/nginx", "-p", dir, "-c", dir + "/nginx.conf"}, -1, "");
  child.port = port;
  for (int i = 0; i < 200; ++i) {  // wait until it accepts connections
    const int fd = TryConnect(port);
    if (fd >= 0) {
      close(fd);
      return child;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(25));
  }
  Die("nginx did not start; see " + dir + "/error.log");
}

CurlFetcher::CurlFetcher(std::string url) : url_(std::move(url)) {
  curl_global_init(CURL_GLOBAL_DEFAULT);
  curl_ = curl_easy_init();
  if (curl_ == nullptr) Die("curl_easy_init");
  curl_easy_setopt(curl_, CURLOPT_URL, url_.c_str());
  curl_easy_setopt(curl_, CURLOPT_FAILONERROR, 1L);
}

CurlFetcher::~CurlFetcher() { curl_easy_cleanup(curl_); }

uint64_t CurlFetcher::Fetch(uint64_t expected) {
  CurlTarget target{FreshBuffer(expected), 0, expected};
  curl_easy_setopt(curl_, CURLOPT_WRITEFUNCTION, CurlWrite);
  curl_easy_setopt(curl_, CURLOPT_WRITEDATA, &target);
  if (curl_easy_perform(curl_) != CURLE_OK) Die("curl fetch failed: " + url_);
  ReleaseFreshBuffer();
  return target.at;
}

uint64_t CurlFetcher::FetchToFile(const std::string& path) {
  FileTarget target{std::fopen(path.c_str(), "wb"), 0};
  if (target.file == nullptr) Die("cannot create " + path);
  curl_easy_setopt(curl_, CURLOPT_WRITEFUNCTION, FileWrite);
  curl_easy_setopt(curl_, CURLOPT_WRITEDATA, &target);
  const CURLcode code = curl_easy_perform(curl_);
  if (std::fclose(target.file) != 0 || code != CURLE_OK)
    Die("curl fetch to " + path + " failed: " + url_);
  return target.at;
}

}  // namespace modelstate::bench

// Contender (c): nginx 1.22 with sendfile serving the work directory's files,
// and a tmpfs directory's under /tmpfs/, fetched with libcurl.
#ifndef MODELSTATE_BENCH_NGINX_H_
#define MODELSTATE_BENCH_NGINX_H_

#include <curl/curl.h>

#include <cstdint>
#include <string>
#include <utility>

#include "bench/child_process.h"

namespace modelstate::bench {

// Starts /usr/sbin/nginx on a free loopback port serving `work_dir` at / and
// `tmpfs_dir` at /tmpfs/ (its configuration and logs go to `work_dir`/nginx)
// and waits up to 5 s until it accepts connections. Dies if it does not.
Child StartNginx(const std::string& work_dir, const std::string& tmpfs_dir);

// Fetches one URL with a reused libcurl handle (so its connection is kept
// alive between fetches). Dies on any error, an HTTP error status included.
// Not thread-safe.
class CurlFetcher {
 public:
  explicit CurlFetcher(std::string url);
  ~CurlFetcher();
  CurlFetcher(const CurlFetcher&) = delete;
  CurlFetcher& operator=(const CurlFetcher&) = delete;

  // Receives the URL's body into fresh memory of `expected` bytes (fails if
  // it is longer); returns the bytes received.
  uint64_t Fetch(uint64_t expected);

  // Writes the URL's body to a new file at `path` with stdio, as the curl
  // command line tool does; returns the bytes written.
  uint64_t FetchToFile(const std::string& path);

 private:
  std::string url_;
  CURL* curl_;
};

}  // namespace modelstate::bench

#endif  // MODELSTATE_BENCH_NGINX_H_

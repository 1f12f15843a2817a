// Contender (c): nginx 1.22 with sendfile serving the work directory's files,
// fetched with libcurl.
#ifndef MODELSTATE_BENCH_NGINX_H_
#define MODELSTATE_BENCH_NGINX_H_

#include <curl/curl.h>

#include <cstdint>
#include <string>

#include "bench/child_process.h"

namespace modelstate::bench {

// Starts /usr/sbin/nginx on a free loopback port serving `work_dir` (its
// configuration and logs go to `work_dir`/nginx) and waits up to 5 s until it
// accepts connections. Dies if it does not.
Child StartNginx(const std::string& work_dir);

// Fetches one URL with a reused libcurl handle (so its connection is kept
// alive between fetches). Dies on any error. Not thread-safe.
class CurlFetcher {
 public:
  explicit CurlFetcher(std::string url);
  ~CurlFetcher();
  CurlFetcher(const CurlFetcher&) = delete;
  CurlFetcher& operator=(const CurlFetcher&) = delete;

  // Receives the URL's body into fresh memory of `expected` bytes (fails if
  // it is longer); returns the bytes received.
  uint64_t Fetch(uint64_t expected);

 private:
  std::string url_;
  CURL* curl_;
};

}  // namespace modelstate::bench

#endif  // MODELSTATE_BENCH_NGINX_H_

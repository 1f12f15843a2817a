#include "bench/child_process.h"

#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <thread>

#include "bench/common.h"

namespace modelstate::bench {

Child Spawn(std::vector<std::string> argv, int output_fd,
            const std::string& port_marker) {
  int pipe_fds[2] = {-1, -1};
  if (output_fd >= 0 && pipe(pipe_fds) != 0) Die("pipe");
  Child child;
  child.pid = fork();
  if (child.pid == 0) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);  // never outlive the driver
    if (output_fd >= 0) {
      dup2(pipe_fds[1], output_fd);
      close(pipe_fds[0]);
    }
    std::vector<char*> args;
    for (std::string& arg : argv) args.push_back(arg.data());
    args.push_back(nullptr);
    execv(args[0], args.data());
    _exit(127);
  }
  if (output_fd < 0) return child;
  close(pipe_fds[1]);
  std::string seen;
  char c;
  while (read(pipe_fds[0], &c, 1) == 1) {
    seen += c;
    const size_t at = seen.find(port_marker);
    if (c == '\n' && at != std::string::npos) {
      child.port = std::atoi(seen.c_str() + at + port_marker.size());
      break;
    }
  }
  // Keep draining the child's output so it never blocks on a full pipe.
  std::thread([fd = pipe_fds[0]] {
    char buffer[4096];
    while (read(fd, buffer, sizeof buffer) > 0) {
    }
    close(fd);
  }).detach();
  if (child.port == 0)
    Die("child did not report a port: " + argv[0] + " " + seen);
  return child;
}

void Stop(Child& child) {
  if (child.pid > 0) {
    kill(child.pid, SIGTERM);
    waitpid(child.pid, nullptr, 0);
    child.pid = -1;
  }
}

long PeakRssBytes(pid_t pid) {
  std::ifstream status("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("VmHWM:", 0) == 0) return std::atol(line.c_str() + 6) * 1024;
  }
  return 0;
}

void ResetPeakRss(pid_t pid) {
  std::ofstream("/proc/" + std::to_string(pid) + "/clear_refs") << "5";
}

}  // namespace modelstate::bench

#include "bench/child_process.h"

#include <signal.h>

#include <cstdlib>
#include <fstream>
#include <utility>

#include "bench/common.h"

namespace modelstate::bench {

Child Spawn(std::vector<std::string> argv, int output_fd,
            const std::string& port_marker) {
  SubprocessOptions options;  // Killed if the driver dies.
  const Subprocess::Stream stream = output_fd == 1
                                        ? Subprocess::Stream::kStdout
                                        : Subprocess::Stream::kStderr;
  if (output_fd == 1) options.stdout_to = OutputTarget::Pipe();
  if (output_fd == 2) options.stderr_to = OutputTarget::Pipe();
  const std::string program = argv[0];
  absl::StatusOr<std::unique_ptr<Subprocess>> process =
      Subprocess::Spawn(std::move(argv), options);
  if (!process.ok()) Die(program + ": " + process.status().ToString());
  Child child;
  child.pid = (*process)->pid();
  child.process = *std::move(process);
  if (output_fd < 0) return child;
  absl::StatusOr<std::string> line =
      child.process->WaitForLine(stream, port_marker, absl::Seconds(120));
  if (!line.ok()) {
    Die("child did not report a port: " + program + " " +
        line.status().ToString());
  }
  child.port =
      std::atoi(line->c_str() + line->find(port_marker) + port_marker.size());
  return child;
}

void Stop(Child& child) {
  if (child.process == nullptr) return;
  (void)child.process->Signal(SIGTERM);
  if (!child.process->Wait(absl::Seconds(60)).ok()) child.process->Kill();
  child.process.reset();
  child.pid = -1;
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

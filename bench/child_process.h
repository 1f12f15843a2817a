// The driver's child processes (modelstated, the contenders' servers, nginx)
// and the memory figures read from them.
#ifndef MODELSTATE_BENCH_CHILD_PROCESS_H_
#define MODELSTATE_BENCH_CHILD_PROCESS_H_

#include <sys/types.h>

#include <memory>
#include <string>
#include <vector>

#include "tests/subprocess.h"

namespace modelstate::bench {

struct Child {
  std::unique_ptr<Subprocess> process;  // Null once stopped.
  pid_t pid = -1;
  int port = 0;
};

// Starts `argv` (argv[0] is the executable's path) as a child that is killed
// when the driver dies. With `output_fd` 1 or 2, that output of the child goes
// to a pipe read until a line containing `port_marker` followed by the port
// number, which is returned in the Child; the pipe is then drained in the
// background so the child never blocks on it. Dies if the child ends before
// reporting a port. With `output_fd` -1 the child shares the driver's output
// and the returned port is 0.
Child Spawn(std::vector<std::string> argv, int output_fd,
            const std::string& port_marker);

// Sends SIGTERM and waits for the child to end; does nothing if it was stopped.
void Stop(Child& child);

// The peak resident set size of process `pid` since its start or the last
// ResetPeakRss (VmHWM), in bytes; 0 if unknown.
long PeakRssBytes(pid_t pid);

// Restarts the peak RSS measurement of `pid` from its current RSS.
void ResetPeakRss(pid_t pid);

}  // namespace modelstate::bench

#endif  // MODELSTATE_BENCH_CHILD_PROCESS_H_

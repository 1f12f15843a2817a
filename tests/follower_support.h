// Helpers of the end-to-end follower tests (replication_test,
// follower_fleet_test): a follower's flags and a model's version as a daemon
// serves it.
#ifndef MODELSTATE_TESTS_FOLLOWER_SUPPORT_H_
#define MODELSTATE_TESTS_FOLLOWER_SUPPORT_H_

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "client/client.h"

namespace modelstate::follower_support {

// Flags of a quiet follower of `upstream` that retries fast.
inline std::vector<std::string> FollowerArgs(
    const std::string& upstream, std::vector<std::string> extra = {}) {
  std::vector<std::string> args = {"--follow=" + upstream, "--log_rpcs=false",
                                   "--follow_retry_max=200ms",
                                   "--metrics_listen=127.0.0.1:0"};
  args.insert(args.end(), extra.begin(), extra.end());
  return args;
}

// A model's version and per-tensor checksums on a daemon.
struct Version {
  int64_t version = 0;  // 0: the daemon does not have the model.
  std::map<std::string, uint64_t> checksums;
  bool operator==(const Version& other) const {
    return version == other.version && checksums == other.checksums;
  }
};

inline Version VersionOf(Client& client, const std::string& model) {
  Version out;
  absl::StatusOr<ModelManifest> manifest = client.GetModel(model);
  if (!manifest.ok()) return out;
  out.version = manifest->version;
  for (const TensorDescription& tensor : manifest->tensors)
    out.checksums[tensor.name] = tensor.checksum;
  return out;
}

}  // namespace modelstate::follower_support

#endif  // MODELSTATE_TESTS_FOLLOWER_SUPPORT_H_

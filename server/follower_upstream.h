// A follower's upstream over gRPC: another modelstated (a primary or a
// follower) reached through the C++ client, with the same TLS and credential
// options as any client.
//
// Thread-safety: every method may be called from any thread.
#ifndef MODELSTATE_SERVER_FOLLOWER_UPSTREAM_H_
#define MODELSTATE_SERVER_FOLLOWER_UPSTREAM_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "client/client.h"
#include "store/follower.h"

namespace modelstate {

class GrpcUpstream : public Upstream {
 public:
  // A client of `target` (connecting lazily). Returns InvalidArgument for
  // unreadable TLS files.
  static absl::StatusOr<std::unique_ptr<GrpcUpstream>> Connect(
      const std::string& target, const ClientOptions& options);

  std::string name() const override { return target_; }
  absl::Status WatchAll(
      const std::function<bool(const ModelEvent&)>& on_event) override;
  absl::StatusOr<ModelManifest> Describe(const std::string& model,
                                         int64_t version) override;
  absl::StatusOr<StateDict> Fetch(
      const std::string& model, int64_t version,
      const std::vector<std::string>& keys,
      const std::function<void(uint64_t)>& progress) override;
  void Cancel() override;

 private:
  GrpcUpstream(std::string target, std::unique_ptr<Client> unary,
               std::unique_ptr<Client> streams)
      : target_(std::move(target)),
        unary_(std::move(unary)),
        streams_(std::move(streams)) {}

  const std::string target_;
  // Describe calls carry a deadline, so a hung upstream cannot stall the
  // follower (or its stop) for long; streams do not, since transfers may be
  // long, and end through the canceller instead, or through the options'
  // keepalive when the upstream goes silent.
  std::unique_ptr<Client> unary_;
  std::unique_ptr<Client> streams_;
  CallCanceller canceller_;
};

}  // namespace modelstate

#endif  // MODELSTATE_SERVER_FOLLOWER_UPSTREAM_H_

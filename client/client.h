// modelstate::Client: a thin C++ client of the modelstate.v1.ModelState
// service.
//
// Every call returns absl::Status / absl::StatusOr with the server's gRPC code
// and message. Thread-safety: a Client may be used from several threads at once
// (one channel, many calls).
#ifndef MODELSTATE_CLIENT_CLIENT_H_
#define MODELSTATE_CLIENT_CLIENT_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "absl/types/optional.h"
#include "core/model_store.h"
#include "core/requests.h"
#include "core/state_dict.h"
#include "core/tensor.h"
#include "modelstate/v1/model_state.grpc.pb.h"

namespace modelstate {

struct ClientOptions {
  // TLS: set `use_tls` (system roots) or a CA file; a cert and key add a client
  // certificate (mTLS).
  bool use_tls = false;
  std::string tls_ca_file;
  std::string tls_cert_file;
  std::string tls_key_file;
  // Name to verify the server certificate against, when it differs from the
  // target's host.
  std::string tls_server_name;
  // Deadline of each call; infinite by default since transfers can be long.
  absl::Duration timeout = absl::InfiniteDuration();
  // Open a TCP connection of this client's own instead of sharing one with
  // other clients of the same target in this process (gRPC's global subchannel
  // pool). Parallel fetchers in one process want this.
  bool own_connection = false;
  // gRPC load-balancing policy, e.g. "round_robin" to spread calls over every
  // address the target resolves to (a headless Service behind dns:///, or
  // "ipv4:10.0.0.1:50551,10.0.0.2:50551"); empty for gRPC's default
  // (pick_first).
  std::string load_balancing_policy;
};

// Called with (bytes done, bytes in all) as a transfer advances.
using ProgressCallback = std::function<void(uint64_t, uint64_t)>;

// How a state dict travels; what it selects is the FetchRequest or
// LoadRequest (core/requests.h).
struct TransferOptions {
  // Bytes per data chunk, at most kMaxChunkBytes; 0: the server's default for
  // fetches, kDefaultChunkBytes for loads.
  uint32_t chunk_bytes = 0;
  ProgressCallback progress;
  // StateDictStreaming only: called once with the stream's manifest (names,
  // kinds, dtypes and shapes as delivered, after selection and casting),
  // before any tensor. Returning an error stops the transfer with that error.
  std::function<absl::Status(const std::vector<TensorDescription>&)>
      on_manifest;
};

struct FetchedStateDict {
  std::string model;
  int64_t version = 0;
  StateDict state;  // Keys in torch's order; every tensor's checksum verified.
};

class Client {
 public:
  // Creates a client for `target` ("host:port", "dns:///name:port", ...). Does
  // not wait for the connection. Returns InvalidArgument for unreadable TLS
  // files.
  static absl::StatusOr<std::unique_ptr<Client>> Connect(
      const std::string& target, const ClientOptions& options = {});

  // Returns every model, ordered by name.
  absl::StatusOr<std::vector<ModelSummary>> ListModels();

  // Returns a model's manifest (of one submodule when `module` is set).
  // NotFound if unknown.
  absl::StatusOr<ModelManifest> GetModel(const std::string& model,
                                         const std::string& module = "",
                                         int64_t version = 0);

  // Makes retained version `version` current again as a new version; returns
  // the model's summary at that new version. NotFound if the version is not
  // retained.
  absl::StatusOr<ModelSummary> RollbackModel(const std::string& model,
                                             int64_t version);

  // Creates a model from an architecture spec. AlreadyExists if the name is
  // taken.
  absl::StatusOr<ModelSummary> CreateModel(const std::string& model,
                                           const std::string& architecture_json,
                                           uint64_t seed = 0);

  absl::Status DeleteModel(const std::string& model);

  // Fetches a state dict. Each tensor is written once, in place, and its
  // checksum verified (DataLoss otherwise). A stream cut short is Unavailable
  // or DataLoss, never a partial result.
  absl::StatusOr<FetchedStateDict> StateDict(
      const FetchRequest& request, const TransferOptions& transfer = {});

  // Fetches a state dict tensor by tensor: `on_tensor` gets each one as soon as
  // it is complete and verified, and the client keeps no reference to it
  // afterwards, so a worker can copy into its own buffers while at most one
  // tensor of ours is alive. Returns the version fetched, or the first error
  // (including the callback's).
  absl::StatusOr<int64_t> StateDictStreaming(
      const FetchRequest& request, const TransferOptions& transfer,
      const std::function<absl::Status(const TensorDescription&, Tensor)>&
          on_tensor);

  // Loads `state` into `request.model` (torch's load_state_dict); all or
  // nothing on the server. Strict-key and shape errors are FailedPrecondition
  // with torch's text; Aborted when `expected_version` differs.
  absl::StatusOr<LoadOutcome> LoadStateDict(
      const LoadRequest& request, const modelstate::StateDict& state,
      const TransferOptions& transfer = {});

  // Delivers the model's events to `on_event` until it returns false or the
  // server ends the stream. Returns OK when `on_event` stopped it, otherwise
  // the stream's status.
  // The first event is kCurrent or kAbsent.
  absl::Status Watch(const std::string& model,
                     const std::function<bool(const ModelEvent&)>& on_event);

  // Asks grpc.health.v1 about `service` ("" for the whole server). Returns true
  // for SERVING, false for NOT_SERVING, or the call's error (NotFound for an
  // unknown service).
  absl::StatusOr<bool> CheckHealth(const std::string& service = "");

  // The channel, for other services such as reflection.
  const std::shared_ptr<grpc::Channel>& channel() const { return channel_; }

 private:
  Client(std::shared_ptr<grpc::Channel> channel, ClientOptions options);
  void Prepare(grpc::ClientContext* context) const;

  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::ModelState::Stub> stub_;
  ClientOptions options_;
};

}  // namespace modelstate

#endif  // MODELSTATE_CLIENT_CLIENT_H_

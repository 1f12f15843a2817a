#include "server/follower_upstream.h"

#include <utility>

#include "common/status_macros.h"

namespace modelstate {
namespace {

// Deadline of each Describe (GetModel) call.
constexpr absl::Duration kDescribeTimeout = absl::Seconds(10);

// Resumes of one Fetch after dropped connections, each from the byte reached,
// of the pinned version (TransferOptions::max_resumes). With the client's
// backoff between them (capped at 1 s) they span about half a minute, so a
// sync outlives an upstream restart or a short partition instead of fetching
// again what it had received; Stop ends them through the canceller.
constexpr int kFetchResumes = 30;

}  // namespace

absl::StatusOr<std::unique_ptr<GrpcUpstream>> GrpcUpstream::Connect(
    const std::string& target, const ClientOptions& options) {
  ClientOptions unary_options = options;
  unary_options.timeout = kDescribeTimeout;
  ASSIGN_OR_RETURN(std::unique_ptr<Client> unary,
                   Client::Connect(target, unary_options));
  ClientOptions stream_options = options;
  stream_options.timeout = absl::InfiniteDuration();
  ASSIGN_OR_RETURN(std::unique_ptr<Client> streams,
                   Client::Connect(target, stream_options));
  return std::unique_ptr<GrpcUpstream>(
      new GrpcUpstream(target, std::move(unary), std::move(streams)));
}

absl::Status GrpcUpstream::WatchAll(
    const std::function<bool(const ModelEvent&)>& on_event) {
  return streams_->WatchAll(on_event, &canceller_);
}

absl::StatusOr<ModelManifest> GrpcUpstream::Describe(const std::string& model,
                                                     int64_t version) {
  if (canceller_.cancelled()) return absl::CancelledError("follower stopped");
  return unary_->GetModel(model, "", version);
}

absl::StatusOr<StateDict> GrpcUpstream::Fetch(
    const std::string& model, int64_t version,
    const std::vector<std::string>& keys,
    const std::function<void(uint64_t)>& progress) {
  FetchRequest request(model);
  request.version = version;
  request.keys = keys;
  TransferOptions transfer;
  transfer.canceller = &canceller_;
  transfer.max_resumes = kFetchResumes;
  if (progress) {
    transfer.progress = [&progress](uint64_t received, uint64_t) {
      progress(received);
    };
  }
  // Versions share the tensors a load left unchanged: a packed block would
  // keep the replaced neighbours of a kept tensor alive.
  transfer.packing = TensorPacking::kOwnStorage;
  ASSIGN_OR_RETURN(FetchedStateDict fetched,
                   streams_->StateDict(request, transfer));
  if (fetched.version != version) {
    return absl::DataLossError("the upstream sent another version");
  }
  return std::move(fetched.state);
}

void GrpcUpstream::Cancel() { canceller_.Cancel(); }

}  // namespace modelstate

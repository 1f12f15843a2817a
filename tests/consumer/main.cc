// A downstream program of the installed modelstate package: it builds a state
// dict and calls a server that is not there, which proves the headers, the
// libraries and their dependencies (gRPC, Abseil, protobuf, xxHash) all link.
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "client/client.h"
#include "model/state_dict.h"
#include "model/tensor.h"

int main() {
  modelstate::ClientOptions options;
  options.timeout = absl::Seconds(10);
  absl::StatusOr<std::unique_ptr<modelstate::Client>> client =
      modelstate::Client::Connect("127.0.0.1:1", options);
  if (!client.ok()) {
    std::fprintf(stderr, "Connect: %s\n", client.status().ToString().c_str());
    return 1;
  }
  // Nothing listens on port 1: gRPC must refuse the call as UNAVAILABLE.
  absl::StatusOr<std::vector<modelstate::ModelSummary>> models =
      (*client)->ListModels();
  if (models.status().code() != absl::StatusCode::kUnavailable) {
    std::fprintf(stderr, "ListModels: expected UNAVAILABLE, got %s\n",
                 models.status().ToString().c_str());
    return 1;
  }

  absl::StatusOr<modelstate::Tensor> weight =
      modelstate::Tensor::Zeros(modelstate::DType::kFloat32, {2, 3});
  if (!weight.ok()) {
    std::fprintf(stderr, "Zeros: %s\n", weight.status().ToString().c_str());
    return 1;
  }
  modelstate::StateDict state;
  state.Set("linear.weight", *weight);
  if (state.TotalBytes() != 24 || state.Find("linear.weight") == nullptr) {
    std::fprintf(stderr, "unexpected state dict of %zu bytes\n",
                 state.TotalBytes());
    return 1;
  }
  std::printf("consumer ok: %zu tensor, %zu bytes; server: %s\n", state.size(),
              state.TotalBytes(), models.status().ToString().c_str());
  return 0;
}

#include "store/requests.h"

#include <vector>

namespace modelstate {

std::vector<TensorDescription> DescribeTensors(const StateDict& state) {
  std::vector<TensorDescription> tensors;
  tensors.reserve(state.size());
  for (const StateDict::Entry& entry : state.entries()) {
    tensors.push_back(TensorDescription{
        entry.key, entry.kind, entry.tensor.dtype(), entry.tensor.shape(),
        entry.tensor.num_bytes(), entry.tensor.Checksum()});
  }
  return tensors;
}

std::vector<Tensor> FetchPlan::SentTensors() const {
  std::vector<Tensor> sent;
  sent.reserve(state->size());
  for (size_t i = 0; i < state->size(); ++i) {
    if (shared_with.empty() || shared_with[i] < 0)
      sent.push_back(state->entries()[i].tensor);
  }
  return sent;
}

uint64_t FetchPlan::SentBytes() const {
  if (shared_with.empty()) return state->TotalBytes();
  uint64_t bytes = 0;
  for (size_t i = 0; i < state->size(); ++i) {
    if (shared_with[i] < 0) bytes += state->entries()[i].tensor.num_bytes();
  }
  return bytes;
}

StateDictOptions ToStateDictOptions(const FetchRequest& request) {
  StateDictOptions options;
  options.module = request.module;
  options.keep_module_prefix = request.keep_module_prefix;
  options.recurse = request.recurse;
  options.include_buffers = request.include_buffers;
  options.keys = request.keys;
  return options;
}

}  // namespace modelstate

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

// The architecture-spec factory (CreateModel's spec) on arbitrary JSON text. A
// spec that builds must give a state dict, and building it again with the same
// seed must give the same tensors.
#include <cstdint>
#include <string>

#include "absl/strings/string_view.h"
#include "model/module_factory.h"
#include "model/state_dict.h"

namespace modelstate {
namespace {

void FuzzOne(absl::string_view spec) {
  absl::StatusOr<ModulePtr> model = BuildModuleFromSpec(spec);
  if (!model.ok()) return;
  absl::StatusOr<StateDict> state = GetStateDict(*model);
  if (!state.ok()) __builtin_trap();
  absl::StatusOr<ModulePtr> again = BuildModuleFromSpec(spec);
  if (!again.ok()) __builtin_trap();
  absl::StatusOr<StateDict> state_again = GetStateDict(*again);
  if (!state_again.ok() || state_again->size() != state->size())
    __builtin_trap();
  for (size_t i = 0; i < state->size(); ++i) {
    const StateDict::Entry& a = state->entries()[i];
    const StateDict::Entry& b = state_again->entries()[i];
    if (a.key != b.key || !a.tensor.BitwiseEquals(b.tensor)) __builtin_trap();
  }
}

}  // namespace
}  // namespace modelstate

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  modelstate::FuzzOne(
      absl::string_view(reinterpret_cast<const char*>(data), size));
  return 0;
}

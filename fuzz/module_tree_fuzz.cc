// The create-from-tensors tree builder (LoadStateDict with create_if_missing)
// on keys, buffer keys and class names taken from the input. Input: lines;
// "b <key>" names a buffer key, "c <path>=<class>" a class name, any other line
// is a state-dict key (one small tensor each). A tree that builds must hold
// exactly the given tensors under the given keys, buffers where asked.
#include <cstdint>
#include <string>
#include <vector>

#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "model/module_tree.h"
#include "model/state_dict.h"

namespace modelstate {
namespace {

struct Input {
  StateDict state;
  ModuleTreeOptions options;
};

Input Parse(absl::string_view text) {
  Input input;
  int n = 0;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    if (absl::ConsumePrefix(&line, "b ")) {
      input.options.buffer_keys.emplace_back(line);
    } else if (absl::ConsumePrefix(&line, "c ")) {
      std::pair<std::string, std::string> name =
          absl::StrSplit(line, absl::MaxSplits('=', 1));
      input.options.class_names.insert(std::move(name));
    } else {
      // Distinct shapes, so a tensor under the wrong key is noticed.
      const int64_t elements = n++ % 4;
      input.state.Set(std::string(line),
                      Tensor::Zeros(DType::kUInt8, {elements}).value());
    }
  }
  return input;
}

void FuzzOne(absl::string_view text) {
  Input input = Parse(text);
  absl::StatusOr<ModulePtr> tree =
      BuildModuleFromStateDict(input.state, input.options);
  if (!tree.ok()) return;
  absl::StatusOr<StateDict> out = GetStateDict(*tree);
  if (!out.ok() || out->size() != input.state.size()) __builtin_trap();
  for (const StateDict::Entry& entry : input.state.entries()) {
    const Tensor* got = out->Find(entry.key);
    if (got == nullptr || !got->SharesBytesWith(entry.tensor)) __builtin_trap();
  }
  for (const std::string& key : input.options.buffer_keys) {
    for (const StateDict::Entry& entry : out->entries()) {
      if (entry.key == key && entry.kind != TensorKind::kBuffer)
        __builtin_trap();
    }
  }
}

}  // namespace
}  // namespace modelstate

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  modelstate::FuzzOne(
      absl::string_view(reinterpret_cast<const char*>(data), size));
  return 0;
}

// torch.nn.Module.state_dict / load_state_dict, with PyTorch's key order, rules
// and messages (see docs/design.md for the one deliberate difference: loads are
// all-or-nothing).
#ifndef MODELSTATE_MODEL_STATE_DICT_H_
#define MODELSTATE_MODEL_STATE_DICT_H_

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/optional.h"
#include "absl/types/span.h"
#include "model/module.h"
#include "model/tensor.h"

namespace modelstate {

// An ordered mapping from dotted key to tensor, plus torch's `_metadata`
// (module path -> version).
class StateDict {
 public:
  StateDict() = default;
  StateDict(const StateDict& other);
  StateDict& operator=(const StateDict& other);
  StateDict(StateDict&&) = default;
  StateDict& operator=(StateDict&& other);

  struct Entry {
    std::string key;
    Tensor tensor;
    TensorKind kind = TensorKind::kParameter;  // As the module registered it.
  };

  // Appends `key`, or replaces the tensor of an existing key in place (keeping
  // its position), as assigning into a Python OrderedDict does.
  void Set(std::string key, Tensor tensor,
           TensorKind kind = TensorKind::kParameter);

  // Appends `key`. Returns InvalidArgument if the key is already present.
  absl::Status Insert(std::string key, Tensor tensor,
                      TensorKind kind = TensorKind::kParameter);

  // Makes room for `entries` keys in all, so that adding that many moves
  // nothing (a received state dict knows its size from the manifest).
  void Reserve(size_t entries);

  // Returns the tensor under `key`, or null.
  const Tensor* Find(absl::string_view key) const;

  const std::vector<Entry>& entries() const { return entries_; }
  size_t size() const { return entries_.size(); }
  bool empty() const { return entries_.empty(); }
  std::vector<std::string> Keys() const;
  // The tensors in key order (sharing storage), for a transfer.
  std::vector<Tensor> Tensors() const;

  // Sum of the tensors' byte sizes (a shared tensor counts once per key).
  size_t TotalBytes() const;

  // Estimated heap bytes this object holds beyond its tensors' storages:
  // entries, keys, shapes, indexes and module metadata, at their capacities
  // and as glibc's allocator rounds each block. What keeping it costs.
  int64_t HeapBytes() const;

  // torch's state_dict._metadata: module path ("" for the root) -> module
  // version.
  void SetModuleVersion(std::string module_path, int version);
  absl::optional<int> ModuleVersion(absl::string_view module_path) const;
  const std::vector<std::pair<std::string, int>>& metadata() const {
    return metadata_;
  }

 private:
  // Appends an entry for a key not present.
  void Append(std::string key, Tensor tensor, TensorKind kind);
  // Points index_ at entries_' keys again.
  void RebuildIndex();

  std::vector<Entry> entries_;
  // Position by key. The views point into entries_' keys, so a key is held
  // once: its characters move only when entries_ reallocates (a short key
  // sits inside its string object), and then the index is rebuilt. Moving a
  // StateDict moves entries_' buffer, which keeps them where they are.
  absl::flat_hash_map<absl::string_view, size_t> index_;
  std::vector<std::pair<std::string, int>> metadata_;
  absl::flat_hash_map<std::string, size_t> metadata_index_;
};

struct StateDictOptions {
  // Dotted path of the submodule whose state is wanted ("" for the whole
  // model).
  std::string module;
  // With a submodule: keep its path in the keys ("encoder.fc.weight") rather
  // than "fc.weight". Like torch.distributed.checkpoint's
  // keep_module_prefixes.
  bool keep_module_prefix = true;
  // Extra prefix put before every key (torch's `prefix` argument).
  std::string prefix;
  // False: only the module's own tensors, not its children's.
  bool recurse = true;
  // False: parameters only.
  bool include_buffers = true;
  // When non-empty, only these keys (full keys as they would be emitted), in
  // this order. A key that the state dict does not have is NotFound.
  std::vector<std::string> keys;

  // True when these options select the whole model's state dict as
  // model.state_dict() gives it (keep_module_prefix matters only with a
  // module). A field added above must be considered here.
  bool SelectsWholeModel() const {
    return module.empty() && prefix.empty() && recurse && include_buffers &&
           keys.empty();
  }
};

// Appends the state dict of `root` (or of its submodule) to `destination`,
// exactly as torch's state_dict(destination, prefix) does: per module its
// non-None parameters, then its persistent non-None buffers, then each non-None
// child, depth first; aliases are emitted under each name. Tensors are shared,
// never copied. Returns NotFound for an unknown submodule or key.
absl::Status AppendStateDict(const ModulePtr& root,
                             const StateDictOptions& options,
                             StateDict* destination);

// Returns the state dict of `root` as AppendStateDict does into an empty
// destination.
absl::StatusOr<StateDict> GetStateDict(const ModulePtr& root,
                                       const StateDictOptions& options = {});

// Per entry of `state`, the index of the first earlier entry holding the same
// tensor (same bytes, dtype and shape: torch's tied parameters), or -1. Empty
// tensors are never shared.
std::vector<int64_t> SharedEntries(const StateDict& state);

// Returns `state` with every floating tensor (IsFloatingPoint) converted to
// `dtype` as torch's
// `.to(dtype)` does; other tensors are shared unchanged. InvalidArgument unless
// `dtype` is floating.
absl::StatusOr<StateDict> CastFloatingTensors(const StateDict& state,
                                              DType dtype);

// The name, dtype and shape of a tensor offered for loading (all a load plan
// needs).
struct TensorSpec {
  std::string key;
  DType dtype;
  Shape shape;
};

struct LoadOptions {
  bool strict = true;
  // Replace the module's tensors with the checkpoint's (keeping the
  // checkpoint's dtype) instead of converting into the module's dtype.
  bool assign = false;
  // Dotted path of the submodule to load into; keys are relative to it.
  std::string module;
};

// Where one input tensor goes.
struct LoadTarget {
  std::vector<size_t>
      child_path;  // Child indices from the load root to the owning module.
  TensorKind kind;
  size_t slot;
  DType dtype;          // The dtype the stored tensor will have.
  Shape shape;          // The stored shape (the model's).
  bool squeeze_scalar;  // Checkpoint [1] into a model [] tensor.
};

// The outcome of validating a load against a model, before any tensor data is
// needed.
struct LoadPlan {
  std::string root_type;
  std::vector<std::string> missing_keys;
  std::vector<std::string> unexpected_keys;
  // Parallel to the input specs: the destination, or nothing for unexpected or
  // ignored keys.
  std::vector<absl::optional<LoadTarget>> targets;
  // Input indices with a target, in torch's traversal order (which decides ties
  // and aliases).
  std::vector<size_t> apply_order;
  // Bytes that converting inputs into their destination dtype allocates (0
  // without casts).
  int64_t conversion_bytes = 0;
};

// What the load rules see of a module that lives outside this library (a
// torch nn.Module in the Python client): its class, its own tensors' dtypes
// and shapes, and its children. It answers the questions PlanLoad asks of a
// Module, so that both are checked by the one rule.
class ModuleLayout {
 public:
  // A tensor as the rules see it; `lazy` is torch's UninitializedParameter,
  // whose shape nothing is checked against.
  struct TensorShape {
    DType dtype_value = DType::kFloat32;
    Shape shape_value;
    bool lazy = false;
    DType dtype() const { return dtype_value; }
    const Shape& shape() const { return shape_value; }
  };
  struct Slot {
    std::string name;
    absl::optional<TensorShape> tensor;  // Empty: registered as None.
    bool persistent = true;              // Buffers only.
  };
  struct Child {
    std::string name;
    std::shared_ptr<const ModuleLayout> module;  // Null: registered as None.
  };

  explicit ModuleLayout(std::string type_name)
      : type_name_(std::move(type_name)) {}

  void AddTensor(TensorKind kind, Slot slot);
  void AddChild(std::string name, std::shared_ptr<const ModuleLayout> child);

  const std::string& type_name() const { return type_name_; }
  const std::vector<Slot>& slots(TensorKind kind) const {
    return kind == TensorKind::kParameter ? parameters_ : buffers_;
  }
  const std::vector<Child>& children() const { return children_; }
  int64_t FindChildIndex(absl::string_view name) const;
  const Slot* FindTensor(absl::string_view name) const;

 private:
  std::string type_name_;
  std::vector<Slot> parameters_, buffers_;
  std::vector<Child> children_;
};

// Validates loading tensors described by `inputs` into `root` (or its
// submodule) with torch's rules. `metadata`, when given, supplies module
// versions for BatchNorm's num_batches_tracked rule. Returns NotFound for an
// unknown submodule, InvalidArgument for duplicate input keys, and
// FailedPrecondition carrying torch's exact text ("Error(s) in loading
// state_dict for X:\n\t...") for size mismatches, and for missing or unexpected
// keys when strict.
absl::StatusOr<LoadPlan> PlanLoad(const ModulePtr& root,
                                  absl::Span<const TensorSpec> inputs,
                                  const LoadOptions& options,
                                  const StateDict* metadata = nullptr);

// PlanLoad's rules over a layout (torch's module-version rules see no
// metadata, as for a state dict without `_metadata`). The targets' child_path
// and slot index into `root`'s children() and slots().
absl::StatusOr<LoadPlan> PlanLoad(const ModuleLayout& root,
                                  absl::Span<const TensorSpec> inputs,
                                  const LoadOptions& options);

// torch's texts, built here only. "size mismatch for <key>: copying a param
// with shape torch.Size([..]) from checkpoint, the shape in current model is
// torch.Size([..])."
std::string SizeMismatchText(absl::string_view key, const Shape& checkpoint,
                             const Shape& model);

// FailedPrecondition "Error(s) in loading state_dict for <root_type>:\n\t"
// followed by the missing keys, the unexpected keys (each only when `strict`)
// and `problems`, as torch's load_state_dict raises it; OK when there is
// nothing to report.
absl::Status LoadStateDictError(absl::string_view root_type,
                                const std::vector<std::string>& missing,
                                const std::vector<std::string>& unexpected,
                                std::vector<std::string> problems, bool strict);

// Converts `input` (described by the same spec the plan was made from) into
// what its target stores: cast to the target dtype (torch's copy_ conversion)
// and reshaped for [1] -> []. Shares storage when nothing changes. Returns
// input unchanged when there is no target.
absl::StatusOr<Tensor> ConvertForTarget(
    const absl::optional<LoadTarget>& target, const Tensor& input);

// Returns a new tree in which every planned target of `root` holds
// `converted[i]` (the outputs of ConvertForTarget). Without assign, tensors
// tied in the old tree (same bytes) stay tied to the value written last, as
// torch's in-place copies leave them. Unchanged subtrees are shared. `root`
// here is the whole model even when the plan was made for a submodule at
// `submodule_path`.
absl::StatusOr<ModulePtr> ApplyLoad(const ModulePtr& root,
                                    absl::string_view submodule_path,
                                    const LoadPlan& plan,
                                    const LoadOptions& options,
                                    absl::Span<const Tensor> converted);

// torch's return value of load_state_dict.
struct LoadResult {
  ModulePtr model;
  std::vector<std::string> missing_keys;
  std::vector<std::string> unexpected_keys;
};

// PlanLoad + ConvertForTarget + ApplyLoad in one call: loads `state` into
// `root` and returns the new tree; `root` itself is never changed. Errors as
// PlanLoad.
absl::StatusOr<LoadResult> LoadStateDict(const ModulePtr& root,
                                         const StateDict& state,
                                         const LoadOptions& options = {});

// torch's repr of the result: "<All keys matched successfully>" or
// "_IncompatibleKeys(missing_keys=[...], unexpected_keys=[...])".
std::string IncompatibleKeysString(const std::vector<std::string>& missing,
                                   const std::vector<std::string>& unexpected);

}  // namespace modelstate

#endif  // MODELSTATE_MODEL_STATE_DICT_H_

// Module trees: torch.nn.Module's registry of parameters, buffers and children.
//
// Modules are built mutable, then shared as `std::shared_ptr<const Module>` and
// never changed again: a load builds new modules for the changed paths and
// shares everything else (see state_dict.h). A tree is therefore safe to read
// from any thread.
#ifndef MODELSTATE_MODEL_MODULE_H_
#define MODELSTATE_MODEL_MODULE_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/optional.h"
#include "model/names.h"
#include "model/tensor.h"

namespace modelstate {

enum class TensorKind { kParameter, kBuffer };

// Estimated heap cost of a module tree's objects, apart from tensor bytes: a
// documented per-object figure (docs/operations.md), rounded up from the heap
// glibc's malloc really gives trees of 1,000 to 100,000 tiny objects on
// x86-64 with libstdc++ (objects, hash-table and vector slack, per-block
// overhead; model_store_test checks the figures stay above it). Memory limits
// count it, so a model of a million empty tensors or modules is not free.
// One Module: the object, its shared_ptr control block, member table and type
// name (plus the name's length).
inline constexpr int64_t kModuleOverheadBytes = 320;
// One parameter or buffer slot: the slot, its Tensor and member-table entry
// (plus the name's length and 8 bytes per dimension), apart from its storage
// (kStorageOverheadBytes).
inline constexpr int64_t kTensorSlotOverheadBytes = 256;
// One child slot: the slot and its member-table entry (plus the name's
// length).
inline constexpr int64_t kChildSlotOverheadBytes = 128;

// What a module tree holds in memory.
struct TreeCost {
  int64_t tensor_bytes = 0;    // Distinct storages' bytes (shared ones once).
  int64_t metadata_bytes = 0;  // Modules, slots, names, shapes and storages.
  int64_t modules = 0;         // Distinct modules.
  // EstimateSpecCost only: the transient buffer building the tree needs on
  // top of its bytes (Initializer::peak_scratch_bytes).
  int64_t build_scratch_bytes = 0;
  int64_t total_bytes() const { return tensor_bytes + metadata_bytes; }
};

// A registered parameter or buffer. `tensor` is empty for torch's
// `register_parameter(name, None)`.
struct TensorSlot {
  std::string name;
  absl::optional<Tensor> tensor;
  bool persistent = true;  // Buffers only; parameters are always persistent.
};

class Module;
using ModulePtr = std::shared_ptr<const Module>;

// A registered child. `module` is null for a child registered as None.
struct ChildSlot {
  std::string name;
  ModulePtr module;
};

class Module {
 public:
  // `type_name` is the torch class name ("Linear"); `version` is the module's
  // `_version` (1 by default, 2 for BatchNorm), stored in state-dict metadata.
  explicit Module(std::string type_name, int version = 1);

  const std::string& type_name() const { return type_name_; }
  int version() const { return version_; }

  // Registers a parameter (or a None parameter). Returns InvalidArgument for an
  // empty name or one containing '.', AlreadyExists if the name is taken by a
  // parameter, buffer or child.
  absl::Status AddParameter(absl::string_view name,
                            absl::optional<Tensor> tensor);

  // Registers a buffer; errors as AddParameter. Non-persistent buffers stay out
  // of state dicts.
  absl::Status AddBuffer(absl::string_view name, absl::optional<Tensor> tensor,
                         bool persistent = true);

  // Registers a child (null registers None); errors as AddParameter.
  absl::Status AddChild(absl::string_view name, ModulePtr child);

  const std::vector<TensorSlot>& parameters() const { return parameters_; }
  const std::vector<TensorSlot>& buffers() const { return buffers_; }
  const std::vector<ChildSlot>& children() const { return children_; }

  // Returns the slot list for `kind`, for code that treats both alike.
  const std::vector<TensorSlot>& slots(TensorKind kind) const {
    return kind == TensorKind::kParameter ? parameters_ : buffers_;
  }

  // Returns the child registered as `name` (the ChildSlot, whose module may be
  // null), or null when no child has that name.
  const ChildSlot* FindChild(absl::string_view name) const;

  // Returns the index in children() of the child named `name`, or -1.
  int64_t FindChildIndex(absl::string_view name) const;

  // Returns the slot of the parameter or buffer named `name` (which may hold no
  // tensor), or null.
  const TensorSlot* FindTensor(absl::string_view name) const;

  // Returns the module at dotted `path` ("" is this module; "layers.1" never
  // matches "layers.10"; a trailing '.' is ignored). NotFound names the first
  // missing component, or says the child is None.
  absl::StatusOr<ModulePtr> GetSubmodule(const ModulePtr& self,
                                         absl::string_view path) const;

  // Replaces the tensor of slot `index` of `kind` (copy-on-write helpers for
  // loads).
  void SetTensor(TensorKind kind, size_t index, Tensor tensor);
  void SetChild(size_t index, ModulePtr child) {
    children_[index].module = std::move(child);
  }

  // Returns a copy of this module that shares every tensor and child.
  std::shared_ptr<Module> ShallowCopy() const {
    return std::make_shared<Module>(*this);
  }

  // Sum of the bytes of every distinct storage reachable from this module
  // (shared storages once).
  size_t TotalTensorBytes() const;

  // The tensor bytes, metadata estimate and module count of the tree under
  // this module (shared modules and storages once).
  TreeCost Cost() const;

  // The estimated metadata of this module object alone: itself, its slots,
  // names and shapes; not its children or its tensors' storages.
  int64_t OwnMetadataBytes() const;

  // Charges this module's own metadata to `accountant` until it dies (see
  // MemoryCharge). Returns false when it was charged before; a charged module's
  // whole subtree was charged with it, so callers walking a tree stop there.
  bool ChargeTo(const std::shared_ptr<MemoryAccountant>& accountant) const {
    return charge_.Charge(accountant, 0, OwnMetadataBytes());
  }

 private:
  absl::Status CheckNewName(absl::string_view name) const;

  // Where a member name is registered: which list and at which index. Keeps
  // lookups O(1) for modules with very many members (a ModuleList of 100,000
  // layers).
  struct MemberRef {
    enum class List { kParameter, kBuffer, kChild } list;
    size_t index;
  };

  std::string type_name_;
  int version_;
  std::vector<TensorSlot> parameters_;
  std::vector<TensorSlot> buffers_;
  std::vector<ChildSlot> children_;
  absl::flat_hash_map<std::string, MemberRef> members_;
  MemoryCharge charge_;  // Copies (ShallowCopy) start uncharged.
};

}  // namespace modelstate

#endif  // MODELSTATE_MODEL_MODULE_H_

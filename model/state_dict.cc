#include "model/state_dict.h"

#include <algorithm>
#include <string>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"
#include "common/status_macros.h"
#include "model/module_version.h"

namespace modelstate {

StateDict::StateDict(const StateDict& other)
    : entries_(other.entries_),
      metadata_(other.metadata_),
      metadata_index_(other.metadata_index_) {
  RebuildIndex();
}

StateDict& StateDict::operator=(const StateDict& other) {
  if (this != &other) *this = StateDict(other);
  return *this;
}

StateDict& StateDict::operator=(StateDict&& other) {
  // A self-move must not leave the index viewing keys the move freed.
  if (this == &other) return *this;
  entries_ = std::move(other.entries_);
  index_ = std::move(other.index_);
  metadata_ = std::move(other.metadata_);
  metadata_index_ = std::move(other.metadata_index_);
  other.entries_.clear();
  other.index_.clear();
  return *this;
}

void StateDict::Set(std::string key, Tensor tensor, TensorKind kind) {
  auto it = index_.find(key);
  if (it != index_.end()) {
    entries_[it->second].tensor = std::move(tensor);
    entries_[it->second].kind = kind;
    return;
  }
  Append(std::move(key), std::move(tensor), kind);
}

absl::Status StateDict::Insert(std::string key, Tensor tensor,
                               TensorKind kind) {
  if (index_.contains(key)) {
    return absl::InvalidArgumentError(
        absl::StrCat("duplicate key \"", key, "\""));
  }
  Append(std::move(key), std::move(tensor), kind);
  return absl::OkStatus();
}

void StateDict::Append(std::string key, Tensor tensor, TensorKind kind) {
  const bool reallocates = entries_.size() == entries_.capacity();
  entries_.push_back(Entry{std::move(key), std::move(tensor), kind});
  if (reallocates) {
    RebuildIndex();
  } else {
    index_.emplace(entries_.back().key, entries_.size() - 1);
  }
}

void StateDict::RebuildIndex() {
  // Sized for every entry the vector holds room for, so that appends until
  // its next reallocation do not rehash.
  index_ = {};
  index_.reserve(entries_.capacity());
  for (size_t i = 0; i < entries_.size(); ++i)
    index_.emplace(entries_[i].key, i);
}

void StateDict::Reserve(size_t entries) {
  if (entries <= entries_.capacity()) return;
  entries_.reserve(entries);
  RebuildIndex();
}

const Tensor* StateDict::Find(absl::string_view key) const {
  auto it = index_.find(key);
  return it == index_.end() ? nullptr : &entries_[it->second].tensor;
}

std::vector<std::string> StateDict::Keys() const {
  std::vector<std::string> keys;
  keys.reserve(entries_.size());
  for (const Entry& entry : entries_) keys.push_back(entry.key);
  return keys;
}

std::vector<Tensor> StateDict::Tensors() const {
  std::vector<Tensor> tensors;
  tensors.reserve(entries_.size());
  for (const Entry& entry : entries_) tensors.push_back(entry.tensor);
  return tensors;
}

size_t StateDict::TotalBytes() const {
  size_t total = 0;
  for (const Entry& entry : entries_) total += entry.tensor.num_bytes();
  return total;
}

namespace {

// What glibc's malloc takes for a request of `bytes`: a 16-byte aligned chunk
// with an 8-byte header, at least 32 bytes.
int64_t HeapBlockBytes(size_t bytes) {
  return std::max<int64_t>(32, (bytes + 8 + 15) / 16 * 16);
}

// Heap bytes of a string beyond the object: none while it fits the
// small-string buffer.
int64_t StringHeapBytes(const std::string& text) {
  constexpr size_t kSmallStringCapacity = 15;
  return text.capacity() > kSmallStringCapacity
             ? HeapBlockBytes(text.capacity() + 1)
             : 0;
}

// Heap bytes of a vector's buffer.
template <typename T>
int64_t VectorHeapBytes(const std::vector<T>& items) {
  return items.capacity() == 0 ? 0
                               : HeapBlockBytes(items.capacity() * sizeof(T));
}

// Heap bytes of a flat_hash_map's slots and control bytes.
template <typename Map>
int64_t IndexHeapBytes(const Map& index) {
  if (index.capacity() == 0) return 0;
  return HeapBlockBytes(index.capacity() *
                        (sizeof(typename Map::value_type) + 1));
}

}  // namespace

int64_t StateDict::HeapBytes() const {
  int64_t bytes = IndexHeapBytes(index_) + IndexHeapBytes(metadata_index_) +
                  VectorHeapBytes(entries_) + VectorHeapBytes(metadata_);
  // Keys are held once (the index views them); module paths twice.
  for (const Entry& entry : entries_) {
    bytes += StringHeapBytes(entry.key) + VectorHeapBytes(entry.tensor.shape());
  }
  for (const auto& [path, version] : metadata_)
    bytes += 2 * StringHeapBytes(path);
  return bytes;
}

void StateDict::SetModuleVersion(std::string module_path, int version) {
  auto [it, inserted] = metadata_index_.emplace(module_path, metadata_.size());
  if (!inserted) {
    metadata_[it->second].second = version;
    return;
  }
  metadata_.emplace_back(std::move(module_path), version);
}

absl::optional<int> StateDict::ModuleVersion(
    absl::string_view module_path) const {
  auto it = metadata_index_.find(module_path);
  if (it == metadata_index_.end()) return absl::nullopt;
  return metadata_[it->second].second;
}

namespace {

std::string NormalizePath(absl::string_view path) {
  absl::ConsumeSuffix(&path, ".");
  return std::string(path);
}

absl::string_view WithoutTrailingDot(absl::string_view prefix) {
  absl::ConsumeSuffix(&prefix, ".");
  return prefix;
}

void EmitModule(const Module& module, const std::string& prefix,
                const StateDictOptions& options, StateDict* out) {
  out->SetModuleVersion(std::string(WithoutTrailingDot(prefix)),
                        module.version());
  for (const TensorSlot& slot : module.parameters()) {
    if (slot.tensor) {
      out->Set(prefix + slot.name, *slot.tensor, TensorKind::kParameter);
    }
  }
  if (options.include_buffers) {
    for (const TensorSlot& slot : module.buffers()) {
      if (slot.tensor && slot.persistent) {
        out->Set(prefix + slot.name, *slot.tensor, TensorKind::kBuffer);
      }
    }
  }
  if (!options.recurse) return;
  for (const ChildSlot& child : module.children()) {
    if (child.module)
      EmitModule(*child.module, prefix + child.name + ".", options, out);
  }
}

}  // namespace

absl::Status AppendStateDict(const ModulePtr& root,
                             const StateDictOptions& options,
                             StateDict* destination) {
  const std::string submodule = NormalizePath(options.module);
  ASSIGN_OR_RETURN(ModulePtr module, root->GetSubmodule(root, submodule));
  std::string prefix = options.prefix;
  if (options.keep_module_prefix && !submodule.empty()) {
    absl::StrAppend(&prefix, submodule, ".");
  }
  if (options.keys.empty()) {
    EmitModule(*module, prefix, options, destination);
    return absl::OkStatus();
  }
  StateDict all;
  EmitModule(*module, prefix, options, &all);
  absl::flat_hash_map<absl::string_view, const StateDict::Entry*> by_key;
  for (const StateDict::Entry& entry : all.entries())
    by_key.emplace(entry.key, &entry);
  for (const std::string& key : options.keys) {
    auto it = by_key.find(key);
    if (it == by_key.end()) {
      return absl::NotFoundError(absl::StrCat("no tensor named \"", key, "\""));
    }
    destination->Set(key, it->second->tensor, it->second->kind);
  }
  for (const auto& [path, version] : all.metadata()) {
    destination->SetModuleVersion(path, version);
  }
  return absl::OkStatus();
}

absl::StatusOr<StateDict> GetStateDict(const ModulePtr& root,
                                       const StateDictOptions& options) {
  StateDict state;
  RETURN_IF_ERROR(AppendStateDict(root, options, &state));
  return state;
}

absl::StatusOr<StateDict> CastFloatingTensors(const StateDict& state,
                                              DType dtype) {
  if (!IsFloatingPoint(dtype)) {
    return absl::InvalidArgumentError(
        absl::StrCat("can only cast floating tensors to a floating dtype, not ",
                     TorchName(dtype)));
  }
  StateDict out;
  for (const StateDict::Entry& entry : state.entries()) {
    if (IsFloatingPoint(entry.tensor.dtype())) {
      ASSIGN_OR_RETURN(Tensor cast, entry.tensor.CastTo(dtype));
      out.Set(entry.key, std::move(cast), entry.kind);
    } else {
      out.Set(entry.key, entry.tensor, entry.kind);
    }
  }
  for (const auto& [path, version] : state.metadata())
    out.SetModuleVersion(path, version);
  return out;
}

namespace {

bool ShapeIsKnown(const Tensor&) { return true; }
bool ShapeIsKnown(const ModuleLayout::TensorShape& tensor) {
  return !tensor.lazy;
}

// Replays torch's recursive `load(module, state_dict, prefix)` over keys only,
// on a Module or a ModuleLayout.
template <typename Tree>
class LoadPlanner {
 public:
  LoadPlanner(absl::Span<const TensorSpec> inputs, const StateDict* metadata,
              const LoadOptions& options, LoadPlan* plan)
      : inputs_(inputs), metadata_(metadata), options_(options), plan_(plan) {}

  absl::Status Index() {
    index_.reserve(inputs_.size());
    for (size_t i = 0; i < inputs_.size(); ++i) {
      if (!index_.emplace(inputs_[i].key, i).second) {
        return absl::InvalidArgumentError(absl::StrCat(
            "duplicate key \"", inputs_[i].key, "\" in state_dict"));
      }
    }
    plan_->targets.assign(inputs_.size(), absl::nullopt);
    return absl::OkStatus();
  }

  void Visit(const Tree& module, const std::string& prefix,
             std::vector<size_t>* path,
             const std::vector<size_t>& keys_under_prefix) {
    VisitOwnTensors(module, prefix, *path);
    // Unexpected keys (newer torch's rule): "a.b" needs a child "a"; "a" needs
    // an own tensor "a".
    std::vector<std::vector<size_t>> child_keys(module.children().size());
    for (size_t input : keys_under_prefix) {
      absl::string_view rest =
          absl::string_view(inputs_[input].key).substr(prefix.size());
      const size_t dot = rest.find('.');
      if (dot != absl::string_view::npos) {
        const int64_t child = module.FindChildIndex(rest.substr(0, dot));
        if (child < 0) {
          plan_->unexpected_keys.push_back(inputs_[input].key);
        } else if (module.children()[child].module) {
          child_keys[child].push_back(input);
        }
      } else if (!IsOwnStateName(module, rest) &&
                 module.FindChildIndex(rest) < 0) {
        // torch 1.13 ignores a key naming a child ("head" for child head).
        plan_->unexpected_keys.push_back(inputs_[input].key);
      }
    }
    for (size_t c = 0; c < module.children().size(); ++c) {
      const auto& child = module.children()[c];
      if (!child.module) continue;
      path->push_back(c);
      Visit(*child.module, prefix + child.name + ".", path, child_keys[c]);
      path->pop_back();
    }
  }

  std::vector<std::string>& error_msgs() { return error_msgs_; }
  std::vector<size_t>& apply_order() { return apply_order_; }

 private:
  static bool IsOwnStateName(const Tree& module, absl::string_view name) {
    const auto* slot = module.FindTensor(name);
    return slot != nullptr && slot->tensor.has_value() && slot->persistent;
  }

  void VisitOwnTensors(const Tree& module, const std::string& prefix,
                       const std::vector<size_t>& path) {
    absl::optional<int> version;
    if (metadata_ != nullptr)
      version = metadata_->ModuleVersion(WithoutTrailingDot(prefix));
    for (TensorKind kind : {TensorKind::kParameter, TensorKind::kBuffer}) {
      const auto& slots = module.slots(kind);
      for (size_t s = 0; s < slots.size(); ++s) {
        const auto& slot = slots[s];
        if (!slot.tensor || !slot.persistent) continue;
        const std::string key = prefix + slot.name;
        auto found = index_.find(key);
        if (found == index_.end()) {
          // _NormBase: checkpoints older than version 2 (and safetensors files,
          // which carry no metadata) lack num_batches_tracked; torch fills it
          // in rather than report it.
          const bool filled_in = kind == TensorKind::kBuffer &&
                                 slot.name == "num_batches_tracked" &&
                                 IsNormBaseClass(module.type_name()) &&
                                 (!version.has_value() || *version < 2);
          if (!filled_in) plan_->missing_keys.push_back(key);
          continue;
        }
        const TensorSpec& input = inputs_[found->second];
        const Shape& model_shape = slot.tensor->shape();
        const bool known = ShapeIsKnown(*slot.tensor);
        const bool squeeze =
            known && model_shape.empty() && input.shape == Shape{1};
        if (known && !squeeze && input.shape != model_shape) {
          error_msgs_.push_back(
              SizeMismatchText(key, input.shape, model_shape));
          continue;
        }
        LoadTarget target{
            path,        kind,
            s,           options_.assign ? input.dtype : slot.tensor->dtype(),
            model_shape, squeeze};
        if (target.dtype != input.dtype) {
          plan_->conversion_bytes +=
              NumBytes(target.dtype, model_shape).value();
        }
        plan_->targets[found->second] = std::move(target);
        apply_order_.push_back(found->second);
      }
    }
  }

  absl::Span<const TensorSpec> inputs_;
  const StateDict* metadata_;
  const LoadOptions& options_;
  LoadPlan* plan_;
  absl::flat_hash_map<std::string, size_t> index_;
  std::vector<std::string> error_msgs_;
  std::vector<size_t> apply_order_;
};

std::string QuotedList(const std::vector<std::string>& keys) {
  return absl::StrJoin(keys, ", ",
                       [](std::string* out, const std::string& key) {
                         absl::StrAppend(out, "\"", key, "\"");
                       });
}

template <typename Tree>
absl::StatusOr<LoadPlan> PlanLoadOf(const Tree& module,
                                    absl::Span<const TensorSpec> inputs,
                                    const LoadOptions& options,
                                    const StateDict* metadata) {
  LoadPlan plan;
  plan.root_type = module.type_name();
  LoadPlanner<Tree> planner(inputs, metadata, options, &plan);
  RETURN_IF_ERROR(planner.Index());
  std::vector<size_t> all_keys(inputs.size());
  for (size_t i = 0; i < inputs.size(); ++i) all_keys[i] = i;
  std::vector<size_t> path;
  planner.Visit(module, "", &path, all_keys);
  RETURN_IF_ERROR(LoadStateDictError(
      plan.root_type, plan.missing_keys, plan.unexpected_keys,
      std::move(planner.error_msgs()), options.strict));
  plan.apply_order = std::move(planner.apply_order());
  return plan;
}

}  // namespace

absl::StatusOr<LoadPlan> PlanLoad(const ModulePtr& root,
                                  absl::Span<const TensorSpec> inputs,
                                  const LoadOptions& options,
                                  const StateDict* metadata) {
  ASSIGN_OR_RETURN(ModulePtr module, root->GetSubmodule(root, options.module));
  return PlanLoadOf(*module, inputs, options, metadata);
}

absl::StatusOr<LoadPlan> PlanLoad(const ModuleLayout& root,
                                  absl::Span<const TensorSpec> inputs,
                                  const LoadOptions& options) {
  return PlanLoadOf(root, inputs, options, nullptr);
}

std::string SizeMismatchText(absl::string_view key, const Shape& checkpoint,
                             const Shape& model) {
  return absl::StrCat("size mismatch for ", key,
                      ": copying a param with shape ",
                      TorchSizeString(checkpoint),
                      " from checkpoint, the shape in current model is ",
                      TorchSizeString(model), ".");
}

absl::Status LoadStateDictError(absl::string_view root_type,
                                const std::vector<std::string>& missing,
                                const std::vector<std::string>& unexpected,
                                std::vector<std::string> problems,
                                bool strict) {
  if (strict && !unexpected.empty()) {
    problems.insert(problems.begin(),
                    absl::StrCat("Unexpected key(s) in state_dict: ",
                                 QuotedList(unexpected), ". "));
  }
  if (strict && !missing.empty()) {
    problems.insert(problems.begin(),
                    absl::StrCat("Missing key(s) in state_dict: ",
                                 QuotedList(missing), ". "));
  }
  if (problems.empty()) return absl::OkStatus();
  return absl::FailedPreconditionError(
      absl::StrCat("Error(s) in loading state_dict for ", root_type, ":\n\t",
                   absl::StrJoin(problems, "\n\t")));
}

void ModuleLayout::AddTensor(TensorKind kind, Slot slot) {
  (kind == TensorKind::kParameter ? parameters_ : buffers_)
      .push_back(std::move(slot));
}

void ModuleLayout::AddChild(std::string name,
                            std::shared_ptr<const ModuleLayout> child) {
  children_.push_back(Child{std::move(name), std::move(child)});
}

int64_t ModuleLayout::FindChildIndex(absl::string_view name) const {
  for (size_t i = 0; i < children_.size(); ++i) {
    if (children_[i].name == name) return static_cast<int64_t>(i);
  }
  return -1;
}

const ModuleLayout::Slot* ModuleLayout::FindTensor(
    absl::string_view name) const {
  for (const std::vector<Slot>* slots : {&parameters_, &buffers_}) {
    for (const Slot& slot : *slots) {
      if (slot.name == name) return &slot;
    }
  }
  return nullptr;
}

absl::StatusOr<Tensor> ConvertForTarget(
    const absl::optional<LoadTarget>& target, const Tensor& input) {
  if (!target) return input;
  Tensor shaped = input;
  if (target->squeeze_scalar) {
    ASSIGN_OR_RETURN(shaped, input.Reshape(Shape{}));
  }
  return shaped.CastTo(target->dtype);
}

namespace {

struct SlotKey {
  const Module* module;
  TensorKind kind;
  size_t slot;
  template <typename H>
  friend H AbslHashValue(H h, const SlotKey& k) {
    return H::combine(std::move(h), k.module, k.kind, k.slot);
  }
  bool operator==(const SlotKey& o) const {
    return module == o.module && kind == o.kind && slot == o.slot;
  }
};

// Identity of a tensor's bytes: tensors with equal identity are torch's tied
// parameters.
struct BytesIdentity {
  const Storage* storage;
  size_t offset;
  size_t size;
  template <typename H>
  friend H AbslHashValue(H h, const BytesIdentity& k) {
    return H::combine(std::move(h), k.storage, k.offset, k.size);
  }
  bool operator==(const BytesIdentity& o) const {
    return storage == o.storage && offset == o.offset && size == o.size;
  }
};

BytesIdentity IdentityOf(const Tensor& tensor) {
  return {tensor.storage().get(), tensor.storage_offset(), tensor.num_bytes()};
}

class TreeRebuilder {
 public:
  TreeRebuilder(absl::flat_hash_map<SlotKey, Tensor> direct,
                absl::flat_hash_map<BytesIdentity, Tensor> tied)
      : direct_(std::move(direct)), tied_(std::move(tied)) {}

  ModulePtr Rebuild(const ModulePtr& old) {
    auto memo = memo_.find(old.get());
    if (memo != memo_.end()) return memo->second;
    std::shared_ptr<Module> copy;
    auto ensure_copy = [&]() -> Module& {
      if (!copy) copy = old->ShallowCopy();
      return *copy;
    };
    for (TensorKind kind : {TensorKind::kParameter, TensorKind::kBuffer}) {
      const std::vector<TensorSlot>& slots = old->slots(kind);
      for (size_t s = 0; s < slots.size(); ++s) {
        if (!slots[s].tensor) continue;
        const Tensor* replacement = nullptr;
        if (slots[s].tensor->num_bytes() > 0) {
          auto tied = tied_.find(IdentityOf(*slots[s].tensor));
          if (tied != tied_.end()) replacement = &tied->second;
        }
        if (replacement == nullptr) {
          auto direct = direct_.find(SlotKey{old.get(), kind, s});
          if (direct != direct_.end()) replacement = &direct->second;
        }
        if (replacement != nullptr)
          ensure_copy().SetTensor(kind, s, *replacement);
      }
    }
    const std::vector<ChildSlot>& children = old->children();
    for (size_t c = 0; c < children.size(); ++c) {
      if (!children[c].module) continue;
      ModulePtr rebuilt = Rebuild(children[c].module);
      if (rebuilt != children[c].module)
        ensure_copy().SetChild(c, std::move(rebuilt));
    }
    ModulePtr result = copy ? ModulePtr(std::move(copy)) : old;
    memo_.emplace(old.get(), result);
    return result;
  }

 private:
  absl::flat_hash_map<SlotKey, Tensor> direct_;
  absl::flat_hash_map<BytesIdentity, Tensor> tied_;
  absl::flat_hash_map<const Module*, ModulePtr> memo_;
};

}  // namespace

std::vector<int64_t> SharedEntries(const StateDict& state) {
  std::vector<int64_t> shared(state.size(), -1);
  absl::flat_hash_map<BytesIdentity, int64_t> first;
  for (size_t i = 0; i < state.size(); ++i) {
    const Tensor& tensor = state.entries()[i].tensor;
    if (tensor.num_bytes() == 0) continue;
    auto [found, added] =
        first.emplace(IdentityOf(tensor), static_cast<int64_t>(i));
    if (added) continue;
    const Tensor& earlier = state.entries()[found->second].tensor;
    if (earlier.dtype() == tensor.dtype() && earlier.shape() == tensor.shape())
      shared[i] = found->second;
  }
  return shared;
}

absl::StatusOr<ModulePtr> ApplyLoad(const ModulePtr& root,
                                    absl::string_view submodule_path,
                                    const LoadPlan& plan,
                                    const LoadOptions& options,
                                    absl::Span<const Tensor> converted) {
  if (converted.size() != plan.targets.size()) {
    return absl::InvalidArgumentError(
        "converted tensors do not match the load plan");
  }
  ASSIGN_OR_RETURN(ModulePtr load_root,
                   root->GetSubmodule(root, submodule_path));
  absl::flat_hash_map<SlotKey, Tensor> direct;
  absl::flat_hash_map<BytesIdentity, Tensor> tied;
  for (size_t input : plan.apply_order) {
    const LoadTarget& target = *plan.targets[input];
    const Module* owner = load_root.get();
    for (size_t c : target.child_path)
      owner = owner->children()[c].module.get();
    const TensorSlot& slot = owner->slots(target.kind)[target.slot];
    if (converted[input].dtype() != target.dtype ||
        converted[input].shape() != target.shape) {
      return absl::InternalError(
          absl::StrCat("tensor for ", plan.root_type, " slot ", slot.name,
                       " was not converted for its target"));
    }
    direct[SlotKey{owner, target.kind, target.slot}] = converted[input];
    if (!options.assign && slot.tensor->num_bytes() > 0) {
      tied[IdentityOf(*slot.tensor)] = converted[input];
    }
  }
  TreeRebuilder rebuilder(std::move(direct), std::move(tied));
  return rebuilder.Rebuild(root);
}

absl::StatusOr<LoadResult> LoadStateDict(const ModulePtr& root,
                                         const StateDict& state,
                                         const LoadOptions& options) {
  std::vector<TensorSpec> specs;
  specs.reserve(state.size());
  for (const StateDict::Entry& entry : state.entries()) {
    specs.push_back(
        TensorSpec{entry.key, entry.tensor.dtype(), entry.tensor.shape()});
  }
  ASSIGN_OR_RETURN(LoadPlan plan, PlanLoad(root, specs, options, &state));
  std::vector<Tensor> converted;
  converted.reserve(state.size());
  for (size_t i = 0; i < state.size(); ++i) {
    ASSIGN_OR_RETURN(
        Tensor tensor,
        ConvertForTarget(plan.targets[i], state.entries()[i].tensor));
    converted.push_back(std::move(tensor));
  }
  ASSIGN_OR_RETURN(ModulePtr model,
                   ApplyLoad(root, options.module, plan, options, converted));
  return LoadResult{std::move(model), std::move(plan.missing_keys),
                    std::move(plan.unexpected_keys)};
}

std::string IncompatibleKeysString(const std::vector<std::string>& missing,
                                   const std::vector<std::string>& unexpected) {
  if (missing.empty() && unexpected.empty())
    return "<All keys matched successfully>";
  auto list = [](const std::vector<std::string>& keys) {
    return absl::StrCat(
        "[",
        absl::StrJoin(keys, ", ",
                      [](std::string* out, const std::string& k) {
                        absl::StrAppend(out, "'", k, "'");
                      }),
        "]");
  };
  return absl::StrCat("_IncompatibleKeys(missing_keys=", list(missing),
                      ", unexpected_keys=", list(unexpected), ")");
}

}  // namespace modelstate

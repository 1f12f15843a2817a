#include "model/module.h"

#include <utility>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"

namespace modelstate {

Module::Module(std::string type_name, int version)
    : type_name_(std::move(type_name)), version_(version) {}

absl::Status Module::CheckNewName(absl::string_view name) const {
  absl::Status valid = ValidateMemberName(name);
  if (!valid.ok()) return valid;
  if (members_.contains(name)) {
    return absl::AlreadyExistsError(
        absl::StrCat("attribute '", name, "' already exists in ", type_name_));
  }
  return absl::OkStatus();
}

absl::Status Module::AddParameter(absl::string_view name,
                                  absl::optional<Tensor> tensor) {
  absl::Status status = CheckNewName(name);
  if (!status.ok()) return status;
  members_.emplace(name,
                   MemberRef{MemberRef::List::kParameter, parameters_.size()});
  parameters_.push_back(TensorSlot{std::string(name), std::move(tensor), true});
  return absl::OkStatus();
}

absl::Status Module::AddBuffer(absl::string_view name,
                               absl::optional<Tensor> tensor, bool persistent) {
  absl::Status status = CheckNewName(name);
  if (!status.ok()) return status;
  members_.emplace(name, MemberRef{MemberRef::List::kBuffer, buffers_.size()});
  buffers_.push_back(
      TensorSlot{std::string(name), std::move(tensor), persistent});
  return absl::OkStatus();
}

absl::Status Module::AddChild(absl::string_view name, ModulePtr child) {
  absl::Status status = CheckNewName(name);
  if (!status.ok()) return status;
  members_.emplace(name, MemberRef{MemberRef::List::kChild, children_.size()});
  children_.push_back(ChildSlot{std::string(name), std::move(child)});
  return absl::OkStatus();
}

int64_t Module::FindChildIndex(absl::string_view name) const {
  auto it = members_.find(name);
  if (it == members_.end() || it->second.list != MemberRef::List::kChild)
    return -1;
  return static_cast<int64_t>(it->second.index);
}

const ChildSlot* Module::FindChild(absl::string_view name) const {
  const int64_t index = FindChildIndex(name);
  return index < 0 ? nullptr : &children_[index];
}

const TensorSlot* Module::FindTensor(absl::string_view name) const {
  auto it = members_.find(name);
  if (it == members_.end()) return nullptr;
  switch (it->second.list) {
    case MemberRef::List::kParameter:
      return &parameters_[it->second.index];
    case MemberRef::List::kBuffer:
      return &buffers_[it->second.index];
    default:
      return nullptr;
  }
}

absl::StatusOr<ModulePtr> Module::GetSubmodule(const ModulePtr& self,
                                               absl::string_view path) const {
  absl::ConsumeSuffix(&path, ".");
  ModulePtr current = self;
  if (path.empty()) return current;
  std::string walked;
  for (absl::string_view part : absl::StrSplit(path, '.')) {
    const ChildSlot* child = current->FindChild(part);
    if (child == nullptr) {
      return absl::NotFoundError(
          absl::StrCat(current->type_name(), walked.empty() ? "" : " ", walked,
                       " has no attribute `", part, "`"));
    }
    absl::StrAppend(&walked, walked.empty() ? "" : ".", part);
    if (child->module == nullptr) {
      return absl::NotFoundError(
          absl::StrCat("submodule `", walked, "` is None"));
    }
    current = child->module;
  }
  return current;
}

void Module::SetTensor(TensorKind kind, size_t index, Tensor tensor) {
  auto& slots = kind == TensorKind::kParameter ? parameters_ : buffers_;
  slots[index].tensor = std::move(tensor);
}

namespace {
struct CostWalk {
  absl::flat_hash_set<const Storage*> storages;
  absl::flat_hash_set<const Module*> modules;
  TreeCost cost;

  // Depth is bounded by the callers' limits (kMaxSpecDepth,
  // kMaxKeyComponents).
  void Visit(const Module& module) {
    if (!modules.insert(&module).second) return;
    ++cost.modules;
    cost.metadata_bytes += module.OwnMetadataBytes();
    for (const auto* slots : {&module.parameters(), &module.buffers()}) {
      for (const TensorSlot& slot : *slots) {
        if (slot.tensor &&
            storages.insert(slot.tensor->storage().get()).second) {
          cost.tensor_bytes +=
              static_cast<int64_t>(slot.tensor->storage()->size());
          cost.metadata_bytes += kStorageOverheadBytes;
        }
      }
    }
    for (const ChildSlot& child : module.children()) {
      if (child.module) Visit(*child.module);
    }
  }
};
}  // namespace

size_t Module::TotalTensorBytes() const {
  return static_cast<size_t>(Cost().tensor_bytes);
}

TreeCost Module::Cost() const {
  CostWalk walk;
  walk.Visit(*this);
  return walk.cost;
}

int64_t Module::OwnMetadataBytes() const {
  int64_t bytes =
      kModuleOverheadBytes + static_cast<int64_t>(type_name_.size());
  for (const auto* slots : {&parameters_, &buffers_}) {
    for (const TensorSlot& slot : *slots) {
      bytes +=
          kTensorSlotOverheadBytes + static_cast<int64_t>(slot.name.size());
      if (slot.tensor) {
        bytes += 8 * static_cast<int64_t>(slot.tensor->shape().size());
      }
    }
  }
  for (const ChildSlot& child : children_) {
    bytes += kChildSlotOverheadBytes + static_cast<int64_t>(child.name.size());
  }
  return bytes;
}

}  // namespace modelstate

#include "core/module.h"

#include <utility>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"

namespace modelstate {

absl::Status ValidateMemberName(absl::string_view name) {
  if (name.empty()) {
    return absl::InvalidArgumentError(
        "module member name can't be empty string \"\"");
  }
  if (name.find('.') != absl::string_view::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat("module member name can't contain \".\", got: ", name));
  }
  return absl::OkStatus();
}

Module::Module(std::string type_name, int version)
    : type_name_(std::move(type_name)), version_(version) {}

absl::Status Module::CheckNewName(absl::string_view name) const {
  absl::Status valid = ValidateMemberName(name);
  if (!valid.ok()) return valid;
  auto taken = [&](const auto& slots) {
    for (const auto& slot : slots) {
      if (slot.name == name) return true;
    }
    return false;
  };
  if (taken(parameters_) || taken(buffers_) || taken(children_)) {
    return absl::AlreadyExistsError(
        absl::StrCat("attribute '", name, "' already exists in ", type_name_));
  }
  return absl::OkStatus();
}

absl::Status Module::AddParameter(absl::string_view name,
                                  absl::optional<Tensor> tensor) {
  absl::Status status = CheckNewName(name);
  if (!status.ok()) return status;
  parameters_.push_back(TensorSlot{std::string(name), std::move(tensor), true});
  return absl::OkStatus();
}

absl::Status Module::AddBuffer(absl::string_view name,
                               absl::optional<Tensor> tensor, bool persistent) {
  absl::Status status = CheckNewName(name);
  if (!status.ok()) return status;
  buffers_.push_back(
      TensorSlot{std::string(name), std::move(tensor), persistent});
  return absl::OkStatus();
}

absl::Status Module::AddChild(absl::string_view name, ModulePtr child) {
  absl::Status status = CheckNewName(name);
  if (!status.ok()) return status;
  children_.push_back(ChildSlot{std::string(name), std::move(child)});
  return absl::OkStatus();
}

const ChildSlot* Module::FindChild(absl::string_view name) const {
  for (const ChildSlot& child : children_) {
    if (child.name == name) return &child;
  }
  return nullptr;
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
void CollectStorages(const Module& module,
                     absl::flat_hash_set<const Storage*>* seen_storages,
                     absl::flat_hash_set<const Module*>* seen_modules,
                     size_t* total) {
  if (!seen_modules->insert(&module).second) return;
  for (const auto* slots : {&module.parameters(), &module.buffers()}) {
    for (const TensorSlot& slot : *slots) {
      if (slot.tensor &&
          seen_storages->insert(slot.tensor->storage().get()).second) {
        *total += slot.tensor->storage()->size();
      }
    }
  }
  for (const ChildSlot& child : module.children()) {
    if (child.module)
      CollectStorages(*child.module, seen_storages, seen_modules, total);
  }
}
}  // namespace

size_t Module::TotalTensorBytes() const {
  absl::flat_hash_set<const Storage*> storages;
  absl::flat_hash_set<const Module*> modules;
  size_t total = 0;
  CollectStorages(*this, &storages, &modules, &total);
  return total;
}

}  // namespace modelstate

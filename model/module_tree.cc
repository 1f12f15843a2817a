#include "model/module_tree.h"

#include <algorithm>
#include <memory>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/types/span.h"
#include "common/limits.h"
#include "common/status_macros.h"
#include "model/module_version.h"
#include "model/names.h"

namespace modelstate {
namespace {

// One module of the tree being planned. Nodes live in a vector and refer to
// each other by index, so neither building nor destroying the plan recurses.
struct FlatNode {
  std::string name;  // Member name in the parent; "" for the root.
  // Tensors in key order: the key's last component (a view into the key) and
  // the entry.
  std::vector<std::pair<absl::string_view, const StateDict::Entry*>> tensors;
  std::vector<size_t> children;  // In first-seen order.
  absl::flat_hash_map<std::string, size_t> child_index;
};

class FlatTree {
 public:
  FlatTree() : nodes_(1) {}

  // Files `entry` under the module its key's prefix names, creating modules
  // as needed.
  absl::Status Add(const StateDict::Entry& entry);

  // Returns the node at module path `path`, creating it (and the modules on
  // the way) if no key reached it: a module without tensors, such as a ReLU.
  absl::StatusOr<size_t> FindOrAddModule(absl::string_view path);

  const std::vector<FlatNode>& nodes() const { return nodes_; }

 private:
  // Returns the node at the path `parts`, creating the modules on the way.
  size_t Descend(absl::Span<const absl::string_view> parts);

  std::vector<FlatNode> nodes_;  // nodes_[0] is the root.
};

absl::StatusOr<std::vector<absl::string_view>> SplitKey(absl::string_view key) {
  RETURN_IF_ERROR(CheckKeyLimits(key));
  std::vector<absl::string_view> parts = absl::StrSplit(key, '.');
  for (absl::string_view part : parts) {
    if (part.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "key ", QuotedForMessage(key), " has an empty component"));
    }
  }
  return parts;
}

size_t FlatTree::Descend(absl::Span<const absl::string_view> parts) {
  size_t node = 0;
  for (absl::string_view part : parts) {
    auto [it, inserted] =
        nodes_[node].child_index.try_emplace(part, nodes_.size());
    if (inserted) {
      nodes_[node].children.push_back(it->second);
      nodes_.emplace_back().name = std::string(part);
    }
    node = it->second;
  }
  return node;
}

absl::Status FlatTree::Add(const StateDict::Entry& entry) {
  ASSIGN_OR_RETURN(const std::vector<absl::string_view> parts,
                   SplitKey(entry.key));
  const size_t node =
      Descend(absl::MakeConstSpan(parts).subspan(0, parts.size() - 1));
  nodes_[node].tensors.emplace_back(parts.back(), &entry);
  return absl::OkStatus();
}

absl::StatusOr<size_t> FlatTree::FindOrAddModule(absl::string_view path) {
  if (path.empty()) return 0;
  ASSIGN_OR_RETURN(const std::vector<absl::string_view> parts, SplitKey(path));
  return Descend(parts);
}

absl::Status CheckClassName(const std::string& path,
                            const std::string& class_name) {
  const bool valid =
      !class_name.empty() && class_name.size() <= kMaxClassNameLength &&
      std::all_of(class_name.begin(), class_name.end(), [](char c) {
        return absl::ascii_isalnum(static_cast<unsigned char>(c)) || c == '_' ||
               c == '.';
      });
  if (valid) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat("class name ", QuotedForMessage(class_name), " for module ",
                   QuotedForMessage(path), " must be 1 to ",
                   kMaxClassNameLength, " characters from [A-Za-z0-9_.]"));
}

// Returns each node's class name (null for "Module"), adding the modules that
// `class_names` names but no key reached.
absl::StatusOr<std::vector<const std::string*>> ResolveClassNames(
    const std::map<std::string, std::string>& class_names, FlatTree* tree) {
  std::vector<std::pair<size_t, const std::string*>> named;
  for (const auto& [path, class_name] : class_names) {
    RETURN_IF_ERROR(CheckClassName(path, class_name));
    ASSIGN_OR_RETURN(const size_t node, tree->FindOrAddModule(path));
    named.emplace_back(node, &class_name);
  }
  std::vector<const std::string*> classes(tree->nodes().size(), nullptr);
  for (const auto& [node, class_name] : named) classes[node] = class_name;
  return classes;
}

// Returns the module of `node` holding its tensors (children come later).
absl::StatusOr<std::shared_ptr<Module>> NewModule(
    const FlatNode& node, const std::string* class_name,
    const absl::flat_hash_set<std::string>& buffers) {
  const std::string type = class_name != nullptr ? *class_name : "Module";
  auto module = std::make_shared<Module>(type, TorchModuleVersion(type));
  for (const auto& [name, entry] : node.tensors) {
    if (buffers.contains(entry->key)) {
      RETURN_IF_ERROR(module->AddBuffer(name, entry->tensor));
    } else {
      RETURN_IF_ERROR(module->AddParameter(name, entry->tensor));
    }
  }
  return module;
}

// Registers the children of every module, depth first with an explicit stack:
// a module's children are complete before it is registered in its parent, as
// torch's recursive construction does, so the first clash reported is the
// deepest-first one.
absl::StatusOr<ModulePtr> Freeze(
    const FlatTree& tree, const std::vector<const std::string*>& classes,
    const absl::flat_hash_set<std::string>& buffers) {
  const std::vector<FlatNode>& nodes = tree.nodes();
  std::vector<std::shared_ptr<Module>> modules(nodes.size());
  struct Frame {
    size_t node;
    size_t next_child;
  };
  std::vector<Frame> stack = {{0, 0}};
  ASSIGN_OR_RETURN(modules[0], NewModule(nodes[0], classes[0], buffers));
  while (true) {
    const Frame top = stack.back();
    const FlatNode& node = nodes[top.node];
    if (top.next_child < node.children.size()) {
      const size_t child = node.children[top.next_child];
      ++stack.back().next_child;
      ASSIGN_OR_RETURN(modules[child],
                       NewModule(nodes[child], classes[child], buffers));
      stack.push_back({child, 0});
      continue;
    }
    stack.pop_back();
    if (stack.empty()) return ModulePtr(std::move(modules[top.node]));
    absl::Status added = modules[stack.back().node]->AddChild(
        node.name, std::move(modules[top.node]));
    if (!added.ok()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "state dict keys name the same thing as a tensor and as a module: ",
          added.message()));
    }
  }
}

}  // namespace

absl::StatusOr<ModulePtr> BuildModuleFromStateDict(
    const StateDict& state, const ModuleTreeOptions& options) {
  for (const std::string& key : options.buffer_keys) {
    if (state.Find(key) == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat("buffer key \"", key, "\" is not in the state dict"));
    }
  }
  absl::flat_hash_set<std::string> buffers(options.buffer_keys.begin(),
                                           options.buffer_keys.end());
  FlatTree tree;
  for (const StateDict::Entry& entry : state.entries()) {
    RETURN_IF_ERROR(tree.Add(entry));
  }
  ASSIGN_OR_RETURN(std::vector<const std::string*> classes,
                   ResolveClassNames(options.class_names, &tree));
  return Freeze(tree, classes, buffers);
}

absl::StatusOr<ModulePtr> BuildModuleFromStateDict(
    const StateDict& state, const std::vector<std::string>& buffer_keys) {
  ModuleTreeOptions options;
  options.buffer_keys = buffer_keys;
  return BuildModuleFromStateDict(state, options);
}

}  // namespace modelstate

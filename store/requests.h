// The use cases every transport serves (gRPC handlers, the C++ and Python
// clients, followers), as request structs in torch's vocabulary: `module`,
// `recurse`, `strict`, `assign`. A transport decodes its message into one of
// these, makes one ModelStore call, and encodes the result.
#ifndef MODELSTATE_STORE_REQUESTS_H_
#define MODELSTATE_STORE_REQUESTS_H_

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/types/optional.h"
#include "model/dtype.h"
#include "model/state_dict.h"

namespace modelstate {

// torch's `model.get_submodule(module).state_dict()`, of one model version.
struct FetchRequest {
  // Implicit, so that `client->StateDict("policy")` reads as it means.
  FetchRequest(std::string model_name = "") : model(std::move(model_name)) {}
  FetchRequest(const char* model_name) : model(model_name) {}

  std::string model;
  // A retained version; 0 for the current one.
  int64_t version = 0;
  // Consistent reads: when positive, wait (up to a deadline the transport
  // sets) until the model's current version is at least this, then serve the
  // request as without it; Unavailable if the wait times out. See
  // store/version_wait.h.
  int64_t min_version = 0;
  // Resumed fetches: the stream's data starts at this byte of the
  // concatenation of the selected tensors' bytes (the Chunk.offset
  // coordinate); the manifest still describes every tensor. OutOfRange past
  // the total. A resuming client pins `version` so that the bytes are the
  // same.
  uint64_t offset = 0;
  // Dotted submodule path; "" for the whole model.
  std::string module;
  // With `module`: keys keep its path ("encoder.fc.weight") rather than being
  // relative to it ("fc.weight").
  bool keep_module_prefix = true;
  // When non-empty, only these keys (as they will be emitted), in this order.
  std::vector<std::string> keys;
  // torch's recurse: false gives the module's own tensors only.
  bool recurse = true;
  // False gives parameters only.
  bool include_buffers = true;
  // Cast floating tensors to this floating dtype (torch's `.to(dtype)`).
  absl::optional<DType> dtype;
  // Per emitted key: cast that floating tensor to this floating dtype instead
  // (a refresh asks for each destination's own dtype).
  std::map<std::string, DType> key_dtypes;
  // The receiver takes a tensor held under several keys once (see
  // FetchPlan::shared_with).
  bool accept_shared_tensors = false;
};

// What a fetch serves: an immutable state dict of one version, tensors in
// torch's key order (cast when asked), sharing storage with the model.
struct FetchPlan {
  std::string model;
  int64_t version = 0;
  // Shared by every fetch of the same selection while the version lives
  // (store/state_dict_memo.h).
  std::shared_ptr<const StateDict> state;
  // The epoch of the store's history (store/lineage.h); 0: unknown.
  uint64_t epoch = 0;
  // Where the data starts (FetchRequest::offset), at most the sent bytes.
  uint64_t offset = 0;
  // With FetchRequest::accept_shared_tensors, per entry of `state` the index
  // of the earlier entry whose bytes it shares (torch's tied parameters), or
  // -1; such entries send no bytes. Empty otherwise: every entry sends its own.
  std::vector<int64_t> shared_with;

  // The tensors whose bytes travel, in order: all but the shared ones.
  std::vector<Tensor> SentTensors() const;
  uint64_t SentBytes() const;
};

// A change to the set of models, as WatchModel streams it.
struct ModelEvent {
  // kCurrent and kAbsent only open a watch (ModelStore::Watch): the model's
  // state when the watch began. kListed ends the kCurrent events that open a
  // watch over every model (ModelStore::WatchAll); its `model` is empty.
  enum class Type { kCreated, kUpdated, kDeleted, kCurrent, kAbsent, kListed };
  Type type;
  std::string model;
  // For kDeleted, the version the model had when it was deleted.
  int64_t version = 0;
  // The epoch of the sender's history (store/lineage.h); 0: unknown.
  uint64_t epoch = 0;
};

// One model at one version, as ListModels shows it.
struct ModelSummary {
  std::string name;
  int64_t version = 0;
  int64_t num_tensors = 0;  // Of its state dict.
  uint64_t num_bytes = 0;   // Of its state dict's tensors.
  std::string root_class;   // torch class of the root module.
};

// One state-dict entry as a manifest describes it.
struct TensorDescription {
  std::string name;
  TensorKind kind = TensorKind::kParameter;
  DType dtype = DType::kFloat32;
  Shape shape;
  uint64_t num_bytes = 0;
  uint64_t checksum = 0;  // XXH3-64 of the bytes.
};

// A model's manifest, or one submodule's (GetModel).
struct ModelManifest {
  // The described module: the model's name and current version, and the
  // module's own tensor count, bytes and class.
  ModelSummary summary;
  int64_t version = 0;                     // The version described.
  std::vector<int64_t> retained_versions;  // Held in memory, newest first.
  std::vector<TensorDescription> tensors;  // Keys keep the module prefix.
  std::string architecture_json;           // Empty for models from tensors.
  // Module path ("" for the root) -> torch class name, for every module of the
  // described subtree: with the tensors' kinds, what a follower needs to
  // rebuild an identical tree (model/module_tree.h).
  std::map<std::string, std::string> class_names;
  // The epoch of the describing store's history (store/lineage.h), which
  // `version` is a version of; 0: unknown.
  uint64_t epoch = 0;
};

// torch's `model.get_submodule(module).load_state_dict(state, strict, assign)`
// applied atomically, with compare-and-set and create-from-tensors.
struct LoadRequest {
  // Implicit, so that `client->LoadStateDict("policy", state)` reads as it
  // means.
  LoadRequest(std::string model_name = "") : model(std::move(model_name)) {}
  LoadRequest(const char* model_name) : model(model_name) {}

  std::string model;
  // Dotted submodule path to load into; keys are relative to it.
  std::string module;
  bool strict = true;
  // Keep the checkpoint's dtypes, replacing the module's tensors.
  bool assign = false;
  // Fail with Aborted unless the model is at this version (0: must not exist).
  absl::optional<int64_t> expected_version;
  // When the model does not exist, create it from the loaded tensors instead
  // of NotFound.
  bool create_if_missing = false;
  // With create_if_missing: keys that become buffers rather than parameters.
  std::vector<std::string> buffer_keys;
  // With create_if_missing: module path ("" for the root) -> torch class name,
  // used in torch's messages ("for Net:") and for class-specific load rules.
  std::map<std::string, std::string> class_names;
  // The epoch of the describing store's history (store/lineage.h), which
  // `version` is a version of; 0: unknown.
  uint64_t epoch = 0;
};

// torch's load_state_dict return value, plus the version committed.
struct LoadOutcome {
  int64_t version = 0;
  std::vector<std::string> missing_keys;
  std::vector<std::string> unexpected_keys;
  bool created = false;
};

// The state-dict options a fetch request selects.
StateDictOptions ToStateDictOptions(const FetchRequest& request);

// The manifest entries of `state` (checksums computed once per tensor and
// cached).
std::vector<TensorDescription> DescribeTensors(const StateDict& state);

}  // namespace modelstate

#endif  // MODELSTATE_STORE_REQUESTS_H_

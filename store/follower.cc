#include "store/follower.h"

#include <algorithm>
#include <set>
#include <tuple>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/status_macros.h"
#include "model/module_tree.h"

namespace modelstate {
namespace {

// A tensor's content as a manifest names it: equal contents are
// interchangeable, whatever key or version they came from.
using Content = std::tuple<uint64_t, DType, Shape>;

Content ContentOf(const TensorDescription& tensor) {
  return {tensor.checksum, tensor.dtype, tensor.shape};
}

Content ContentOf(const Tensor& tensor) {
  return {tensor.Checksum(), tensor.dtype(), tensor.shape()};
}

// True when `state` has exactly the manifest's keys, kinds and contents, in
// its order.
bool SameTensors(const StateDict& state, const ModelManifest& manifest) {
  if (state.size() != manifest.tensors.size()) return false;
  for (size_t i = 0; i < state.size(); ++i) {
    const StateDict::Entry& entry = state.entries()[i];
    const TensorDescription& wanted = manifest.tensors[i];
    if (entry.key != wanted.name || entry.kind != wanted.kind ||
        ContentOf(entry.tensor) != ContentOf(wanted)) {
      return false;
    }
  }
  return true;
}

// The versions of `model` the store holds, current first.
std::vector<Snapshot> HeldVersions(const ModelStore& store,
                                   const std::string& model) {
  std::vector<Snapshot> held;
  absl::StatusOr<std::vector<int64_t>> versions = store.RetainedVersions(model);
  if (!versions.ok()) return held;
  for (int64_t version : *versions) {
    absl::StatusOr<Snapshot> snapshot = store.GetSnapshot(model, version);
    if (snapshot.ok()) held.push_back(*std::move(snapshot));
  }
  return held;
}

}  // namespace

bool IsModelLocal(const absl::Status& status) {
  return status.code() == absl::StatusCode::kResourceExhausted ||
         status.code() == absl::StatusCode::kInvalidArgument ||
         status.code() == absl::StatusCode::kFailedPrecondition;
}

SyncPlan PlanSync(const ModelManifest& manifest,
                  const std::vector<Snapshot>& held_versions) {
  SyncPlan plan;
  std::map<Content, Tensor> held;
  for (const Snapshot& snapshot : held_versions) {
    absl::StatusOr<StateDict> state = GetStateDict(snapshot.root);
    if (!state.ok()) continue;
    if (&snapshot == &held_versions.front() &&
        snapshot.version == manifest.version &&
        snapshot.architecture == manifest.architecture_json &&
        SameTensors(*state, manifest)) {
      plan.up_to_date = true;
    }
    for (const StateDict::Entry& entry : state->entries())
      held.emplace(ContentOf(entry.tensor), entry.tensor);
  }
  std::set<Content> requested;
  plan.held.reserve(manifest.tensors.size());
  for (const TensorDescription& tensor : manifest.tensors) {
    auto found = held.find(ContentOf(tensor));
    if (found != held.end()) {
      plan.held.push_back(found->second);
      ++plan.reused_tensors;
      plan.reused_bytes += tensor.num_bytes;
      continue;
    }
    plan.held.push_back(absl::nullopt);
    if (requested.insert(ContentOf(tensor)).second) {
      plan.fetch_keys.push_back(tensor.name);
      plan.fetch_bytes += tensor.num_bytes;
    }
  }
  return plan;
}

namespace {

// The fetched tensors by content, each checked against its description.
absl::StatusOr<std::map<Content, Tensor>> VerifyFetched(
    const ModelManifest& manifest, const SyncPlan& plan,
    const StateDict& fetched) {
  if (fetched.size() != plan.fetch_keys.size()) {
    return absl::DataLossError(absl::StrCat("asked the upstream for ",
                                            plan.fetch_keys.size(),
                                            " tensors, got ", fetched.size()));
  }
  std::map<std::string, const TensorDescription*> described;
  for (const TensorDescription& tensor : manifest.tensors)
    described.emplace(tensor.name, &tensor);
  std::map<Content, Tensor> by_content;
  for (size_t i = 0; i < fetched.size(); ++i) {
    const StateDict::Entry& entry = fetched.entries()[i];
    auto description = described.find(plan.fetch_keys[i]);
    if (entry.key != plan.fetch_keys[i] || description == described.end() ||
        ContentOf(entry.tensor) != ContentOf(*description->second)) {
      return absl::DataLossError(
          absl::StrCat("tensor \"", plan.fetch_keys[i], "\" of ",
                       manifest.summary.name, " version ", manifest.version,
                       " does not match the upstream's manifest"));
    }
    by_content.emplace(ContentOf(entry.tensor), entry.tensor);
  }
  return by_content;
}

}  // namespace

absl::StatusOr<Snapshot> BuildReplica(const ModelManifest& manifest,
                                      const SyncPlan& plan,
                                      const StateDict& fetched) {
  ASSIGN_OR_RETURN(const auto by_content,
                   VerifyFetched(manifest, plan, fetched));
  StateDict state;
  ModuleTreeOptions tree;
  tree.class_names = manifest.class_names;
  for (size_t i = 0; i < manifest.tensors.size(); ++i) {
    const TensorDescription& tensor = manifest.tensors[i];
    const Tensor* value = plan.held[i] ? &*plan.held[i] : nullptr;
    if (value == nullptr) {
      auto found = by_content.find(ContentOf(tensor));
      if (found == by_content.end()) {
        return absl::DataLossError(
            absl::StrCat("tensor \"", tensor.name, "\" was not fetched"));
      }
      value = &found->second;
    }
    RETURN_IF_ERROR(state.Insert(tensor.name, *value, tensor.kind));
    if (tensor.kind == TensorKind::kBuffer)
      tree.buffer_keys.push_back(tensor.name);
  }
  ASSIGN_OR_RETURN(ModulePtr root, BuildModuleFromStateDict(state, tree));
  return Snapshot{manifest.summary.name, manifest.version, std::move(root),
                  manifest.architecture_json, /*memo=*/nullptr};
}

absl::StatusOr<SyncOutcome> SyncModel(ModelStore& store, Upstream& upstream,
                                      const std::string& model) {
  // Each attempt pins the version it described; a fetch that finds it gone
  // (superseded and not retained upstream) starts over with the newer one.
  constexpr int kAttempts = 5;
  for (int attempt = 0; attempt < kAttempts; ++attempt) {
    ASSIGN_OR_RETURN(const ModelManifest manifest, upstream.Describe(model, 0));
    const SyncPlan plan = PlanSync(manifest, HeldVersions(store, model));
    SyncOutcome outcome;
    outcome.model = model;
    outcome.version = manifest.version;
    if (plan.up_to_date) return outcome;
    StateDict fetched;
    if (!plan.fetch_keys.empty()) {
      RETURN_IF_ERROR(
          store.CheckMemoryFor(static_cast<int64_t>(plan.fetch_bytes)));
      absl::StatusOr<StateDict> got =
          upstream.Fetch(model, manifest.version, plan.fetch_keys);
      if (got.status().code() == absl::StatusCode::kNotFound) continue;
      RETURN_IF_ERROR(got.status());
      fetched = *std::move(got);
    }
    ASSIGN_OR_RETURN(Snapshot replica, BuildReplica(manifest, plan, fetched));
    RETURN_IF_ERROR(store.ApplyReplicated(std::move(replica)));
    outcome.committed = true;
    outcome.tensors_fetched = static_cast<int64_t>(plan.fetch_keys.size());
    outcome.bytes_fetched = plan.fetch_bytes;
    outcome.tensors_reused = plan.reused_tensors;
    outcome.bytes_reused = plan.reused_bytes;
    return outcome;
  }
  return absl::AbortedError(
      absl::StrCat("model \"", model, "\" changed on ", upstream.name(),
                   " faster than it could be fetched; will retry"));
}

Follower::Follower(ModelStore* store, Upstream* upstream,
                   FollowerOptions options)
    : store_(store), upstream_(upstream), options_(std::move(options)) {}

void Follower::Log(const std::string& line) const {
  if (options_.log) options_.log(line);
}

bool Follower::stopping() const {
  absl::MutexLock lock(&mu_);
  return stopping_;
}

void Follower::Stop() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  upstream_->Cancel();
}

bool Follower::synced() const {
  absl::MutexLock lock(&mu_);
  return stats_.synced;
}

FollowerStats Follower::stats() const {
  absl::MutexLock lock(&mu_);
  FollowerStats stats = stats_;
  stats.lag_versions = 0;
  for (const auto& [model, version] : announced_) {
    absl::StatusOr<Snapshot> held = store_->GetSnapshot(model);
    const int64_t ours = held.ok() ? held->version : 0;
    stats.lag_versions += std::max<int64_t>(0, version - ours);
  }
  return stats;
}

void Follower::Run() {
  absl::Duration backoff = options_.min_backoff;
  while (!stopping()) {
    absl::Status status = FollowOnce();
    bool was_connected;
    {
      absl::MutexLock lock(&mu_);
      if (stopping_) break;
      was_connected = stats_.connected;
      stats_.connected = false;
      ++stats_.upstream_failures;
    }
    // A watch that got as far as its listing was a working connection: the
    // next failure starts the backoff over.
    if (was_connected) backoff = options_.min_backoff;
    Log(absl::StrCat("follow: upstream ", upstream_->name(), " unavailable (",
                     status.ToString(), "); still serving what we hold; ",
                     "retrying in ", absl::FormatDuration(backoff)));
    absl::MutexLock lock(&mu_);
    mu_.AwaitWithTimeout(absl::Condition(&stopping_), backoff);
    backoff = std::min(backoff * 2, options_.max_backoff);
  }
}

absl::Status Follower::FollowOnce() {
  listing_.clear();
  {
    absl::MutexLock lock(&mu_);
    announced_.clear();
  }
  absl::Status handled;
  absl::Status watched = upstream_->WatchAll([&](const ModelEvent& event) {
    if (stopping()) return false;
    handled = Handle(event);
    return handled.ok();
  });
  if (!handled.ok()) return handled;
  if (watched.ok()) return absl::UnavailableError("the watch ended");
  return watched;
}

void Follower::Announce(const ModelEvent& event) {
  absl::MutexLock lock(&mu_);
  int64_t& announced = announced_[event.model];
  announced = std::max(announced, event.version);
}

absl::Status Follower::Handle(const ModelEvent& event) {
  switch (event.type) {
    case ModelEvent::Type::kCurrent:
      listing_[event.model] = event.version;
      Announce(event);
      return Sync(event.model);
    case ModelEvent::Type::kCreated:
    case ModelEvent::Type::kUpdated:
      Announce(event);
      return Sync(event.model);
    case ModelEvent::Type::kDeleted: {
      {
        absl::MutexLock lock(&mu_);
        announced_.erase(event.model);
      }
      absl::Status removed = store_->RemoveReplicated(event.model);
      if (removed.code() == absl::StatusCode::kNotFound)
        return absl::OkStatus();
      RETURN_IF_ERROR(removed);
      Log(absl::StrCat("follow: deleted ", event.model, " (deleted on ",
                       upstream_->name(), ")"));
      absl::MutexLock lock(&mu_);
      ++stats_.deletes;
      return absl::OkStatus();
    }
    case ModelEvent::Type::kListed:
      return RemoveAbsent();
    case ModelEvent::Type::kAbsent:
      // Only a watch of one model starts so: the upstream ignored
      // all_models, so it predates followers.
      return absl::FailedPreconditionError(
          absl::StrCat("upstream ", upstream_->name(),
                       " does not serve watches over all models; upgrade it"));
  }
  return absl::OkStatus();
}

absl::Status Follower::Sync(const std::string& model) {
  const absl::Time start = absl::Now();
  absl::StatusOr<SyncOutcome> outcome = SyncModel(*store_, *upstream_, model);
  // Gone upstream meanwhile: its DELETED event (or the next listing) removes
  // it here.
  if (outcome.status().code() == absl::StatusCode::kNotFound)
    return absl::OkStatus();
  if (IsModelLocal(outcome.status())) {
    // This model cannot be applied here (it does not fit, or its tree is
    // refused); the others still can, so the watch goes on. The model is
    // tried again at its next commit or the next listing.
    Log(absl::StrCat("follow: cannot sync ", model, " from ", upstream_->name(),
                     ": ", outcome.status().ToString(),
                     "; serving the version held, if any"));
    absl::MutexLock lock(&mu_);
    ++stats_.sync_failures;
    return absl::OkStatus();
  }
  RETURN_IF_ERROR(outcome.status());
  if (!outcome->committed) return absl::OkStatus();
  Log(absl::StrCat("follow: synced ", model, " to version ", outcome->version,
                   " from ", upstream_->name(), ": fetched ",
                   outcome->tensors_fetched, " tensors (",
                   outcome->bytes_fetched, " bytes), reused ",
                   outcome->tensors_reused, " tensors (", outcome->bytes_reused,
                   " bytes) in ", absl::FormatDuration(absl::Now() - start)));
  absl::MutexLock lock(&mu_);
  ++stats_.syncs;
  stats_.tensors_fetched += outcome->tensors_fetched;
  stats_.tensors_reused += outcome->tensors_reused;
  stats_.bytes_fetched += outcome->bytes_fetched;
  stats_.bytes_reused += outcome->bytes_reused;
  return absl::OkStatus();
}

absl::Status Follower::RemoveAbsent() {
  for (const Snapshot& held : store_->List()) {
    if (listing_.count(held.model) > 0) continue;
    absl::Status removed = store_->RemoveReplicated(held.model);
    if (!removed.ok() && removed.code() != absl::StatusCode::kNotFound)
      return removed;
    Log(absl::StrCat("follow: deleted ", held.model, " (not on ",
                     upstream_->name(), ")"));
    absl::MutexLock lock(&mu_);
    ++stats_.deletes;
  }
  bool first = false;
  {
    absl::MutexLock lock(&mu_);
    stats_.connected = true;
    first = !stats_.synced;
    stats_.synced = true;
  }
  store_->MarkReplicaSynced();
  Log(absl::StrCat("follow: mirrored all ", listing_.size(), " models of ",
                   upstream_->name(), "; following its commits"));
  if (first && options_.on_first_sync) options_.on_first_sync();
  return absl::OkStatus();
}

}  // namespace modelstate

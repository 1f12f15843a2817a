#include "store/follower.h"

#include <algorithm>
#include <iterator>
#include <set>
#include <thread>
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

namespace {

// Fetches the plan's keys of the described version, telling `options` the
// bytes left as they arrive.
absl::StatusOr<StateDict> FetchPlanned(Upstream& upstream,
                                       const ModelManifest& manifest,
                                       const SyncPlan& plan,
                                       const SyncOptions& options) {
  if (plan.fetch_keys.empty()) return StateDict();
  auto left = [&options](uint64_t bytes) {
    if (options.on_bytes_left) options.on_bytes_left(bytes);
  };
  left(plan.fetch_bytes);
  absl::StatusOr<StateDict> fetched = upstream.Fetch(
      manifest.summary.name, manifest.version, plan.fetch_keys,
      [&](uint64_t received) {
        left(plan.fetch_bytes - std::min(received, plan.fetch_bytes));
      });
  left(0);
  return fetched;
}

// Aborted when `manifest` is of another known epoch than `store`'s.
absl::Status CheckEpoch(const ModelStore& store, const ModelManifest& manifest,
                        const Upstream& upstream) {
  const uint64_t ours = store.epoch();
  if (manifest.epoch == 0 || ours == 0 || manifest.epoch == ours)
    return absl::OkStatus();
  return absl::AbortedError(absl::StrCat(
      upstream.name(), " described ", manifest.summary.name, " of epoch ",
      EpochName(manifest.epoch), ", not this follower's ", EpochName(ours),
      " (a server of another history answered)"));
}

// Whether, going forward only, the described version is already held or
// older than what is held or was deleted here: nothing to apply.
bool NothingNewer(const ModelStore& store, const ModelManifest& manifest,
                  const std::vector<Snapshot>& held) {
  if (!held.empty()) return manifest.version <= held.front().version;
  return store.DeletedVersion(manifest.summary.name) >= manifest.version;
}

}  // namespace

absl::StatusOr<SyncOutcome> SyncModel(ModelStore& store, Upstream& upstream,
                                      const std::string& model,
                                      const SyncOptions& options) {
  const bool forward = options.how == ReplicaWrite::kForward;
  // Each attempt pins the version it described; a fetch that finds it gone
  // (superseded and not retained upstream) starts over with the newer one.
  constexpr int kAttempts = 5;
  for (int attempt = 0; attempt < kAttempts; ++attempt) {
    ASSIGN_OR_RETURN(const ModelManifest manifest, upstream.Describe(model, 0));
    RETURN_IF_ERROR(CheckEpoch(store, manifest, upstream));
    const std::vector<Snapshot> held = HeldVersions(store, model);
    SyncOutcome outcome;
    outcome.model = model;
    outcome.version = manifest.version;
    if (forward && NothingNewer(store, manifest, held)) {
      outcome.stale = held.empty() || manifest.version < held.front().version;
      return outcome;
    }
    const SyncPlan plan = PlanSync(manifest, held);
    if (!plan.fetch_keys.empty()) {
      RETURN_IF_ERROR(
          store.CheckMemoryFor(static_cast<int64_t>(plan.fetch_bytes)));
    }
    absl::StatusOr<StateDict> fetched =
        FetchPlanned(upstream, manifest, plan, options);
    if (fetched.status().code() == absl::StatusCode::kNotFound) continue;
    RETURN_IF_ERROR(fetched.status());
    ASSIGN_OR_RETURN(Snapshot replica, BuildReplica(manifest, plan, *fetched));
    const absl::Status applied =
        store.ApplyReplicated(std::move(replica), options.how);
    // Only a lag makes the store refuse a version going forward.
    if (forward && applied.code() == absl::StatusCode::kAborted) {
      outcome.stale = true;
      return outcome;
    }
    RETURN_IF_ERROR(applied);
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

ModelAction DecideModel(const ModelPosition& held,
                        const ModelPosition& upstream, bool adopting) {
  if (adopting) {
    if (upstream.version > 0) return ModelAction::kReplace;
    if (held.version > 0) return ModelAction::kDrop;
    return upstream.deleted_at > 0 ? ModelAction::kRememberDeletion
                                   : ModelAction::kNothing;
  }
  if (upstream.version > 0) {
    if (held.version == 0) {
      return held.deleted_at >= upstream.version
                 ? ModelAction::kKeepUpstreamBehind
                 : ModelAction::kSync;
    }
    if (upstream.version > held.version) return ModelAction::kSync;
    return upstream.version == held.version ? ModelAction::kNothing
                                            : ModelAction::kKeepUpstreamBehind;
  }
  if (upstream.deleted_at > 0) {
    if (held.version == 0) {
      return upstream.deleted_at > held.deleted_at
                 ? ModelAction::kRememberDeletion
                 : ModelAction::kNothing;
    }
    return upstream.deleted_at >= held.version
               ? ModelAction::kRemove
               : ModelAction::kKeepUpstreamBehind;
  }
  return held.version > 0 ? ModelAction::kKeepUnconfirmed
                          : ModelAction::kNothing;
}

namespace {

// "version 4", "deleted at version 4" or "absent".
std::string Spell(const ModelPosition& position) {
  if (position.version > 0) return absl::StrCat("version ", position.version);
  if (position.deleted_at > 0)
    return absl::StrCat("deleted at version ", position.deleted_at);
  return "absent";
}

}  // namespace

Follower::Follower(ModelStore* store, Upstream* upstream,
                   FollowerOptions options)
    : store_(store), upstream_(upstream), options_(std::move(options)) {
  absl::MutexLock lock(&mu_);
  sync_backoff_ = options_.min_backoff;
}

void Follower::Log(const std::string& line) const {
  if (options_.log) options_.log(line);
}

void Follower::LogRepeated(const std::string& key, const std::string& line) {
  const absl::Time now = absl::Now();
  int64_t held_back = 0;
  {
    absl::MutexLock lock(&mu_);
    auto [it, first] =
        repeats_.try_emplace(key, absl::InfinitePast(), int64_t{0});
    auto& [last, count] = it->second;
    if (now - last < options_.repeat_log_interval) {
      ++count;
      return;
    }
    held_back = count;
    count = 0;
    last = now;
  }
  Log(held_back == 0 ? line
                     : absl::StrCat(line, " (", held_back,
                                    " more like it since the last such line)"));
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

ModelPosition Follower::Held(const std::string& model) const {
  absl::StatusOr<Snapshot> held = store_->GetSnapshot(model);
  if (held.ok()) return {held->version, 0};
  return {0, store_->DeletedVersion(model)};
}

namespace {

// Since the oldest version in `ahead` newer than `held` was first seen; 0
// when there is none.
absl::Duration BehindFor(
    const std::vector<std::pair<int64_t, absl::Time>>& ahead, int64_t held,
    absl::Time now) {
  for (const auto& [version, seen] : ahead) {
    if (version > held) return now - seen;
  }
  return absl::ZeroDuration();
}

}  // namespace

FollowerStats Follower::stats() const {
  const absl::Time now = absl::Now();
  absl::MutexLock lock(&mu_);
  FollowerStats stats = stats_;
  stats.epoch = store_->epoch();
  stats.since_heard =
      watch_up_ ? absl::ZeroDuration() : now - std::max(last_heard_, started_);
  for (const auto& [model, seen] : seen_) {
    const int64_t held = Held(model).version;
    stats.lag_versions += std::max<int64_t>(0, seen.position.version - held);
    stats.behind = std::max(stats.behind, BehindFor(seen.ahead, held, now));
  }
  return stats;
}

std::vector<ModelLag> Follower::model_lags() const {
  const absl::Time now = absl::Now();
  std::map<std::string, ModelLag> lags;
  for (const Snapshot& held : store_->List())
    lags[held.model] = ModelLag{held.model, 0, held.version, {}};
  absl::MutexLock lock(&mu_);
  for (const auto& [model, seen] : seen_) {
    ModelLag& lag = lags[model];
    lag.model = model;
    lag.held_version = Held(model).version;
    lag.upstream_version = seen.position.version;
    lag.behind = BehindFor(seen.ahead, lag.held_version, now);
  }
  std::vector<ModelLag> out;
  for (auto& [model, lag] : lags) out.push_back(std::move(lag));
  return out;
}

void Follower::Run() {
  std::thread syncer([this] { SyncLoop(); });
  absl::Duration backoff = options_.min_backoff;
  while (!stopping()) {
    bool refused = false;
    absl::Status status = FollowOnce(&refused);
    bool was_connected;
    {
      absl::MutexLock lock(&mu_);
      if (stopping_) break;
      was_connected = stats_.connected;
      stats_.connected = false;
      ++stats_.upstream_failures;
    }
    // A watch that got as far as a mirrored listing was a working
    // connection: the next failure starts the backoff over.
    if (was_connected) backoff = options_.min_backoff;
    // A refused epoch has its own (rate-limited) line.
    if (!refused) {
      Log(absl::StrCat("follow: upstream ", upstream_->name(), " unavailable (",
                       status.ToString(),
                       "); still serving what we hold; retrying in ",
                       absl::FormatDuration(backoff)));
    }
    absl::MutexLock lock(&mu_);
    mu_.AwaitWithTimeout(absl::Condition(&stopping_), backoff);
    backoff = std::min(backoff * 2, options_.max_backoff);
  }
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  syncer.join();
}

absl::Status Follower::FollowOnce(bool* refused) {
  Watch watch;
  {
    absl::MutexLock lock(&mu_);
    watch.number = ++watch_number_;
  }
  absl::Status handled;
  absl::Status watched = upstream_->WatchAll([&](const ModelEvent& event) {
    if (stopping()) return false;
    handled = OnEvent(event, watch);
    return handled.ok();
  });
  WatchEnded();
  *refused = watch.refused;
  if (!handled.ok()) return handled;
  if (watched.ok()) return absl::UnavailableError("the watch ended");
  return watched;
}

void Follower::WatchEnded() {
  absl::MutexLock lock(&mu_);
  if (watch_up_) last_heard_ = absl::Now();
  watch_up_ = false;
}

absl::Status Follower::OnEvent(const ModelEvent& event, Watch& watch) {
  {
    absl::MutexLock lock(&mu_);
    watch_up_ = true;
    last_heard_ = absl::Now();
  }
  if (!watch.started) {
    watch.started = true;
    watch.epoch = event.epoch;
  } else if (event.epoch != watch.epoch) {
    return absl::AbortedError(
        absl::StrCat("upstream ", upstream_->name(), " changed its epoch from ",
                     EpochName(watch.epoch), " to ", EpochName(event.epoch),
                     " during the watch; listing it again"));
  }
  ModelPosition position;
  switch (event.type) {
    case ModelEvent::Type::kAbsent:
      // Only a watch of one model starts so: the upstream ignored
      // all_models, so it predates followers.
      return absl::FailedPreconditionError(
          absl::StrCat("upstream ", upstream_->name(),
                       " does not serve watches over all models; upgrade it"));
    case ModelEvent::Type::kListed:
      return watch.listed ? absl::OkStatus() : OnListed(watch);
    case ModelEvent::Type::kDeleted:
      position.deleted_at = event.version;
      break;
    default:
      position.version = event.version;
  }
  if (!watch.listed) {
    // A slow reader's queue may have replaced a model's CURRENT with a later
    // event: whatever comes before kListed is the listing.
    watch.shown[event.model] = position;
    return absl::OkStatus();
  }
  absl::MutexLock lock(&mu_);
  Note(event.model, position);
  return absl::OkStatus();
}

absl::Status Follower::OnListed(Watch& watch) {
  watch.listed = true;
  const EpochDecision decision =
      DecideEpoch(store_->lineage(), !store_->List().empty(), watch.epoch,
                  options_.adoption);
  {
    absl::MutexLock lock(&mu_);
    stats_.upstream_epoch = watch.epoch;
    stats_.epoch_refused = decision.action == EpochAction::kRefuse;
  }
  if (decision.action == EpochAction::kRefuse) {
    watch.refused = true;
    const std::string refusal = absl::StrCat(
        "upstream ", upstream_->name(), " is of epoch ", EpochName(watch.epoch),
        ", another history than this follower's ", EpochName(store_->epoch()),
        " (its primary lost its data or was "
        "started with --new_epoch)");
    LogRepeated(
        absl::StrCat("epoch ", watch.epoch),
        absl::StrCat("follow: WARNING: ", refusal, "; still serving the ",
                     store_->List().size(),
                     " models held and applying nothing of it. To take on "
                     "its history, restart with --adopt_epoch=",
                     EpochName(watch.epoch),
                     " (docs/operations.md, \"Primary lost its data\")"));
    return absl::FailedPreconditionError(refusal);
  }
  auto listing = std::make_unique<Listing>();
  listing->watch = watch.number;
  listing->decision = decision;
  listing->shown = std::move(watch.shown);
  absl::MutexLock lock(&mu_);
  // The listing replaces what earlier watches showed.
  for (auto it = seen_.begin(); it != seen_.end();) {
    it = listing->shown.count(it->first) > 0 ? std::next(it) : seen_.erase(it);
  }
  for (const auto& [model, position] : listing->shown) Note(model, position);
  // A new listing is a fresh start: no sync waits for an older failure.
  sync_pause_until_ = absl::InfinitePast();
  sync_backoff_ = options_.min_backoff;
  listing_ = std::move(listing);
  return absl::OkStatus();
}

void Follower::Note(const std::string& model, const ModelPosition& position) {
  Seen& seen = seen_[model];
  seen.position = position;
  const int64_t held = Held(model).version;
  if (position.version > held &&
      (seen.ahead.empty() || seen.ahead.back().first < position.version)) {
    seen.ahead.emplace_back(position.version, absl::Now());
  }
  dirty_.insert(model);
}

void Follower::SyncLoop() {
  while (true) {
    Work work = NextWork();
    if (work.stop) return;
    if (work.listing == nullptr) {
      Reconcile(work.model);
      continue;
    }
    const absl::Status started = StartListing(*work.listing);
    if (started.ok()) continue;
    Log(absl::StrCat("follow: cannot start mirroring the listing of ",
                     upstream_->name(), ": ", started.ToString()));
    absl::MutexLock lock(&mu_);
    // Tried again after a pause, unless a newer listing came meanwhile.
    if (listing_ == nullptr) listing_ = std::move(work.listing);
    sync_pause_until_ = absl::Now() + sync_backoff_;
    sync_backoff_ = std::min(sync_backoff_ * 2, options_.max_backoff);
  }
}

Follower::Work Follower::NextWork() {
  absl::MutexLock lock(&mu_);
  while (true) {
    if (stopping_) return Work{true, nullptr, ""};
    if (listing_ != nullptr) return Work{false, std::move(listing_), ""};
    const absl::Time now = absl::Now();
    if (now < sync_pause_until_) {
      auto woken = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        return stopping_ || listing_ != nullptr;
      };
      mu_.AwaitWithDeadline(absl::Condition(&woken), sync_pause_until_);
      continue;
    }
    if (!dirty_.empty()) {
      Work work{false, nullptr, *dirty_.begin()};
      dirty_.erase(dirty_.begin());
      return work;
    }
    auto ready = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      return stopping_ || listing_ != nullptr || !dirty_.empty();
    };
    mu_.Await(absl::Condition(&ready));
  }
}

absl::Status Follower::StartListing(const Listing& listing) {
  const EpochDecision& decision = listing.decision;
  const Lineage lineage = store_->lineage();
  const bool adopt = decision.action == EpochAction::kAdopt;
  if (adopt && !(lineage.adopting && lineage.epoch == decision.epoch)) {
    Log(absl::StrCat("follow: adopting epoch ", EpochName(decision.epoch),
                     " of ", upstream_->name(), " (this follower held epoch ",
                     EpochName(lineage.epoch),
                     "): every model held is replaced with the upstream's, "
                     "and those it lacks are removed"));
    RETURN_IF_ERROR(store_->BeginAdoption(decision.epoch));
    absl::MutexLock lock(&mu_);
    replaced_.clear();
  } else if (!adopt && decision.epoch != lineage.epoch) {
    RETURN_IF_ERROR(store_->RecordEpoch(decision.epoch));
    Log(absl::StrCat("follow: following epoch ", EpochName(decision.epoch),
                     " of ", upstream_->name()));
  }
  bool nothing_to_do;
  {
    absl::MutexLock lock(&mu_);
    adopting_ = adopt;
    mirroring_watch_ = listing.watch;
    unmirrored_.clear();
    for (const auto& [model, position] : listing.shown)
      unmirrored_.insert(model);
    for (const Snapshot& held : store_->List()) unmirrored_.insert(held.model);
    dirty_.insert(unmirrored_.begin(), unmirrored_.end());
    nothing_to_do = unmirrored_.empty();
  }
  if (nothing_to_do) ListingMirrored();
  return absl::OkStatus();
}

void Follower::Reconcile(const std::string& model) {
  ModelPosition upstream;
  bool adopting;
  {
    absl::MutexLock lock(&mu_);
    auto seen = seen_.find(model);
    if (seen != seen_.end()) upstream = seen->second.position;
    adopting = adopting_ && replaced_.count(model) == 0;
  }
  const ModelAction action = DecideModel(Held(model), upstream, adopting);
  Reconciled(model, Act(model, action, upstream));
}

absl::Status Follower::Act(const std::string& model, ModelAction action,
                           const ModelPosition& upstream) {
  switch (action) {
    case ModelAction::kNothing:
      return absl::OkStatus();
    case ModelAction::kSync:
      return Sync(model, upstream.version, ReplicaWrite::kForward);
    case ModelAction::kReplace:
      return Sync(model, upstream.version, ReplicaWrite::kReplace);
    case ModelAction::kRemove:
    case ModelAction::kRememberDeletion:
      return Remove(model, upstream, ReplicaWrite::kForward);
    case ModelAction::kDrop:
      return Remove(model, upstream, ReplicaWrite::kReplace);
    case ModelAction::kKeepUpstreamBehind:
    case ModelAction::kKeepUnconfirmed:
      KeepStale(model, Held(model), upstream);
      return absl::OkStatus();
  }
  return absl::OkStatus();
}

void Follower::KeepStale(const std::string& model, const ModelPosition& held,
                         const ModelPosition& upstream) {
  {
    absl::MutexLock lock(&mu_);
    ++stats_.stale_answers;
  }
  const std::string why =
      upstream.version == 0 && upstream.deleted_at == 0
          ? absl::StrCat("it is not on ", upstream_->name(),
                         ", which remembers no deletion of it (it may lag)")
          : absl::StrCat(upstream_->name(), " shows it ", Spell(upstream),
                         " (it lags)");
  LogRepeated(
      absl::StrCat("stale ", model),
      absl::StrCat("follow: keeping ", model, " ", Spell(held), ": ", why));
}

absl::Status Follower::Sync(const std::string& model, int64_t wanted,
                            ReplicaWrite how) {
  const absl::Time start = absl::Now();
  SyncOptions options;
  options.how = how;
  options.on_bytes_left = [this](uint64_t left) {
    absl::MutexLock lock(&mu_);
    stats_.sync_bytes_in_flight = left;
  };
  absl::StatusOr<SyncOutcome> outcome =
      SyncModel(*store_, *upstream_, model, options);
  const bool replacing = how == ReplicaWrite::kReplace;
  // Gone upstream meanwhile: its DELETED event (or the next listing) says
  // so; when adopting, the upstream's state is that it has none.
  if (outcome.status().code() == absl::StatusCode::kNotFound) {
    return replacing ? Remove(model, {}, how) : absl::OkStatus();
  }
  if (IsModelLocal(outcome.status())) {
    // This model cannot be applied here (it does not fit, or its tree is
    // refused); the others still can. It is tried again at its next commit
    // or the next listing. A model of the old epoch does not stay meanwhile.
    Log(absl::StrCat("follow: cannot sync ", model, " from ", upstream_->name(),
                     ": ", outcome.status().ToString(),
                     replacing ? "; removed, being of the epoch left"
                               : "; serving the version held, if any"));
    {
      absl::MutexLock lock(&mu_);
      ++stats_.sync_failures;
    }
    return replacing ? Remove(model, {}, how) : absl::OkStatus();
  }
  RETURN_IF_ERROR(outcome.status());
  if (outcome->committed) Synced(*outcome, absl::Now() - start);
  if (replacing || outcome->version >= wanted) return absl::OkStatus();
  // The server that described it (behind a load balancer, another than the
  // watch's) lags behind what the watch showed: try again after a pause.
  if (!outcome->committed) KeepStale(model, Held(model), {outcome->version, 0});
  return absl::UnavailableError(
      absl::StrCat("it described ", model, " at version ", outcome->version,
                   " after its watch showed version ", wanted));
}

void Follower::Synced(const SyncOutcome& outcome, absl::Duration took) {
  Log(absl::StrCat("follow: synced ", outcome.model, " to version ",
                   outcome.version, " from ", upstream_->name(), ": fetched ",
                   outcome.tensors_fetched, " tensors (", outcome.bytes_fetched,
                   " bytes), reused ", outcome.tensors_reused, " tensors (",
                   outcome.bytes_reused, " bytes) in ",
                   absl::FormatDuration(took)));
  absl::MutexLock lock(&mu_);
  ++stats_.syncs;
  stats_.tensors_fetched += outcome.tensors_fetched;
  stats_.tensors_reused += outcome.tensors_reused;
  stats_.bytes_fetched += outcome.bytes_fetched;
  stats_.bytes_reused += outcome.bytes_reused;
}

absl::Status Follower::Remove(const std::string& model,
                              const ModelPosition& upstream, ReplicaWrite how) {
  const ModelPosition held = Held(model);
  const absl::Status removed =
      store_->RemoveReplicated(model, upstream.deleted_at, how);
  // Only a lag makes the store refuse a deletion going forward.
  if (how == ReplicaWrite::kForward &&
      removed.code() == absl::StatusCode::kAborted) {
    KeepStale(model, held, upstream);
    return absl::OkStatus();
  }
  RETURN_IF_ERROR(removed);
  if (held.version == 0) return absl::OkStatus();
  Log(absl::StrCat("follow: deleted ", model, " (",
                   upstream.deleted_at > 0
                       ? absl::StrCat("deleted on ", upstream_->name(),
                                      " at version ", upstream.deleted_at)
                       : absl::StrCat("not on ", upstream_->name(),
                                      ", whose epoch is being adopted"),
                   ")"));
  absl::MutexLock lock(&mu_);
  ++stats_.deletes;
  return absl::OkStatus();
}

void Follower::Reconciled(const std::string& model,
                          const absl::Status& status) {
  bool mirrored = false;
  absl::Duration pause;
  {
    absl::MutexLock lock(&mu_);
    if (!status.ok()) {
      // Tried again after a pause that grows while the upstream fails.
      dirty_.insert(model);
      pause = sync_backoff_;
      sync_pause_until_ = absl::Now() + pause;
      sync_backoff_ = std::min(sync_backoff_ * 2, options_.max_backoff);
    } else {
      sync_backoff_ = options_.min_backoff;
      if (adopting_) replaced_.insert(model);
      auto seen = seen_.find(model);
      if (seen != seen_.end()) {
        auto& ahead = seen->second.ahead;
        const int64_t held = Held(model).version;
        while (!ahead.empty() && ahead.front().first <= held)
          ahead.erase(ahead.begin());
      }
      mirrored = unmirrored_.erase(model) > 0 && unmirrored_.empty();
    }
  }
  if (!status.ok() && !stopping()) {
    Log(absl::StrCat("follow: cannot sync ", model, " from ", upstream_->name(),
                     " (", status.ToString(),
                     "); still serving what we hold; retrying in ",
                     absl::FormatDuration(pause)));
  }
  if (mirrored) ListingMirrored();
}

void Follower::ListingMirrored() {
  bool adopted;
  {
    absl::MutexLock lock(&mu_);
    adopted = adopting_;
    adopting_ = false;
    replaced_.clear();
  }
  if (adopted) {
    // On error the record still says adopting: the next listing adopts
    // again.
    const absl::Status ended = store_->EndAdoption();
    Log(ended.ok()
            ? absl::StrCat("follow: adopted epoch ", EpochName(store_->epoch()),
                           " of ", upstream_->name())
            : absl::StrCat("follow: cannot record the adoption: ",
                           ended.ToString()));
  }
  store_->MarkReplicaSynced();
  Log(absl::StrCat("follow: mirrored all ", store_->List().size(),
                   " models of ", upstream_->name(),
                   "; following its commits"));
  bool first;
  {
    absl::MutexLock lock(&mu_);
    stats_.connected = watch_up_ && mirroring_watch_ == watch_number_;
    first = !stats_.synced;
    stats_.synced = true;
  }
  if (first && options_.on_first_sync) options_.on_first_sync();
}

}  // namespace modelstate

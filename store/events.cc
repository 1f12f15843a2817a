#include "store/events.h"

#include <utility>

#include "absl/strings/str_cat.h"

namespace modelstate {

StoreEvents::StoreEvents(const Catalog& catalog, std::string replica_of)
    : catalog_(catalog), replica_of_(std::move(replica_of)) {}

ModelEvent StoreEvents::Stamped(ModelEvent event) const {
  event.epoch = catalog_.epoch();
  return event;
}

absl::Status StoreEvents::Commit(
    absl::FunctionRef<absl::StatusOr<ModelEvent>()> change) {
  return CommitIfAny([&]() -> absl::StatusOr<absl::optional<ModelEvent>> {
    absl::StatusOr<ModelEvent> event = change();
    if (!event.ok()) return event.status();
    return *std::move(event);
  });
}

absl::Status StoreEvents::CommitIfAny(
    absl::FunctionRef<absl::StatusOr<absl::optional<ModelEvent>>()> change) {
  absl::MutexLock lock(&mu_);
  absl::StatusOr<absl::optional<ModelEvent>> event = change();
  if (!event.ok()) return event.status();
  if (!event->has_value()) return absl::OkStatus();
  const ModelEvent stamped = Stamped(**event);
  for (const auto& [id, listener] : listeners_) listener(stamped);
  return absl::OkStatus();
}

absl::Status StoreEvents::CommitSilently(
    absl::FunctionRef<absl::Status()> change) {
  absl::MutexLock lock(&mu_);
  return change();
}

int64_t StoreEvents::Register(Listener listener) {
  const int64_t id = next_listener_id_++;
  listeners_.emplace(id, std::move(listener));
  return id;
}

int64_t StoreEvents::AddListener(Listener listener) {
  absl::MutexLock lock(&mu_);
  return Register(std::move(listener));
}

int64_t StoreEvents::Watch(const std::string& model, Listener listener) {
  absl::MutexLock lock(&mu_);
  // Holding mu_ orders this first event before any later commit's.
  absl::StatusOr<Snapshot> current = catalog_.GetSnapshot(model);
  listener(Stamped(
      current.ok()
          ? ModelEvent{ModelEvent::Type::kCurrent, model, current->version}
          : ModelEvent{ModelEvent::Type::kAbsent, model, 0}));
  return Register(
      [model, listener = std::move(listener)](const ModelEvent& event) {
        if (event.model == model) listener(event);
      });
}

absl::StatusOr<int64_t> StoreEvents::WatchAll(Listener listener) {
  absl::MutexLock lock(&mu_);
  if (!replica_of_.empty() && !replica_synced_) {
    return absl::UnavailableError(absl::StrCat("this server has not mirrored ",
                                               replica_of_, " yet; retry"));
  }
  // Holding mu_ orders the listing before any later commit's event.
  for (const Snapshot& snapshot : catalog_.List()) {
    listener(Stamped(ModelEvent{ModelEvent::Type::kCurrent, snapshot.model,
                                snapshot.version}));
  }
  // The deletions it remembers, so that a follower that missed one learns
  // it, and tells a model deleted here from one this store has not seen yet.
  for (const auto& [model, version] : catalog_.lineage().deleted) {
    listener(Stamped(ModelEvent{ModelEvent::Type::kDeleted, model, version}));
  }
  listener(Stamped(ModelEvent{ModelEvent::Type::kListed, "", 0}));
  return Register(std::move(listener));
}

void StoreEvents::MarkReplicaSynced(bool synced) {
  absl::MutexLock lock(&mu_);
  replica_synced_ = synced;
}

void StoreEvents::RemoveListener(int64_t id) {
  absl::MutexLock lock(&mu_);
  listeners_.erase(id);
}

}  // namespace modelstate

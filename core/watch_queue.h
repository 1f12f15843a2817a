// The events waiting for one watcher that reads slower than models change.
// A watcher wants to know the state it must catch up to, not every step on the
// way: consecutive updates collapse into the newest, and the queue never holds
// more than its bound, so a watcher that stops reading costs a few events of
// memory, whatever the write rate.
//
// Thread-safety: not thread-safe; its owner serialises access.
#ifndef MODELSTATE_CORE_WATCH_QUEUE_H_
#define MODELSTATE_CORE_WATCH_QUEUE_H_

#include <cstddef>
#include <deque>

#include "core/model_store.h"

namespace modelstate {

class WatchQueue {
 public:
  // `max_events` >= 1.
  explicit WatchQueue(size_t max_events) : max_events_(max_events) {}

  // Appends `event`. An update of the same model right after a queued update
  // replaces it; past `max_events` the oldest events go, so the newest state
  // is always last.
  void Push(ModelEvent event);

  bool empty() const { return events_.empty(); }
  size_t size() const { return events_.size(); }

  // Removes and returns the oldest event; the queue must not be empty.
  ModelEvent Pop();

 private:
  const size_t max_events_;
  std::deque<ModelEvent> events_;
};

}  // namespace modelstate

#endif  // MODELSTATE_CORE_WATCH_QUEUE_H_

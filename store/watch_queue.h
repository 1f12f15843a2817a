// The events waiting for one watcher that reads slower than models change.
// A watcher wants to know the state it must catch up to, not every step on the
// way: consecutive updates collapse into the newest, and the queue never holds
// more than its bound, so a watcher that stops reading costs a few events of
// memory, whatever the write rate.
//
// Thread-safety: not thread-safe; its owner serialises access.
#ifndef MODELSTATE_STORE_WATCH_QUEUE_H_
#define MODELSTATE_STORE_WATCH_QUEUE_H_

#include <cstddef>
#include <deque>
#include <map>
#include <string>

#include "store/model_store.h"

namespace modelstate {

// What a watch stream sends from: events in, oldest first out.
class EventQueue {
 public:
  virtual ~EventQueue() = default;
  virtual void Push(ModelEvent event) = 0;
  virtual bool empty() const = 0;
  virtual size_t size() const = 0;
  // Removes and returns the oldest event; the queue must not be empty.
  virtual ModelEvent Pop() = 0;
};

class WatchQueue : public EventQueue {
 public:
  // `max_events` >= 1.
  explicit WatchQueue(size_t max_events) : max_events_(max_events) {}

  // Appends `event`. An update of the same model right after a queued update
  // replaces it; past `max_events` the oldest events go, so the newest state
  // is always last.
  void Push(ModelEvent event) override;

  bool empty() const override { return events_.empty(); }
  size_t size() const override { return events_.size(); }

  ModelEvent Pop() override;

 private:
  const size_t max_events_;
  std::deque<ModelEvent> events_;
};

// The queue of a watch over every model (a follower's): at most one event per
// model, its newest, so it never drops a model however many there are, and
// holds at most one event per model (plus kListed) however slowly it is read.
// A model's event keeps the place of the first of the events it replaced, so
// the listing's kCurrent events stay before kListed, and the models a reader
// catches up on come in the order they changed.
class LatestEventQueue : public EventQueue {
 public:
  void Push(ModelEvent event) override;
  bool empty() const override { return order_.empty(); }
  size_t size() const override { return order_.size(); }
  ModelEvent Pop() override;

 private:
  std::deque<std::string> order_;  // Models with an event pending.
  std::map<std::string, ModelEvent> newest_;
};

}  // namespace modelstate

#endif  // MODELSTATE_STORE_WATCH_QUEUE_H_

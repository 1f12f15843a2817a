#include "core/watch_queue.h"

#include <utility>

namespace modelstate {

void WatchQueue::Push(ModelEvent event) {
  if (!events_.empty() && event.type == ModelEvent::Type::kUpdated &&
      events_.back().type == ModelEvent::Type::kUpdated &&
      events_.back().model == event.model) {
    events_.back() = std::move(event);
    return;
  }
  events_.push_back(std::move(event));
  while (events_.size() > max_events_) events_.pop_front();
}

ModelEvent WatchQueue::Pop() {
  ModelEvent event = std::move(events_.front());
  events_.pop_front();
  return event;
}

}  // namespace modelstate

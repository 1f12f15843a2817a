#include "store/watch_queue.h"

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

void LatestEventQueue::Push(ModelEvent event) {
  auto [it, inserted] = newest_.try_emplace(event.model, event);
  if (inserted) {
    order_.push_back(event.model);
  } else {
    it->second = std::move(event);
  }
}

ModelEvent LatestEventQueue::Pop() {
  auto it = newest_.find(order_.front());
  order_.pop_front();
  ModelEvent event = std::move(it->second);
  newest_.erase(it);
  return event;
}

}  // namespace modelstate

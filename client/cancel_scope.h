// Internal to the client library: ties a call's context to a CallCanceller.
#ifndef MODELSTATE_CLIENT_CANCEL_SCOPE_H_
#define MODELSTATE_CLIENT_CANCEL_SCOPE_H_

#include "client/client.h"

namespace modelstate {

// Attaches a call's context to a canceller (if any) for the scope's lifetime;
// declare it after the context so that it detaches before the context dies.
class CancelScope {
 public:
  CancelScope(CallCanceller* canceller, grpc::ClientContext* context)
      : canceller_(canceller), context_(context) {
    if (canceller_ != nullptr) canceller_->Attach(context_);
  }
  ~CancelScope() {
    if (canceller_ != nullptr) canceller_->Detach(context_);
  }
  CancelScope(const CancelScope&) = delete;
  CancelScope& operator=(const CancelScope&) = delete;

 private:
  CallCanceller* canceller_;
  grpc::ClientContext* context_;
};

}  // namespace modelstate

#endif  // MODELSTATE_CLIENT_CANCEL_SCOPE_H_

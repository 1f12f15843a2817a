// The modelstate.v1.ModelState service over the gRPC callback API. Each handler
// delegates to the ModelStore, converts statuses and records one log line;
// streaming handlers are reactors with one write in flight.
#ifndef MODELSTATE_SERVER_MODEL_STATE_SERVICE_H_
#define MODELSTATE_SERVER_MODEL_STATE_SERVICE_H_

#include <cstdint>
#include <set>

#include "absl/synchronization/mutex.h"
#include "core/limits.h"
#include "core/model_store.h"
#include "modelstate/v1/model_state.grpc.pb.h"

namespace modelstate {

class WatchReactor;

struct ServiceOptions {
  uint32_t default_chunk_bytes = kDefaultChunkBytes;
  bool log_rpcs = true;
};

// StateDict is a raw (ByteBuffer) method so that chunks are sent without
// copying tensor bytes; its messages are exactly the proto's.
class ModelStateService final
    : public v1::ModelState::WithRawCallbackMethod_StateDict<
          v1::ModelState::CallbackService> {
 public:
  // `store` must outlive the service.
  ModelStateService(ModelStore* store, ServiceOptions options);
  ~ModelStateService() override;

  grpc::ServerUnaryReactor* ListModels(
      grpc::CallbackServerContext* context,
      const v1::ListModelsRequest* request,
      v1::ListModelsResponse* response) override;
  grpc::ServerUnaryReactor* GetModel(grpc::CallbackServerContext* context,
                                     const v1::GetModelRequest* request,
                                     v1::GetModelResponse* response) override;
  grpc::ServerUnaryReactor* CreateModel(
      grpc::CallbackServerContext* context,
      const v1::CreateModelRequest* request,
      v1::CreateModelResponse* response) override;
  grpc::ServerUnaryReactor* DeleteModel(
      grpc::CallbackServerContext* context,
      const v1::DeleteModelRequest* request,
      v1::DeleteModelResponse* response) override;
  grpc::ServerUnaryReactor* RollbackModel(
      grpc::CallbackServerContext* context,
      const v1::RollbackModelRequest* request,
      v1::RollbackModelResponse* response) override;
  grpc::ServerWriteReactor<grpc::ByteBuffer>* StateDict(
      grpc::CallbackServerContext* context,
      const grpc::ByteBuffer* request) override;
  grpc::ServerReadReactor<v1::LoadStateDictRequest>* LoadStateDict(
      grpc::CallbackServerContext* context,
      v1::LoadStateDictResponse* response) override;
  grpc::ServerWriteReactor<v1::WatchModelResponse>* WatchModel(
      grpc::CallbackServerContext* context,
      const v1::WatchModelRequest* request) override;

  // Ends every open watch stream with UNAVAILABLE (they never end on their
  // own), so a graceful shutdown only waits for real transfers. New watches are
  // refused afterwards.
  void StopWatches();

  const ServiceOptions& options() const { return options_; }

 private:
  friend class WatchReactor;
  void Forget(WatchReactor* reactor);

  ModelStore* store_;
  ServiceOptions options_;
  absl::Mutex watches_mu_;
  std::set<WatchReactor*> watches_ ABSL_GUARDED_BY(watches_mu_);
  bool stopping_ ABSL_GUARDED_BY(watches_mu_) = false;
};

}  // namespace modelstate

#endif  // MODELSTATE_SERVER_MODEL_STATE_SERVICE_H_

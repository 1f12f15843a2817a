// Every mapping between core types and modelstate.v1 messages, in both
// directions, used by the server and the clients alike. The proto keeps its
// false-by-default field names (the v1 wire contract); core speaks torch's
// vocabulary. No business rules live here: only field mapping and the checks
// that make a message representable in core (known enums, consistent sizes).
#ifndef MODELSTATE_PROTO_CONVERT_H_
#define MODELSTATE_PROTO_CONVERT_H_

#include <vector>

#include "absl/status/statusor.h"
#include "model/state_dict.h"
#include "modelstate/v1/model_state.pb.h"
#include "store/requests.h"
#include "transfer/transfer.h"

namespace modelstate {

using TensorInfos = google::protobuf::RepeatedPtrField<v1::TensorInfo>;

v1::DType ToProto(DType dtype);
// InvalidArgument for DTYPE_UNSPECIFIED or an unknown number.
absl::StatusOr<DType> FromProto(v1::DType dtype);

v1::TensorKind ToProto(TensorKind kind);
// InvalidArgument for an unknown number. TENSOR_KIND_UNSPECIFIED is a
// parameter (what senders that leave it unset mean).
absl::StatusOr<TensorKind> FromProto(v1::TensorKind kind);

// Fetches. `chunk_bytes` is the transport's and stays unset here.
v1::StateDictRequest ToProto(const FetchRequest& request);
absl::StatusOr<FetchRequest> FromProto(const v1::StateDictRequest& request);

// GetModel selects a model, version and module, as a fetch does.
v1::GetModelRequest ToGetModelRequest(const FetchRequest& request);
FetchRequest FromProto(const v1::GetModelRequest& request);

v1::ModelSummary ToProto(const ModelSummary& summary);
ModelSummary FromProto(const v1::ModelSummary& summary);

v1::TensorInfo ToProto(const TensorDescription& tensor);
absl::StatusOr<TensorDescription> FromProto(const v1::TensorInfo& info);

v1::GetModelResponse ToProto(const ModelManifest& manifest);
absl::StatusOr<ModelManifest> FromProto(const v1::GetModelResponse& response);

// The manifest entries of `state` (checksums computed once per tensor and
// cached).
void ToTensorInfos(const StateDict& state, TensorInfos* out);

// The first message of a StateDict stream for `plan`, whose tensors add up to
// `total_bytes`.
v1::Manifest ToManifest(const FetchPlan& plan, uint64_t total_bytes);

// Validates a received manifest: every dtype and kind known, shapes
// non-negative, num_bytes consistent with dtype and shape. Returns
// InvalidArgument naming the first bad tensor.
absl::StatusOr<std::vector<TransferEntry>> ToTransferEntries(
    const TensorInfos& infos);

// The load specs (key, dtype, shape) of a validated manifest.
std::vector<TensorSpec> ToTensorSpecs(
    const std::vector<TransferEntry>& entries);

// Loads. The header of `request` for tensors `state` adding up to
// `total_bytes`; kinds of `state`'s entries mark buffers.
v1::LoadHeader ToLoadHeader(const LoadRequest& request, const StateDict& state,
                            uint64_t total_bytes);
// As ToLoadHeader, but no checksum is computed: every tensor's is 0, for a
// client that sends them with the end marker, hashed while it sends the bytes
// (docs/protocol.md, "Checksums at the end").
v1::LoadHeader ToLoadHeaderWithoutChecksums(const LoadRequest& request,
                                            const StateDict& state,
                                            uint64_t total_bytes);
// Sets TensorInfo.shared_with in `infos` (one per entry of `state`) from
// `shared` (SharedEntries(state)): those tensors' bytes are not sent.
void MarkSharedTensors(const StateDict& state,
                       const std::vector<int64_t>& shared, TensorInfos* infos);
// The request of a header: buffer keys from the tensors' kinds, class names.
// InvalidArgument for an unknown tensor kind.
absl::StatusOr<LoadRequest> FromProto(const v1::LoadHeader& header);

v1::LoadStateDictResponse ToProto(const LoadOutcome& outcome);
LoadOutcome FromProto(const v1::LoadStateDictResponse& response);

v1::WatchModelResponse ToProto(const ModelEvent& event);
// InvalidArgument for an unknown event type.
absl::StatusOr<ModelEvent> FromProto(const v1::WatchModelResponse& response);

}  // namespace modelstate

#endif  // MODELSTATE_PROTO_CONVERT_H_

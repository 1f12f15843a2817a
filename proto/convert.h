// Conversions between core types and modelstate.v1 messages. No business rules
// live here.
#ifndef MODELSTATE_PROTO_CONVERT_H_
#define MODELSTATE_PROTO_CONVERT_H_

#include <vector>

#include "absl/status/statusor.h"
#include "core/model_store.h"
#include "core/state_dict.h"
#include "core/transfer.h"
#include "modelstate/v1/model_state.pb.h"

namespace modelstate {

v1::DType ToProto(DType dtype);
// InvalidArgument for DTYPE_UNSPECIFIED or an unknown number.
absl::StatusOr<DType> FromProto(v1::DType dtype);

// The manifest entries of `state` (checksums computed once per tensor and
// cached).
void ToTensorInfos(const StateDict& state,
                   google::protobuf::RepeatedPtrField<v1::TensorInfo>* out);

// Validates a received manifest: every dtype known, shapes non-negative,
// num_bytes consistent with dtype and shape. Returns InvalidArgument naming the
// first bad tensor.
absl::StatusOr<std::vector<TransferEntry>> ToTransferEntries(
    const google::protobuf::RepeatedPtrField<v1::TensorInfo>& infos);

// The load specs (key, dtype, shape) of a validated manifest.
std::vector<TensorSpec> ToTensorSpecs(
    const std::vector<TransferEntry>& entries);

// A model's summary: tensor count and bytes of its full state dict, and its
// root class.
v1::ModelSummary ToSummary(const Snapshot& snapshot);

}  // namespace modelstate

#endif  // MODELSTATE_PROTO_CONVERT_H_

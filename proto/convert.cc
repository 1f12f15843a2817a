#include "proto/convert.h"

#include "absl/strings/str_cat.h"

namespace modelstate {

v1::DType ToProto(DType dtype) {
  return static_cast<v1::DType>(static_cast<int>(dtype));
}

absl::StatusOr<DType> FromProto(v1::DType dtype) {
  if (!IsValidDType(static_cast<int>(dtype))) {
    return absl::InvalidArgumentError(
        absl::StrCat("unknown dtype ", static_cast<int>(dtype)));
  }
  return static_cast<DType>(static_cast<int>(dtype));
}

void ToTensorInfos(const StateDict& state,
                   google::protobuf::RepeatedPtrField<v1::TensorInfo>* out) {
  out->Reserve(static_cast<int>(state.size()));
  for (const StateDict::Entry& entry : state.entries()) {
    v1::TensorInfo* info = out->Add();
    info->set_name(entry.key);
    info->set_kind(entry.kind == TensorKind::kBuffer ? v1::BUFFER
                                                     : v1::PARAMETER);
    info->set_dtype(ToProto(entry.tensor.dtype()));
    info->mutable_shape()->Add(entry.tensor.shape().begin(),
                               entry.tensor.shape().end());
    info->set_num_bytes(entry.tensor.num_bytes());
    info->set_xxh3_64(entry.tensor.Checksum());
  }
}

absl::StatusOr<std::vector<TransferEntry>> ToTransferEntries(
    const google::protobuf::RepeatedPtrField<v1::TensorInfo>& infos) {
  std::vector<TransferEntry> entries;
  entries.reserve(infos.size());
  for (const v1::TensorInfo& info : infos) {
    absl::StatusOr<DType> dtype = FromProto(info.dtype());
    if (!dtype.ok()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "tensor \"", info.name(), "\": ", dtype.status().message()));
    }
    Shape shape(info.shape().begin(), info.shape().end());
    absl::StatusOr<int64_t> bytes = NumBytes(*dtype, shape);
    if (!bytes.ok()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "tensor \"", info.name(), "\": ", bytes.status().message()));
    }
    if (static_cast<uint64_t>(*bytes) != info.num_bytes()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "tensor \"", info.name(), "\" declares ", info.num_bytes(),
          " bytes but its dtype and "
          "shape need ",
          *bytes));
    }
    entries.push_back(
        TransferEntry{info.name(), *dtype, std::move(shape), info.xxh3_64()});
  }
  return entries;
}

std::vector<TensorSpec> ToTensorSpecs(
    const std::vector<TransferEntry>& entries) {
  std::vector<TensorSpec> specs;
  specs.reserve(entries.size());
  for (const TransferEntry& entry : entries) {
    specs.push_back(TensorSpec{entry.key, entry.dtype, entry.shape});
  }
  return specs;
}

v1::ModelSummary ToSummary(const Snapshot& snapshot) {
  v1::ModelSummary summary;
  summary.set_name(snapshot.model);
  summary.set_version(snapshot.version);
  summary.set_root_class(snapshot.root->type_name());
  absl::StatusOr<StateDict> state = GetStateDict(snapshot.root);
  if (state.ok()) {
    summary.set_num_tensors(static_cast<int64_t>(state->size()));
    summary.set_num_bytes(state->TotalBytes());
  }
  return summary;
}

}  // namespace modelstate

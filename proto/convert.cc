#include "proto/convert.h"

#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace modelstate {
namespace {

absl::Status TensorError(const std::string& name, const absl::Status& status) {
  return absl::InvalidArgumentError(
      absl::StrCat("tensor \"", name, "\": ", status.message()));
}

}  // namespace

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

v1::TensorKind ToProto(TensorKind kind) {
  return kind == TensorKind::kBuffer ? v1::BUFFER : v1::PARAMETER;
}

absl::StatusOr<TensorKind> FromProto(v1::TensorKind kind) {
  switch (kind) {
    case v1::TENSOR_KIND_UNSPECIFIED:
    case v1::PARAMETER:
      return TensorKind::kParameter;
    case v1::BUFFER:
      return TensorKind::kBuffer;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("unknown tensor kind ", static_cast<int>(kind)));
  }
}

v1::StateDictRequest ToProto(const FetchRequest& request) {
  v1::StateDictRequest proto;
  proto.set_model(request.model);
  proto.set_version(request.version);
  proto.set_min_version(request.min_version);
  proto.set_offset(request.offset);
  proto.set_module(request.module);
  proto.set_strip_module_prefix(!request.keep_module_prefix);
  for (const std::string& key : request.keys) proto.add_keys(key);
  proto.set_own_tensors_only(!request.recurse);
  proto.set_exclude_buffers(!request.include_buffers);
  if (request.dtype) proto.set_cast_floating_to(ToProto(*request.dtype));
  for (const auto& [key, dtype] : request.key_dtypes)
    (*proto.mutable_key_dtypes())[key] = ToProto(dtype);
  proto.set_accept_shared_tensors(request.accept_shared_tensors);
  return proto;
}

absl::StatusOr<FetchRequest> FromProto(const v1::StateDictRequest& proto) {
  FetchRequest request;
  request.model = proto.model();
  request.version = proto.version();
  request.min_version = proto.min_version();
  request.offset = proto.offset();
  request.module = proto.module();
  request.keep_module_prefix = !proto.strip_module_prefix();
  request.keys.assign(proto.keys().begin(), proto.keys().end());
  request.recurse = !proto.own_tensors_only();
  request.include_buffers = !proto.exclude_buffers();
  if (proto.cast_floating_to() != v1::DTYPE_UNSPECIFIED) {
    ASSIGN_OR_RETURN(request.dtype, FromProto(proto.cast_floating_to()));
  }
  for (const auto& [key, dtype] : proto.key_dtypes()) {
    ASSIGN_OR_RETURN(request.key_dtypes[key], FromProto(dtype));
  }
  request.accept_shared_tensors = proto.accept_shared_tensors();
  return request;
}

v1::GetModelRequest ToGetModelRequest(const FetchRequest& request) {
  v1::GetModelRequest proto;
  proto.set_model(request.model);
  proto.set_module(request.module);
  proto.set_version(request.version);
  proto.set_min_version(request.min_version);
  return proto;
}

FetchRequest FromProto(const v1::GetModelRequest& proto) {
  FetchRequest request;
  request.model = proto.model();
  request.module = proto.module();
  request.version = proto.version();
  request.min_version = proto.min_version();
  return request;
}

v1::ModelSummary ToProto(const ModelSummary& summary) {
  v1::ModelSummary proto;
  proto.set_name(summary.name);
  proto.set_version(summary.version);
  proto.set_num_tensors(summary.num_tensors);
  proto.set_num_bytes(summary.num_bytes);
  proto.set_root_class(summary.root_class);
  return proto;
}

ModelSummary FromProto(const v1::ModelSummary& proto) {
  return ModelSummary{proto.name(), proto.version(), proto.num_tensors(),
                      proto.num_bytes(), proto.root_class()};
}

v1::TensorInfo ToProto(const TensorDescription& tensor) {
  v1::TensorInfo info;
  info.set_name(tensor.name);
  info.set_kind(ToProto(tensor.kind));
  info.set_dtype(ToProto(tensor.dtype));
  info.mutable_shape()->Add(tensor.shape.begin(), tensor.shape.end());
  info.set_num_bytes(tensor.num_bytes);
  info.set_xxh3_64(tensor.checksum);
  return info;
}

absl::StatusOr<TensorDescription> FromProto(const v1::TensorInfo& info) {
  TensorDescription tensor;
  tensor.name = info.name();
  absl::StatusOr<TensorKind> kind = FromProto(info.kind());
  if (!kind.ok()) return TensorError(info.name(), kind.status());
  tensor.kind = *kind;
  absl::StatusOr<DType> dtype = FromProto(info.dtype());
  if (!dtype.ok()) return TensorError(info.name(), dtype.status());
  tensor.dtype = *dtype;
  tensor.shape.assign(info.shape().begin(), info.shape().end());
  absl::StatusOr<int64_t> bytes = NumBytes(tensor.dtype, tensor.shape);
  if (!bytes.ok()) return TensorError(info.name(), bytes.status());
  if (static_cast<uint64_t>(*bytes) != info.num_bytes()) {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor \"", info.name(), "\" declares ", info.num_bytes(),
                     " bytes but its dtype and shape need ", *bytes));
  }
  tensor.num_bytes = info.num_bytes();
  tensor.checksum = info.xxh3_64();
  return tensor;
}

v1::GetModelResponse ToProto(const ModelManifest& manifest) {
  v1::GetModelResponse proto;
  *proto.mutable_summary() = ToProto(manifest.summary);
  proto.set_version(manifest.version);
  proto.mutable_retained_versions()->Add(manifest.retained_versions.begin(),
                                         manifest.retained_versions.end());
  proto.mutable_tensors()->Reserve(static_cast<int>(manifest.tensors.size()));
  for (const TensorDescription& tensor : manifest.tensors)
    *proto.add_tensors() = ToProto(tensor);
  proto.set_architecture_json(manifest.architecture_json);
  proto.mutable_class_names()->insert(manifest.class_names.begin(),
                                      manifest.class_names.end());
  proto.set_epoch(manifest.epoch);
  return proto;
}

absl::StatusOr<ModelManifest> FromProto(const v1::GetModelResponse& proto) {
  ModelManifest manifest;
  manifest.summary = FromProto(proto.summary());
  manifest.version = proto.version();
  manifest.retained_versions.assign(proto.retained_versions().begin(),
                                    proto.retained_versions().end());
  manifest.tensors.reserve(proto.tensors_size());
  for (const v1::TensorInfo& info : proto.tensors()) {
    ASSIGN_OR_RETURN(TensorDescription tensor, FromProto(info));
    manifest.tensors.push_back(std::move(tensor));
  }
  manifest.architecture_json = proto.architecture_json();
  manifest.class_names.insert(proto.class_names().begin(),
                              proto.class_names().end());
  manifest.epoch = proto.epoch();
  return manifest;
}

void ToTensorInfos(const StateDict& state, TensorInfos* out) {
  out->Reserve(out->size() + static_cast<int>(state.size()));
  for (const TensorDescription& tensor : DescribeTensors(state))
    *out->Add() = ToProto(tensor);
}

v1::Manifest ToManifest(const FetchPlan& plan, uint64_t total_bytes) {
  v1::Manifest manifest;
  manifest.set_model(plan.model);
  manifest.set_version(plan.version);
  ToTensorInfos(*plan.state, manifest.mutable_tensors());
  MarkSharedTensors(*plan.state, plan.shared_with, manifest.mutable_tensors());
  manifest.set_total_bytes(total_bytes);
  manifest.set_epoch(plan.epoch);
  return manifest;
}

absl::StatusOr<std::vector<TransferEntry>> ToTransferEntries(
    const TensorInfos& infos) {
  std::vector<TransferEntry> entries;
  entries.reserve(infos.size());
  absl::flat_hash_map<absl::string_view, int64_t> index_of;
  for (const v1::TensorInfo& info : infos) {
    ASSIGN_OR_RETURN(TensorDescription tensor, FromProto(info));
    TransferEntry entry{std::move(tensor.name), tensor.dtype,
                        std::move(tensor.shape), tensor.checksum};
    if (!info.shared_with().empty()) {
      auto source = index_of.find(info.shared_with());
      if (source == index_of.end()) {
        return absl::InvalidArgumentError(absl::StrCat(
            "tensor \"", entry.key, "\" is shared with \"", info.shared_with(),
            "\", which is not an earlier tensor"));
      }
      entry.shared_with = source->second;
    }
    index_of.emplace(info.name(), static_cast<int64_t>(entries.size()));
    entries.push_back(std::move(entry));
  }
  RETURN_IF_ERROR(CheckSharedEntries(entries));
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

v1::LoadHeader ToLoadHeader(const LoadRequest& request, const StateDict& state,
                            uint64_t total_bytes) {
  v1::LoadHeader header =
      ToLoadHeaderWithoutChecksums(request, state, total_bytes);
  for (size_t i = 0; i < state.size(); ++i) {
    header.mutable_tensors(static_cast<int>(i))
        ->set_xxh3_64(state.entries()[i].tensor.Checksum());
  }
  return header;
}

void MarkSharedTensors(const StateDict& state,
                       const std::vector<int64_t>& shared, TensorInfos* infos) {
  for (size_t i = 0; i < shared.size(); ++i) {
    if (shared[i] < 0) continue;
    infos->Mutable(static_cast<int>(i))
        ->set_shared_with(state.entries()[shared[i]].key);
  }
}

v1::LoadHeader ToLoadHeaderWithoutChecksums(const LoadRequest& request,
                                            const StateDict& state,
                                            uint64_t total_bytes) {
  v1::LoadHeader header;
  header.set_model(request.model);
  header.set_non_strict(!request.strict);
  header.set_assign(request.assign);
  header.set_module(request.module);
  if (request.expected_version) {
    header.set_has_expected_version(true);
    header.set_expected_version(*request.expected_version);
  }
  header.set_create_if_missing(request.create_if_missing);
  header.mutable_tensors()->Reserve(static_cast<int>(state.size()));
  for (const StateDict::Entry& entry : state.entries()) {
    *header.add_tensors() = ToProto(TensorDescription{
        entry.key, entry.kind, entry.tensor.dtype(), entry.tensor.shape(),
        entry.tensor.num_bytes(), /*checksum=*/0});
  }
  const absl::flat_hash_set<std::string> buffers(request.buffer_keys.begin(),
                                                 request.buffer_keys.end());
  for (v1::TensorInfo& info : *header.mutable_tensors()) {
    if (buffers.contains(info.name())) info.set_kind(v1::BUFFER);
  }
  header.set_total_bytes(total_bytes);
  header.mutable_class_names()->insert(request.class_names.begin(),
                                       request.class_names.end());
  return header;
}

absl::StatusOr<LoadRequest> FromProto(const v1::LoadHeader& header) {
  LoadRequest request;
  request.model = header.model();
  request.strict = !header.non_strict();
  request.assign = header.assign();
  request.module = header.module();
  if (header.has_expected_version())
    request.expected_version = header.expected_version();
  request.create_if_missing = header.create_if_missing();
  for (const v1::TensorInfo& info : header.tensors()) {
    absl::StatusOr<TensorKind> kind = FromProto(info.kind());
    if (!kind.ok()) return TensorError(info.name(), kind.status());
    if (*kind == TensorKind::kBuffer)
      request.buffer_keys.push_back(info.name());
  }
  request.class_names.insert(header.class_names().begin(),
                             header.class_names().end());
  return request;
}

v1::LoadStateDictResponse ToProto(const LoadOutcome& outcome) {
  v1::LoadStateDictResponse proto;
  proto.set_version(outcome.version);
  proto.set_created(outcome.created);
  for (const std::string& key : outcome.missing_keys)
    proto.add_missing_keys(key);
  for (const std::string& key : outcome.unexpected_keys)
    proto.add_unexpected_keys(key);
  return proto;
}

LoadOutcome FromProto(const v1::LoadStateDictResponse& proto) {
  LoadOutcome outcome;
  outcome.version = proto.version();
  outcome.created = proto.created();
  outcome.missing_keys.assign(proto.missing_keys().begin(),
                              proto.missing_keys().end());
  outcome.unexpected_keys.assign(proto.unexpected_keys().begin(),
                                 proto.unexpected_keys().end());
  return outcome;
}

v1::WatchModelResponse ToProto(const ModelEvent& event) {
  v1::WatchModelResponse proto;
  switch (event.type) {
    case ModelEvent::Type::kCreated:
      proto.set_type(v1::WatchModelResponse::CREATED);
      break;
    case ModelEvent::Type::kUpdated:
      proto.set_type(v1::WatchModelResponse::UPDATED);
      break;
    case ModelEvent::Type::kDeleted:
      proto.set_type(v1::WatchModelResponse::DELETED);
      break;
    case ModelEvent::Type::kCurrent:
      proto.set_type(v1::WatchModelResponse::CURRENT);
      break;
    case ModelEvent::Type::kAbsent:
      proto.set_type(v1::WatchModelResponse::ABSENT);
      break;
    case ModelEvent::Type::kListed:
      proto.set_type(v1::WatchModelResponse::LISTED);
      break;
  }
  proto.set_model(event.model);
  proto.set_version(event.version);
  proto.set_epoch(event.epoch);
  return proto;
}

absl::StatusOr<ModelEvent> FromProto(const v1::WatchModelResponse& proto) {
  ModelEvent event{ModelEvent::Type::kUpdated, proto.model(), proto.version(),
                   proto.epoch()};
  switch (proto.type()) {
    case v1::WatchModelResponse::CREATED:
      event.type = ModelEvent::Type::kCreated;
      break;
    case v1::WatchModelResponse::UPDATED:
      break;
    case v1::WatchModelResponse::DELETED:
      event.type = ModelEvent::Type::kDeleted;
      break;
    case v1::WatchModelResponse::CURRENT:
      event.type = ModelEvent::Type::kCurrent;
      break;
    case v1::WatchModelResponse::ABSENT:
      event.type = ModelEvent::Type::kAbsent;
      break;
    case v1::WatchModelResponse::LISTED:
      event.type = ModelEvent::Type::kListed;
      break;
    default:
      return absl::InvalidArgumentError(absl::StrCat(
          "unknown watch event type ", static_cast<int>(proto.type())));
  }
  return event;
}

}  // namespace modelstate

#include "client/client.h"

#include "absl/strings/str_cat.h"
#include "core/file_util.h"
#include "core/status_macros.h"
#include "core/transfer.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/impl/codegen/proto_utils.h"
#include "grpcpp/security/credentials.h"
#include "proto/chunk_frame.h"
#include "proto/convert.h"
#include "proto/grpc_status.h"

namespace modelstate {
namespace {

ModelSummary FromProto(const v1::ModelSummary& proto) {
  return ModelSummary{proto.name(), proto.version(), proto.num_tensors(),
                      proto.num_bytes(), proto.root_class()};
}

TensorDescription Describe(const v1::TensorInfo& info,
                           const TransferEntry& entry) {
  return TensorDescription{
      info.name(),
      info.kind() == v1::BUFFER ? TensorKind::kBuffer : TensorKind::kParameter,
      entry.dtype,
      entry.shape,
      info.num_bytes(),
      info.xxh3_64()};
}

v1::StateDictRequest ToRequest(const std::string& model,
                               const FetchOptions& options) {
  v1::StateDictRequest request;
  request.set_model(model);
  request.set_module(options.module);
  for (const std::string& key : options.keys) request.add_keys(key);
  request.set_own_tensors_only(!options.recurse);
  request.set_exclude_buffers(!options.include_buffers);
  if (options.cast_floating_to)
    request.set_cast_floating_to(ToProto(*options.cast_floating_to));
  request.set_chunk_bytes(options.chunk_bytes);
  request.set_strip_module_prefix(options.strip_module_prefix);
  request.set_version(options.version);
  return request;
}

}  // namespace

Client::Client(std::shared_ptr<grpc::Channel> channel, ClientOptions options)
    : channel_(std::move(channel)),
      stub_(v1::ModelState::NewStub(channel_)),
      options_(std::move(options)) {}

absl::StatusOr<std::unique_ptr<Client>> Client::Connect(
    const std::string& target, const ClientOptions& options) {
  std::shared_ptr<grpc::ChannelCredentials> credentials;
  grpc::ChannelArguments args;
  // Chunks are at most 3 MiB; manifests of huge models can be larger.
  args.SetMaxReceiveMessageSize(256 << 20);
  args.SetMaxSendMessageSize(256 << 20);
  if (options.own_connection)
    args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  const bool tls = options.use_tls || !options.tls_ca_file.empty() ||
                   !options.tls_cert_file.empty();
  if (tls) {
    grpc::SslCredentialsOptions ssl;
    if (!options.tls_ca_file.empty()) {
      ASSIGN_OR_RETURN(ssl.pem_root_certs,
                       ReadFileToString(options.tls_ca_file));
    }
    if (options.tls_cert_file.empty() != options.tls_key_file.empty()) {
      return absl::InvalidArgumentError(
          "a client certificate needs both --tls_cert and --tls_key");
    }
    if (!options.tls_cert_file.empty()) {
      ASSIGN_OR_RETURN(ssl.pem_cert_chain,
                       ReadFileToString(options.tls_cert_file));
      ASSIGN_OR_RETURN(ssl.pem_private_key,
                       ReadFileToString(options.tls_key_file));
    }
    credentials = grpc::SslCredentials(ssl);
    if (!options.tls_server_name.empty()) {
      args.SetSslTargetNameOverride(options.tls_server_name);
    }
  } else {
    credentials = grpc::InsecureChannelCredentials();
  }
  auto channel = grpc::CreateCustomChannel(target, credentials, args);
  return std::unique_ptr<Client>(new Client(std::move(channel), options));
}

void Client::Prepare(grpc::ClientContext* context) const {
  if (options_.timeout != absl::InfiniteDuration()) {
    context->set_deadline(absl::ToChronoTime(absl::Now() + options_.timeout));
  }
}

absl::StatusOr<std::vector<ModelSummary>> Client::ListModels() {
  grpc::ClientContext context;
  Prepare(&context);
  v1::ListModelsResponse response;
  RETURN_IF_ERROR(FromGrpcStatus(
      stub_->ListModels(&context, v1::ListModelsRequest(), &response)));
  std::vector<ModelSummary> models;
  for (const v1::ModelSummary& summary : response.models())
    models.push_back(FromProto(summary));
  return models;
}

absl::StatusOr<ModelManifest> Client::GetModel(const std::string& model,
                                               const std::string& module,
                                               int64_t version) {
  grpc::ClientContext context;
  Prepare(&context);
  v1::GetModelRequest request;
  request.set_model(model);
  request.set_module(module);
  request.set_version(version);
  v1::GetModelResponse response;
  RETURN_IF_ERROR(
      FromGrpcStatus(stub_->GetModel(&context, request, &response)));
  ASSIGN_OR_RETURN(std::vector<TransferEntry> entries,
                   ToTransferEntries(response.tensors()));
  ModelManifest manifest;
  manifest.summary = FromProto(response.summary());
  manifest.version = response.version();
  manifest.retained_versions.assign(response.retained_versions().begin(),
                                    response.retained_versions().end());
  manifest.architecture_json = response.architecture_json();
  for (int i = 0; i < response.tensors_size(); ++i) {
    manifest.tensors.push_back(Describe(response.tensors(i), entries[i]));
  }
  return manifest;
}

absl::StatusOr<ModelSummary> Client::CreateModel(
    const std::string& model, const std::string& architecture_json,
    uint64_t seed) {
  grpc::ClientContext context;
  Prepare(&context);
  v1::CreateModelRequest request;
  request.set_model(model);
  request.set_architecture_json(architecture_json);
  request.set_seed(seed);
  v1::CreateModelResponse response;
  RETURN_IF_ERROR(
      FromGrpcStatus(stub_->CreateModel(&context, request, &response)));
  return FromProto(response.summary());
}

absl::StatusOr<ModelSummary> Client::RollbackModel(const std::string& model,
                                                   int64_t version) {
  grpc::ClientContext context;
  Prepare(&context);
  v1::RollbackModelRequest request;
  request.set_model(model);
  request.set_version(version);
  v1::RollbackModelResponse response;
  RETURN_IF_ERROR(
      FromGrpcStatus(stub_->RollbackModel(&context, request, &response)));
  return FromProto(response.summary());
}

absl::Status Client::DeleteModel(const std::string& model) {
  grpc::ClientContext context;
  Prepare(&context);
  v1::DeleteModelRequest request;
  request.set_model(model);
  v1::DeleteModelResponse response;
  return FromGrpcStatus(stub_->DeleteModel(&context, request, &response));
}

absl::StatusOr<int64_t> Client::StateDictStreaming(
    const std::string& model, const FetchOptions& options,
    const std::function<absl::Status(const TensorDescription&, Tensor)>&
        on_tensor) {
  grpc::ClientContext context;
  Prepare(&context);
  // The stream is read as raw messages so that chunk bytes go from the received
  // slices straight into the tensors (ReadStateDictFrame), copied once.
  grpc::ByteBuffer request;
  bool own_buffer;
  grpc::SerializationTraits<v1::StateDictRequest>::Serialize(
      ToRequest(model, options), &request, &own_buffer);
  static const grpc::internal::RpcMethod kStateDict(
      "/modelstate.v1.ModelState/StateDict",
      grpc::internal::RpcMethod::SERVER_STREAMING);
  std::unique_ptr<grpc::ClientReader<grpc::ByteBuffer>> reader(
      grpc::internal::ClientReaderFactory<grpc::ByteBuffer>::Create(
          channel_.get(), kStateDict, &context, request));
  grpc::ByteBuffer buffer;
  v1::StateDictResponse response;
  // Stops the stream and reports `status` (the server's status wins if it has
  // one).
  auto abandon = [&](absl::Status status) {
    context.TryCancel();
    while (reader->Read(&buffer)) {
    }
    absl::Status server = FromGrpcStatus(reader->Finish());
    return server.ok() || server.code() == absl::StatusCode::kCancelled
               ? status
               : server;
  };
  auto no_chunk_yet = [](uint64_t, absl::string_view) {
    return absl::DataLossError("stream did not start with a manifest");
  };
  if (!reader->Read(&buffer)) return FromGrpcStatus(reader->Finish());
  absl::StatusOr<bool> first =
      ReadStateDictFrame(&buffer, &response, no_chunk_yet);
  if (!first.ok())
    return abandon(absl::DataLossError(first.status().message()));
  if (*first || !response.has_manifest()) {
    return abandon(absl::DataLossError("stream did not start with a manifest"));
  }
  const v1::Manifest manifest = response.manifest();
  absl::StatusOr<std::vector<TransferEntry>> entries =
      ToTransferEntries(manifest.tensors());
  if (!entries.ok()) return abandon(entries.status());
  absl::StatusOr<std::unique_ptr<ChunkReceiver>> receiver =
      ChunkReceiver::Create(*entries, [&](size_t index, Tensor tensor) {
        return on_tensor(Describe(manifest.tensors(static_cast<int>(index)),
                                  (*entries)[index]),
                         std::move(tensor));
      });
  if (!receiver.ok()) return abandon(receiver.status());
  bool ended = false;
  auto accept = [&](uint64_t offset, absl::string_view piece) {
    if (ended) return absl::DataLossError("data after the end marker");
    return (*receiver)->Accept(offset, piece);
  };
  while (reader->Read(&buffer)) {
    absl::StatusOr<bool> chunk = ReadStateDictFrame(&buffer, &response, accept);
    absl::Status step = chunk.status();
    if (step.ok() && *chunk) {
      if (options.progress) {
        options.progress((*receiver)->received_bytes(),
                         (*receiver)->total_bytes());
      }
    } else if (step.ok() && response.has_end() && !ended) {
      step = (*receiver)->Finish(response.end().total_bytes()).status();
      ended = true;
    } else if (step.ok()) {
      step = absl::DataLossError("unexpected message in a StateDict stream");
    }
    if (!step.ok()) {
      // A bad stream from the server is data loss to us, whatever the receiver
      // called it.
      if (step.code() == absl::StatusCode::kInvalidArgument) {
        step = absl::DataLossError(step.message());
      }
      return abandon(step);
    }
  }
  RETURN_IF_ERROR(FromGrpcStatus(reader->Finish()));
  if (!ended)
    return absl::DataLossError("StateDict stream ended without its end marker");
  return manifest.version();
}

absl::StatusOr<FetchedStateDict> Client::StateDict(
    const std::string& model, const FetchOptions& options) {
  FetchedStateDict fetched;
  fetched.model = model;
  ASSIGN_OR_RETURN(
      fetched.version,
      StateDictStreaming(
          model, options,
          [&](const TensorDescription& description, Tensor tensor) {
            return fetched.state.Insert(description.name, std::move(tensor),
                                        description.kind);
          }));
  return fetched;
}

absl::StatusOr<PushResult> Client::LoadStateDict(
    const std::string& model, const modelstate::StateDict& state,
    const PushOptions& options) {
  grpc::ClientContext context;
  Prepare(&context);
  v1::LoadStateDictResponse response;
  std::unique_ptr<grpc::ClientWriter<v1::LoadStateDictRequest>> writer =
      stub_->LoadStateDict(&context, &response);
  v1::LoadStateDictRequest request;
  v1::LoadHeader* header = request.mutable_header();
  header->set_model(model);
  header->set_non_strict(!options.strict);
  header->set_assign(options.assign);
  header->set_module(options.module);
  if (options.expected_version) {
    header->set_has_expected_version(true);
    header->set_expected_version(*options.expected_version);
  }
  header->set_create_if_missing(options.create_if_missing);
  ToTensorInfos(state, header->mutable_tensors());
  std::vector<Tensor> tensors;
  tensors.reserve(state.size());
  for (const auto& entry : state.entries()) tensors.push_back(entry.tensor);
  ChunkSender sender(std::move(tensors),
                     options.chunk_bytes > 0 ? options.chunk_bytes : 1 << 20);
  header->set_total_bytes(sender.total_bytes());

  // A failed write means the server has already answered (e.g. it refused the
  // header); its status is collected by Finish below.
  bool open = writer->Write(request);
  ChunkSender::Chunk chunk;
  uint64_t sent = 0;
  while (open && sender.Next(&chunk)) {
    request.Clear();
    v1::Chunk* message = request.mutable_chunk();
    message->set_offset(chunk.offset);
    std::string* data = message->mutable_data();
    data->reserve(chunk.size);
    for (absl::Span<const uint8_t> piece : chunk.pieces) {
      data->append(reinterpret_cast<const char*>(piece.data()), piece.size());
    }
    open = writer->Write(request);
    sent += chunk.size;
    if (options.progress) options.progress(sent, sender.total_bytes());
  }
  if (open) {
    request.Clear();
    request.mutable_end()->set_total_bytes(sender.total_bytes());
    open = writer->Write(request);
  }
  if (open) writer->WritesDone();
  RETURN_IF_ERROR(FromGrpcStatus(writer->Finish()));
  PushResult result;
  result.version = response.version();
  result.created = response.created();
  result.missing_keys.assign(response.missing_keys().begin(),
                             response.missing_keys().end());
  result.unexpected_keys.assign(response.unexpected_keys().begin(),
                                response.unexpected_keys().end());
  return result;
}

absl::StatusOr<bool> Client::CheckHealth(const std::string& service) {
  grpc::ClientContext context;
  Prepare(&context);
  grpc::health::v1::HealthCheckRequest request;
  request.set_service(service);
  grpc::health::v1::HealthCheckResponse response;
  RETURN_IF_ERROR(
      FromGrpcStatus(grpc::health::v1::Health::NewStub(channel_)->Check(
          &context, request, &response)));
  return response.status() == grpc::health::v1::HealthCheckResponse::SERVING;
}

absl::Status Client::Watch(
    const std::string& model,
    const std::function<bool(const WatchEvent&)>& on_event) {
  grpc::ClientContext context;
  Prepare(&context);
  v1::WatchModelRequest request;
  request.set_model(model);
  std::unique_ptr<grpc::ClientReader<v1::WatchModelResponse>> reader =
      stub_->WatchModel(&context, request);
  v1::WatchModelResponse response;
  while (reader->Read(&response)) {
    WatchEvent event{WatchEvent::Type::kUpdated, response.model(),
                     response.version()};
    switch (response.type()) {
      case v1::WatchModelResponse::CURRENT:
        event.type = WatchEvent::Type::kCurrent;
        break;
      case v1::WatchModelResponse::ABSENT:
        event.type = WatchEvent::Type::kAbsent;
        break;
      case v1::WatchModelResponse::CREATED:
        event.type = WatchEvent::Type::kCreated;
        break;
      case v1::WatchModelResponse::DELETED:
        event.type = WatchEvent::Type::kDeleted;
        break;
      default:
        break;
    }
    if (!on_event(event)) {
      context.TryCancel();
      while (reader->Read(&response)) {
      }
      reader->Finish();
      return absl::OkStatus();
    }
  }
  return FromGrpcStatus(reader->Finish());
}

}  // namespace modelstate

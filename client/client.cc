#include "client/client.h"

#include "absl/strings/str_cat.h"
#include "core/file_util.h"
#include "core/limits.h"
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

TensorDescription Describe(const v1::TensorInfo& info,
                           const TransferEntry& entry) {
  return TensorDescription{info.name(),      FromProto(info.kind()).value(),
                           entry.dtype,      entry.shape,
                           info.num_bytes(), info.xxh3_64()};
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
  args.SetMaxReceiveMessageSize(kMaxMessageBytes);
  args.SetMaxSendMessageSize(kMaxMessageBytes);
  if (!options.load_balancing_policy.empty())
    args.SetLoadBalancingPolicyName(options.load_balancing_policy);
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
  models.reserve(response.models_size());
  for (const v1::ModelSummary& summary : response.models())
    models.push_back(FromProto(summary));
  return models;
}

absl::StatusOr<ModelManifest> Client::GetModel(const std::string& model,
                                               const std::string& module,
                                               int64_t version) {
  grpc::ClientContext context;
  Prepare(&context);
  FetchRequest selection;
  selection.model = model;
  selection.module = module;
  selection.version = version;
  v1::GetModelResponse response;
  RETURN_IF_ERROR(FromGrpcStatus(
      stub_->GetModel(&context, ToGetModelRequest(selection), &response)));
  return FromProto(response);
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

namespace {

// One StateDict call read as raw messages, so that chunk bytes go from the
// received slices straight into the tensors (ReadStateDictFrame), copied once.
class RawStateDictCall {
 public:
  // Starts the call; `context` must outlive this object.
  RawStateDictCall(grpc::Channel* channel, grpc::ClientContext* context,
                   const grpc::ByteBuffer& request)
      : context_(context),
        reader_(grpc::internal::ClientReaderFactory<grpc::ByteBuffer>::Create(
            channel, Method(), context, request)) {}

  // Reads the first message, which must be the manifest.
  absl::StatusOr<v1::Manifest> ReadManifest() {
    if (!reader_->Read(&buffer_)) return FromGrpcStatus(reader_->Finish());
    absl::StatusOr<bool> chunk = ReadStateDictFrame(
        &buffer_, &response_, [](uint64_t, absl::string_view) {
          return absl::DataLossError("stream did not start with a manifest");
        });
    if (!chunk.ok())
      return Abandon(absl::DataLossError(chunk.status().message()));
    if (*chunk || !response_.has_manifest()) {
      return Abandon(
          absl::DataLossError("stream did not start with a manifest"));
    }
    return std::move(*response_.mutable_manifest());
  }

  // Feeds every chunk to `receiver` until the end marker and the call's end.
  // A bad stream is DataLoss, whatever the receiver called it.
  absl::Status ReadToEnd(ChunkReceiver& receiver,
                         const ProgressCallback& progress) {
    bool ended = false;
    auto accept = [&](uint64_t offset, absl::string_view piece) {
      if (ended) return absl::DataLossError("data after the end marker");
      return receiver.Accept(offset, piece);
    };
    while (reader_->Read(&buffer_)) {
      absl::StatusOr<bool> chunk =
          ReadStateDictFrame(&buffer_, &response_, accept);
      absl::Status step = chunk.status();
      if (step.ok() && *chunk) {
        if (progress)
          progress(receiver.received_bytes(), receiver.total_bytes());
      } else if (step.ok() && response_.has_end() && !ended) {
        step = receiver.Finish(response_.end().total_bytes()).status();
        ended = true;
      } else if (step.ok()) {
        step = absl::DataLossError("unexpected message in a StateDict stream");
      }
      if (!step.ok()) {
        if (step.code() == absl::StatusCode::kInvalidArgument)
          step = absl::DataLossError(step.message());
        return Abandon(step);
      }
    }
    RETURN_IF_ERROR(FromGrpcStatus(reader_->Finish()));
    if (!ended)
      return absl::DataLossError(
          "StateDict stream ended without its end marker");
    return absl::OkStatus();
  }

  // Stops the stream and reports `status` (the server's status wins if it has
  // one).
  absl::Status Abandon(absl::Status status) {
    context_->TryCancel();
    while (reader_->Read(&buffer_)) {
    }
    absl::Status server = FromGrpcStatus(reader_->Finish());
    return server.ok() || server.code() == absl::StatusCode::kCancelled
               ? status
               : server;
  }

 private:
  static const grpc::internal::RpcMethod& Method() {
    static const grpc::internal::RpcMethod kStateDict(
        "/modelstate.v1.ModelState/StateDict",
        grpc::internal::RpcMethod::SERVER_STREAMING);
    return kStateDict;
  }

  grpc::ClientContext* context_;
  std::unique_ptr<grpc::ClientReader<grpc::ByteBuffer>> reader_;
  grpc::ByteBuffer buffer_;
  v1::StateDictResponse response_;
};

}  // namespace

absl::StatusOr<int64_t> Client::StateDictStreaming(
    const FetchRequest& fetch, const TransferOptions& transfer,
    const std::function<absl::Status(const TensorDescription&, Tensor)>&
        on_tensor) {
  grpc::ClientContext context;
  Prepare(&context);
  v1::StateDictRequest proto = ToProto(fetch);
  proto.set_chunk_bytes(transfer.chunk_bytes);
  RawStateDictCall call(channel_.get(), &context, SerializeToByteBuffer(proto));
  ASSIGN_OR_RETURN(const v1::Manifest manifest, call.ReadManifest());
  absl::StatusOr<std::vector<TransferEntry>> entries =
      ToTransferEntries(manifest.tensors());
  if (!entries.ok()) return call.Abandon(entries.status());
  if (transfer.on_manifest) {
    std::vector<TensorDescription> described;
    described.reserve(entries->size());
    for (size_t i = 0; i < entries->size(); ++i)
      described.push_back(
          Describe(manifest.tensors(static_cast<int>(i)), (*entries)[i]));
    absl::Status accepted = transfer.on_manifest(described);
    if (!accepted.ok()) return call.Abandon(accepted);
  }
  absl::StatusOr<std::unique_ptr<ChunkReceiver>> receiver =
      ChunkReceiver::Create(*entries, [&](size_t index, Tensor tensor) {
        return on_tensor(Describe(manifest.tensors(static_cast<int>(index)),
                                  (*entries)[index]),
                         std::move(tensor));
      });
  if (!receiver.ok()) return call.Abandon(receiver.status());
  RETURN_IF_ERROR(call.ReadToEnd(**receiver, transfer.progress));
  return manifest.version();
}

absl::StatusOr<FetchedStateDict> Client::StateDict(
    const FetchRequest& request, const TransferOptions& transfer) {
  FetchedStateDict fetched;
  fetched.model = request.model;
  ASSIGN_OR_RETURN(
      fetched.version,
      StateDictStreaming(
          request, transfer,
          [&](const TensorDescription& description, Tensor tensor) {
            return fetched.state.Insert(description.name, std::move(tensor),
                                        description.kind);
          }));
  return fetched;
}

absl::StatusOr<LoadOutcome> Client::LoadStateDict(
    const LoadRequest& load, const modelstate::StateDict& state,
    const TransferOptions& transfer) {
  ASSIGN_OR_RETURN(const uint32_t chunk_bytes,
                   ResolveChunkBytes(transfer.chunk_bytes, kDefaultChunkBytes));
  grpc::ClientContext context;
  Prepare(&context);
  v1::LoadStateDictResponse response;
  std::unique_ptr<grpc::ClientWriter<v1::LoadStateDictRequest>> writer =
      stub_->LoadStateDict(&context, &response);
  ChunkSender sender(state.Tensors(), chunk_bytes);
  v1::LoadStateDictRequest request;
  *request.mutable_header() = ToLoadHeader(load, state, sender.total_bytes());
  // A failed write means the server has already answered (e.g. it refused the
  // header); its status is collected by Finish below.
  bool open = writer->Write(request);
  ChunkSender::Chunk chunk;
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
    if (transfer.progress)
      transfer.progress(chunk.offset + chunk.size, sender.total_bytes());
  }
  if (open) {
    request.Clear();
    request.mutable_end()->set_total_bytes(sender.total_bytes());
    open = writer->Write(request);
  }
  if (open) writer->WritesDone();
  RETURN_IF_ERROR(FromGrpcStatus(writer->Finish()));
  return FromProto(response);
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
    const std::function<bool(const ModelEvent&)>& on_event) {
  grpc::ClientContext context;
  Prepare(&context);
  v1::WatchModelRequest request;
  request.set_model(model);
  std::unique_ptr<grpc::ClientReader<v1::WatchModelResponse>> reader =
      stub_->WatchModel(&context, request);
  v1::WatchModelResponse response;
  absl::Status stopped;  // Why we stopped reading early, if we did.
  while (reader->Read(&response)) {
    absl::StatusOr<ModelEvent> event = FromProto(response);
    if (!event.ok()) {
      stopped = absl::DataLossError(event.status().message());
    } else if (on_event(*event)) {
      continue;
    }
    context.TryCancel();
    while (reader->Read(&response)) {
    }
    reader->Finish();
    return stopped;
  }
  return FromGrpcStatus(reader->Finish());
}

}  // namespace modelstate

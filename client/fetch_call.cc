#include "client/fetch_call.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/bearer.h"
#include "common/status_macros.h"
#include "proto/chunk_frame.h"
#include "proto/convert.h"
#include "proto/grpc_status.h"

namespace modelstate {

TensorDescription Describe(const v1::TensorInfo& info,
                           const TransferEntry& entry) {
  return TensorDescription{info.name(),      FromProto(info.kind()).value(),
                           entry.dtype,      entry.shape,
                           info.num_bytes(), info.xxh3_64()};
}

std::vector<TensorDescription> Describe(
    const v1::Manifest& manifest, const std::vector<TransferEntry>& entries) {
  std::vector<TensorDescription> described;
  described.reserve(entries.size());
  for (size_t i = 0; i < entries.size(); ++i)
    described.push_back(
        Describe(manifest.tensors(static_cast<int>(i)), entries[i]));
  return described;
}

bool SameTransfer(const v1::Manifest& a, const v1::Manifest& b) {
  if (a.version() != b.version() || a.total_bytes() != b.total_bytes() ||
      a.tensors_size() != b.tensors_size()) {
    return false;
  }
  for (int i = 0; i < a.tensors_size(); ++i) {
    const v1::TensorInfo& x = a.tensors(i);
    const v1::TensorInfo& y = b.tensors(i);
    if (x.name() != y.name() || x.kind() != y.kind() ||
        x.dtype() != y.dtype() || x.num_bytes() != y.num_bytes() ||
        x.xxh3_64() != y.xxh3_64() ||
        !std::equal(x.shape().begin(), x.shape().end(), y.shape().begin(),
                    y.shape().end())) {
      return false;
    }
  }
  return true;
}

namespace {

// Calls `transfer.on_manifest`, if set, with the stream's tensors.
absl::Status Announce(const v1::Manifest& manifest,
                      const std::vector<TransferEntry>& entries,
                      const TransferOptions& transfer) {
  if (!transfer.on_manifest) return absl::OkStatus();
  return transfer.on_manifest(Describe(manifest, entries));
}

}  // namespace

absl::StatusOr<StartedFetch> StartAndAnnounce(ResumableFetch& call,
                                              const TransferOptions& transfer) {
  ASSIGN_OR_RETURN(const v1::Manifest* manifest, call.Start());
  absl::StatusOr<std::vector<TransferEntry>> entries =
      ToTransferEntries(manifest->tensors());
  if (!entries.ok()) return call.Abandon(entries.status());
  absl::Status accepted = Announce(*manifest, *entries, transfer);
  if (!accepted.ok()) return call.Abandon(accepted);
  return StartedFetch{*manifest, *std::move(entries)};
}

absl::StatusOr<absl::optional<LocalFetched>> FetchThroughSharedMemory(
    const ClientOptions& options, const FetchRequest& fetch,
    const TransferOptions& transfer, const LocalManifestCallback& on_manifest) {
  if (options.local_socket.empty()) return absl::nullopt;
  const auto cancelled = [&] {
    return transfer.canceller != nullptr && transfer.canceller->cancelled();
  };
  if (cancelled()) return absl::CancelledError("fetch cancelled");
  LocalFetchSettings settings;
  settings.socket_path = options.local_socket;
  settings.token = options.token;
  settings.timeout = options.timeout;
  settings.verify_exports = options.verify_shared_memory;
  ASSIGN_OR_RETURN(absl::optional<LocalFetched> fetched,
                   FetchLocally(settings, ToProto(fetch), on_manifest));
  if (!fetched.has_value()) return fetched;
  if (cancelled()) return absl::CancelledError("fetch cancelled");
  if (transfer.progress) {
    const uint64_t total = fetched->manifest.total_bytes();
    transfer.progress(total, total);
  }
  return fetched;
}

absl::StatusOr<v1::Manifest> RawStateDictCall::ReadManifest() {
  if (!reader_->Read(&buffer_)) return FromGrpcStatus(reader_->Finish());
  absl::StatusOr<bool> chunk =
      ReadStateDictFrame(&buffer_, &response_, [](uint64_t, absl::string_view) {
        return absl::DataLossError("stream did not start with a manifest");
      });
  if (!chunk.ok())
    return Abandon(absl::DataLossError(chunk.status().message()));
  if (*chunk || !response_.has_manifest()) {
    return Abandon(absl::DataLossError("stream did not start with a manifest"));
  }
  return std::move(*response_.mutable_manifest());
}

absl::Status RawStateDictCall::ReadToEnd(ChunkReceiver& receiver,
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
      if (progress) progress(receiver.received_bytes(), receiver.total_bytes());
    } else if (step.ok() && response_.has_end() && !ended) {
      step = receiver.Finish(response_.end().total_bytes()).status();
      ended = true;
    } else if (step.ok()) {
      step = absl::DataLossError("unexpected message in a StateDict stream");
    }
    if (!step.ok()) {
      // The caller's own error (its callback's or writer's) stays as it is;
      // what the receiver refused is a bad stream.
      if (!receiver.callback_error().ok()) {
        Abandon(step).IgnoreError();
        return receiver.callback_error();
      }
      if (step.code() == absl::StatusCode::kInvalidArgument)
        step = absl::DataLossError(step.message());
      return Abandon(step);
    }
  }
  RETURN_IF_ERROR(FromGrpcStatus(reader_->Finish()));
  if (!ended)
    return absl::DataLossError("StateDict stream ended without its end marker");
  return absl::OkStatus();
}

absl::Status RawStateDictCall::Abandon(absl::Status status) {
  context_->TryCancel();
  while (reader_->Read(&buffer_)) {
  }
  absl::Status server = FromGrpcStatus(reader_->Finish());
  return server.ok() || server.code() == absl::StatusCode::kCancelled ? status
                                                                      : server;
}

absl::StatusOr<const v1::Manifest*> ResumableFetch::Start() {
  if (request_.offset != 0) {
    return absl::InvalidArgumentError(
        "FetchRequest.offset is set by resumed fetches, not by callers");
  }
  Open(request_);
  absl::StatusOr<v1::Manifest> manifest = attempt_->call->ReadManifest();
  while (manifest.status().code() == absl::StatusCode::kUnavailable &&
         MayResume() && ConnectionDropped()) {
    BackOff();
    Open(request_);
    manifest = attempt_->call->ReadManifest();
  }
  ASSIGN_OR_RETURN(first_, std::move(manifest));
  return &first_;
}

absl::Status ResumableFetch::ReadToEnd(ChunkReceiver& receiver) {
  absl::Status status = attempt_->call->ReadToEnd(receiver, transfer_.progress);
  // A connection that dropped is resumed; the caller's own Unavailable
  // (a busy device) is not.
  while (status.code() == absl::StatusCode::kUnavailable &&
         receiver.callback_error().ok() && MayResume()) {
    BackOff();
    status = Resume(receiver.received_bytes());
    if (status.ok())
      status = attempt_->call->ReadToEnd(receiver, transfer_.progress);
  }
  if (status.code() == absl::StatusCode::kUnavailable && resumes_ > 0 &&
      receiver.callback_error().ok()) {
    return absl::UnavailableError(absl::StrCat(
        status.message(), " (gave up after ", resumes_, " resumes, at byte ",
        receiver.received_bytes(), " of ", receiver.total_bytes(), ")"));
  }
  return status;
}

void ResumableFetch::Open(const FetchRequest& request) {
  attempt_.reset();
  attempt_ = std::make_unique<Attempt>();
  if (deadline_ != absl::InfiniteFuture())
    attempt_->context.set_deadline(absl::ToChronoTime(deadline_));
  if (!token_.empty())
    attempt_->context.AddMetadata("authorization", BearerAuthorization(token_));
  attempt_->cancel_scope =
      std::make_unique<CancelScope>(transfer_.canceller, &attempt_->context);
  v1::StateDictRequest proto = ToProto(request);
  proto.set_chunk_bytes(transfer_.chunk_bytes);
  attempt_->call = std::make_unique<RawStateDictCall>(
      channel_, &attempt_->context, SerializeToByteBuffer(proto));
}

bool ResumableFetch::ConnectionDropped() const {
  constexpr absl::Duration kStateSettles = absl::Milliseconds(20);
  grpc_connectivity_state state = channel_->GetState(/*try_to_connect=*/false);
  if (state == GRPC_CHANNEL_READY &&
      channel_->WaitForStateChange(
          state, absl::ToChronoTime(absl::Now() + kStateSettles))) {
    state = channel_->GetState(/*try_to_connect=*/false);
  }
  return state == GRPC_CHANNEL_IDLE;
}

absl::Status ResumableFetch::Resume(uint64_t received) {
  FetchRequest request = request_;
  request.version = first_.version();
  request.min_version = 0;  // The pinned version is reached by definition.
  request.offset = received;
  Open(request);
  absl::StatusOr<v1::Manifest> manifest = attempt_->call->ReadManifest();
  if (manifest.status().code() == absl::StatusCode::kNotFound) {
    return absl::NotFoundError(absl::StrCat(
        "cannot resume the fetch of \"", first_.model(), "\" version ",
        first_.version(), " at byte ", received, " of ", first_.total_bytes(),
        ": the server no longer has that version (fetch again): ",
        manifest.status().message()));
  }
  if (!manifest.ok()) return manifest.status();
  if (!SameTransfer(first_, *manifest)) {
    return Abandon(absl::AbortedError(absl::StrCat(
        "cannot resume the fetch of \"", first_.model(), "\" version ",
        first_.version(),
        ": the server describes it differently than when the fetch began")));
  }
  return absl::OkStatus();
}

}  // namespace modelstate

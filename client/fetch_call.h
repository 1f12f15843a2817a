// Internal to the client library: one fetch over gRPC as raw StateDict
// calls, resumed after dropped connections, and what every kind of fetch
// does with its manifest.
#ifndef MODELSTATE_CLIENT_FETCH_CALL_H_
#define MODELSTATE_CLIENT_FETCH_CALL_H_

#include <algorithm>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "client/cancel_scope.h"
#include "client/client.h"
#include "client/local_fetch.h"
#include "grpcpp/channel.h"
#include "grpcpp/impl/codegen/proto_utils.h"
#include "modelstate/v1/model_state.grpc.pb.h"
#include "transfer/transfer.h"

namespace modelstate {

// A tensor of the manifest as TransferOptions::on_manifest sees it.
TensorDescription Describe(const v1::TensorInfo& info,
                           const TransferEntry& entry);
// The manifest's entries as TransferOptions::on_manifest sees them.
std::vector<TensorDescription> Describe(
    const v1::Manifest& manifest, const std::vector<TransferEntry>& entries);

// Whether two manifests describe the same bytes: version, total and every
// tensor's name, kind, dtype, shape, size and checksum.
bool SameTransfer(const v1::Manifest& a, const v1::Manifest& b);

// One StateDict call read as raw messages, so that chunk bytes go from the
// received slices straight into the receiver (ReadStateDictFrame), copied
// once.
class RawStateDictCall {
 public:
  // Starts the call; `context` must outlive this object.
  RawStateDictCall(grpc::Channel* channel, grpc::ClientContext* context,
                   const grpc::ByteBuffer& request)
      : context_(context),
        reader_(grpc::internal::ClientReaderFactory<grpc::ByteBuffer>::Create(
            channel, Method(), context, request)) {}

  // Reads the first message, which must be the manifest.
  absl::StatusOr<v1::Manifest> ReadManifest();

  // Feeds every chunk to `receiver` until the end marker and the call's end. A
  // bad stream is DataLoss, whatever the receiver called it; the receiver's
  // callback error is returned as it is, whatever the server says after the
  // cancel.
  absl::Status ReadToEnd(ChunkReceiver& receiver,
                         const ProgressCallback& progress);

  // Stops the stream and reports `status` (the server's status wins if it has
  // one).
  absl::Status Abandon(absl::Status status);

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

// One fetch as one StateDict call, or several when the connection drops: the
// first call's manifest pins the version, and a call that ends Unavailable is
// followed by one for that version from the bytes received so far
// (FetchRequest::offset), whose manifest must match the first's. The receiver,
// with its partly filled tensor and checksum state, carries over, so every
// byte is received once. Every call shares one deadline and the canceller.
// The receiver's callback error ends the fetch as it is, never resumed. A
// first call whose connection drops before its manifest is read is opened
// again, within the same budget.
class ResumableFetch {
 public:
  ResumableFetch(grpc::Channel* channel, absl::Time deadline, std::string token,
                 const FetchRequest& request, const TransferOptions& transfer)
      : channel_(channel),
        deadline_(deadline),
        token_(std::move(token)),
        request_(request),
        transfer_(transfer) {}

  // Starts the first call and returns its manifest, which lives as long as
  // this object (a copy of 100,000 tensors' descriptions is not free). A
  // connection that drops before the manifest is read is opened again, as a
  // resume from byte 0, within the same budget. An Unavailable the server
  // sent (its connection still up) or a channel that cannot connect at all
  // fails at once.
  absl::StatusOr<const v1::Manifest*> Start();

  // Feeds every chunk to `receiver` until the end marker, resuming after
  // dropped connections up to transfer.max_resumes times.
  absl::Status ReadToEnd(ChunkReceiver& receiver);

  // Stops the current call and reports `status` (see RawStateDictCall).
  absl::Status Abandon(absl::Status status) {
    return attempt_->call->Abandon(std::move(status));
  }

 private:
  // One call: its context, canceller attachment and stream, destroyed in the
  // reverse order.
  struct Attempt {
    grpc::ClientContext context;
    std::unique_ptr<CancelScope> cancel_scope;
    std::unique_ptr<RawStateDictCall> call;
  };

  void Open(const FetchRequest& request);

  // True when the channel lost the connection it had (IDLE): not a server's
  // answer (the connection stays READY), nor a server that cannot be reached
  // (TRANSIENT_FAILURE, or CONNECTING again). The channel learns of a drop a
  // moment after the call does, so a READY channel is given that moment.
  bool ConnectionDropped() const;

  // True while resumes are left and the next one's back-off ends before the
  // deadline (past it, the last Unavailable is the answer, not a
  // DeadlineExceeded of a call that could not start).
  bool MayResume() const {
    return resumes_ < transfer_.max_resumes &&
           absl::Now() + Delay(resumes_ + 1) < deadline_;
  }

  // The back-off before resume `n` (from 1): 50 ms, doubling, at most 1 s.
  static absl::Duration Delay(int n) {
    return std::min(absl::Milliseconds(50) * (1 << std::min(n - 1, 5)),
                    absl::Seconds(1));
  }

  // Counts one more resume and waits before it.
  void BackOff() {
    ++resumes_;
    absl::SleepFor(Delay(resumes_));
  }

  // Opens the next call at byte `received` of the pinned version and checks
  // that its manifest is the first one's.
  absl::Status Resume(uint64_t received);

  grpc::Channel* channel_;
  const absl::Time deadline_;
  const std::string token_;  // Sent with every attempt, as Client::Prepare.
  const FetchRequest request_;
  const TransferOptions& transfer_;
  v1::Manifest first_;
  std::unique_ptr<Attempt> attempt_;
  int resumes_ = 0;  // Calls opened again after a drop, of max_resumes.
};

// A fetch's manifest (the call's) and its tensors, once on_manifest accepted
// them.
struct StartedFetch {
  const v1::Manifest& manifest;
  std::vector<TransferEntry> entries;
};

// Starts `call` and hands its manifest to `transfer.on_manifest`; on an
// error the call is abandoned.
absl::StatusOr<StartedFetch> StartAndAnnounce(ResumableFetch& call,
                                              const TransferOptions& transfer);

// The shared-memory way of a fetch (ClientOptions::local_socket): nullopt
// when there is no local socket to use, and the caller goes through gRPC.
absl::StatusOr<absl::optional<LocalFetched>> FetchThroughSharedMemory(
    const ClientOptions& options, const FetchRequest& fetch,
    const TransferOptions& transfer, const LocalManifestCallback& on_manifest);

}  // namespace modelstate

#endif  // MODELSTATE_CLIENT_FETCH_CALL_H_

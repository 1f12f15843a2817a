// Fetching a state dict over the wire: whole (Fetch), tensor by tensor
// (FetchStreaming) or piece by piece into the caller's storage
// (FetchToWriter). Resuming after a dropped connection is fetch_call.h's.
#include <functional>
#include <map>
#include <memory>
#include <utility>
#include <vector>

#include "client/client.h"
#include "client/fetch_call.h"
#include "client/local_fetch.h"
#include "common/status_macros.h"
#include "proto/convert.h"
#include "transfer/transfer.h"

namespace modelstate {
namespace {

// Called with each received tensor, its index in the manifest and its entry.
using ReceivedTensorCallback =
    std::function<absl::Status(const v1::Manifest& manifest, size_t index,
                               const TransferEntry& entry, Tensor tensor)>;

// Hands tensors on in manifest order when shared entries' bytes do not
// travel: a shared entry goes out, as its source's tensor, once every entry
// before it has.
class SharedTensorOrder {
 public:
  SharedTensorOrder(const std::vector<TransferEntry>& entries,
                    const ReceivedTensorCallback& on_tensor)
      : entries_(entries), on_tensor_(on_tensor) {
    for (const TransferEntry& entry : entries) {
      if (entry.shared_with >= 0) kept_[entry.shared_with] = Tensor();
    }
  }

  // Called with each received tensor and its manifest index, in order.
  absl::Status Received(const v1::Manifest& manifest, size_t index,
                        Tensor tensor) {
    RETURN_IF_ERROR(HandOnSharedBefore(manifest, index));
    auto kept = kept_.find(static_cast<int64_t>(index));
    if (kept != kept_.end()) kept->second = tensor;
    next_ = index + 1;
    return on_tensor_(manifest, index, entries_[index], std::move(tensor));
  }

  // Hands on the shared entries after the last received one.
  absl::Status Finish(const v1::Manifest& manifest) {
    return HandOnSharedBefore(manifest, entries_.size());
  }

 private:
  absl::Status HandOnSharedBefore(const v1::Manifest& manifest, size_t end) {
    for (; next_ < end; ++next_) {
      const TransferEntry& entry = entries_[next_];
      RETURN_IF_ERROR(
          on_tensor_(manifest, next_, entry, kept_.at(entry.shared_with)));
    }
    return absl::OkStatus();
  }

  const std::vector<TransferEntry>& entries_;
  const ReceivedTensorCallback& on_tensor_;
  std::map<int64_t, Tensor> kept_;  // Sources of shared entries.
  size_t next_ = 0;
};

// Fetches `fetch`, handing each tensor to `on_tensor` as it completes, packed
// as `packing` says; a tensor held under several keys travels once. Returns
// the version.
absl::StatusOr<int64_t> ReceiveTensors(
    grpc::Channel* channel, absl::Time deadline, const std::string& token,
    FetchRequest fetch, const TransferOptions& transfer, TensorPacking packing,
    const ReceivedTensorCallback& on_tensor) {
  fetch.accept_shared_tensors = true;
  ResumableFetch call(channel, deadline, token, fetch, transfer);
  ASSIGN_OR_RETURN(StartedFetch started, StartAndAnnounce(call, transfer));
  const v1::Manifest& manifest = started.manifest;
  std::vector<size_t> manifest_index;
  for (size_t i = 0; i < started.entries.size(); ++i) {
    if (started.entries[i].shared_with < 0) manifest_index.push_back(i);
  }
  SharedTensorOrder order(started.entries, on_tensor);
  absl::StatusOr<std::unique_ptr<ChunkReceiver>> receiver =
      ChunkReceiver::Create(
          SentEntries(started.entries),
          [&](size_t index, const TransferEntry&, Tensor tensor) {
            return order.Received(manifest, manifest_index[index],
                                  std::move(tensor));
          },
          /*min_chunk_bytes=*/0, packing);
  if (!receiver.ok()) return call.Abandon(receiver.status());
  RETURN_IF_ERROR(call.ReadToEnd(**receiver));
  RETURN_IF_ERROR(order.Finish(manifest));
  return manifest.version();
}

// Hands every piece of the stream to a Client::PieceWriter.
class PieceWriterSink : public TensorSink {
 public:
  explicit PieceWriterSink(const Client::PieceWriter& write) : write_(write) {}

  absl::Status Write(size_t index, uint64_t offset,
                     absl::string_view piece) override {
    return write_(index, offset, piece);
  }
  absl::Status Complete(size_t) override { return absl::OkStatus(); }

 private:
  const Client::PieceWriter& write_;
};

// A fetch's tensors as a FetchedStateDict's, keyed and kinded as the
// manifest says.
absl::Status InsertLocal(LocalFetched& local, FetchedStateDict& fetched) {
  fetched.version = local.manifest.version();
  for (size_t i = 0; i < local.tensors.size(); ++i) {
    RETURN_IF_ERROR(fetched.state.Insert(
        local.entries[i].key, std::move(local.tensors[i]),
        FromProto(local.manifest.tensors(static_cast<int>(i)).kind()).value()));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<FetchedStateDict> Client::Fetch(
    const FetchRequest& request, const TransferOptions& transfer) {
  FetchedStateDict fetched;
  fetched.model = request.model;
  const LocalManifestCallback on_manifest =
      [&](const v1::Manifest& manifest,
          const std::vector<TransferEntry>& entries) {
        return transfer.on_manifest
                   ? transfer.on_manifest(Describe(manifest, entries))
                   : absl::OkStatus();
      };
  ASSIGN_OR_RETURN(
      absl::optional<LocalFetched> local,
      FetchThroughSharedMemory(options_, request, transfer, on_manifest));
  if (local.has_value()) {
    RETURN_IF_ERROR(InsertLocal(*local, fetched));
    return fetched;
  }
  ASSIGN_OR_RETURN(
      fetched.version,
      ReceiveTensors(channel_.get(), Deadline(), options_.token, request,
                     transfer, transfer.packing,
                     [&](const v1::Manifest& manifest, size_t index,
                         const TransferEntry& entry, Tensor tensor) {
                       if (index == 0)
                         fetched.state.Reserve(manifest.tensors_size());
                       const v1::TensorInfo& info =
                           manifest.tensors(static_cast<int>(index));
                       return fetched.state.Insert(
                           entry.key, std::move(tensor),
                           FromProto(info.kind()).value());
                     }));
  return fetched;
}

absl::StatusOr<int64_t> Client::FetchStreaming(
    const FetchRequest& fetch, const TransferOptions& transfer,
    const std::function<absl::Status(const TensorDescription&, Tensor)>&
        on_tensor) {
  // Tensors in storages of their own: a consumer that keeps a few of them
  // keeps no one else's bytes alive.
  return ReceiveTensors(
      channel_.get(), Deadline(), options_.token, fetch, transfer,
      TensorPacking::kOwnStorage,
      [&](const v1::Manifest& manifest, size_t index,
          const TransferEntry& entry, Tensor tensor) {
        return on_tensor(
            Describe(manifest.tensors(static_cast<int>(index)), entry),
            std::move(tensor));
      });
}

absl::StatusOr<int64_t> Client::FetchToWriter(const FetchRequest& fetch,
                                              const TransferOptions& transfer,
                                              const PieceWriter& write) {
  // Pieces are written by manifest index: every key's bytes must come.
  FetchRequest every_key = fetch;
  every_key.accept_shared_tensors = false;
  ResumableFetch call(channel_.get(), Deadline(), options_.token, every_key,
                      transfer);
  ASSIGN_OR_RETURN(StartedFetch started, StartAndAnnounce(call, transfer));
  PieceWriterSink sink(write);
  absl::StatusOr<std::unique_ptr<ChunkReceiver>> receiver =
      ChunkReceiver::CreateIntoSink(std::move(started.entries), &sink);
  if (!receiver.ok()) return call.Abandon(receiver.status());
  RETURN_IF_ERROR(call.ReadToEnd(**receiver));
  return started.manifest.version();
}

}  // namespace modelstate

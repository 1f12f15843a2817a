// Loading a state dict over the wire (torch's load_state_dict): chunks go
// out as slices of the tensors' memory, checksums follow in the end marker.
#include <algorithm>
#include <memory>
#include <utility>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "client/cancel_scope.h"
#include "client/client.h"
#include "common/limits.h"
#include "common/status_macros.h"
#include "grpcpp/channel.h"
#include "grpcpp/impl/codegen/proto_utils.h"
#include "proto/chunk_frame.h"
#include "proto/convert.h"
#include "proto/grpc_status.h"
#include "transfer/checksum.h"
#include "transfer/transfer.h"

namespace modelstate {
namespace {

// One LoadStateDict call (the RPC) written as raw messages, so that chunks go
// out as slices of the tensors' storage (FrameLoadChunk), never copied into a
// message. The bytes on the wire are exactly the proto's.
class RawLoadCall {
 public:
  // Starts the call; `context` must outlive this object.
  RawLoadCall(grpc::Channel* channel, grpc::ClientContext* context)
      : writer_(grpc::internal::ClientWriterFactory<grpc::ByteBuffer>::Create(
            channel, Method(), context, &response_)) {}

  // Sends one message; false once the server has answered (e.g. it refused
  // the header), whose status Finish returns.
  bool Write(const grpc::ByteBuffer& message) {
    open_ = open_ && writer_->Write(message);
    return open_;
  }

  // Ends the stream and returns the server's answer.
  absl::StatusOr<LoadOutcome> Finish() {
    if (open_) writer_->WritesDone();
    RETURN_IF_ERROR(FromGrpcStatus(writer_->Finish()));
    v1::LoadStateDictResponse response;
    if (!grpc::SerializationTraits<v1::LoadStateDictResponse>::Deserialize(
             &response_, &response)
             .ok()) {
      return absl::DataLossError("malformed LoadStateDictResponse");
    }
    return FromProto(response);
  }

 private:
  static const grpc::internal::RpcMethod& Method() {
    static const grpc::internal::RpcMethod kLoadStateDict(
        "/modelstate.v1.ModelState/LoadStateDict",
        grpc::internal::RpcMethod::CLIENT_STREAMING);
    return kLoadStateDict;
  }

  grpc::ByteBuffer response_;
  std::unique_ptr<grpc::ClientWriter<grpc::ByteBuffer>> writer_;
  bool open_ = true;
};

// Counts the pieces of tensor memory one call handed to gRPC and it still
// holds. The call returns only once gRPC has let go of every one: a caller may
// lend memory that lives only as long as the call (the Python binding does),
// and gRPC may drop its last reference after the call's status arrived (a
// write that was in flight when the server ended the call early).
class LentMemory {
 public:
  // Returns `storage` as a handle that counts as lent until gRPC releases it.
  static std::shared_ptr<const Storage> Lend(
      const std::shared_ptr<LentMemory>& lent,
      std::shared_ptr<const Storage> storage) {
    {
      absl::MutexLock lock(&lent->mu_);
      ++lent->held_;
    }
    auto loan = std::make_shared<Loan>(lent, std::move(storage));
    return std::shared_ptr<const Storage>(loan, loan->storage.get());
  }

  // Waits until every lent piece is back. gRPC releases a piece once its
  // bytes are written or dropped with the stream; it does not wait on the
  // peer once the call has ended.
  void WaitUntilReturned() {
    absl::MutexLock lock(&mu_);
    mu_.Await(absl::Condition(
        +[](int64_t* held) { return *held == 0; }, &held_));
  }

 private:
  struct Loan {
    Loan(std::shared_ptr<LentMemory> lent, std::shared_ptr<const Storage> s)
        : lent(std::move(lent)), storage(std::move(s)) {}
    ~Loan() {
      absl::MutexLock lock(&lent->mu_);
      --lent->held_;
    }
    std::shared_ptr<LentMemory> lent;  // Outlives this unlock.
    std::shared_ptr<const Storage> storage;
  };

  absl::Mutex mu_;
  int64_t held_ ABSL_GUARDED_BY(mu_) = 0;
};

// Hashes each tensor (XXH3-64) from the pieces of the chunks that send it, in
// stream order, so that no pass over the data precedes the first byte sent.
class SendHasher {
 public:
  explicit SendHasher(const std::vector<Tensor>& tensors) {
    sizes_.reserve(tensors.size());
    for (const Tensor& tensor : tensors) sizes_.push_back(tensor.num_bytes());
    checksums_.reserve(tensors.size());
    if (!sizes_.empty()) checksum_.Begin(sizes_[0]);
  }

  // Adds the next piece of the stream, which may span tensors that lie back
  // to back in one storage (ChunkSender).
  void Add(absl::Span<const uint8_t> piece) {
    while (!piece.empty()) {
      CompleteFullTensors();
      if (checksums_.size() == sizes_.size()) return;  // Past the end.
      const uint64_t take = std::min<uint64_t>(
          piece.size(), sizes_[checksums_.size()] - checksum_.hashed());
      checksum_.Update(piece.data(), take);
      piece.remove_prefix(take);
    }
  }

  // Every tensor's checksum in stream order, once every piece was added.
  std::vector<uint64_t> Finish() {
    CompleteFullTensors();
    return std::move(checksums_);
  }

 private:
  void CompleteFullTensors() {
    while (checksums_.size() < sizes_.size() &&
           checksum_.hashed() == sizes_[checksums_.size()]) {
      checksums_.push_back(checksum_.Digest());
      if (checksums_.size() < sizes_.size())
        checksum_.Begin(sizes_[checksums_.size()]);
    }
  }

  ChecksumCursor checksum_;
  std::vector<uint64_t> sizes_;
  std::vector<uint64_t> checksums_;
};

// Sends a load over `call`: the header with no checksum, the chunks framed
// around the tensors' memory (lent through `lent`), then the end marker with
// every tensor's checksum, hashed as its bytes went out ("verify at End",
// docs/protocol.md). Returns the server's answer.
absl::StatusOr<LoadOutcome> SendLoad(RawLoadCall& call, const LoadRequest& load,
                                     const modelstate::StateDict& state,
                                     uint32_t chunk_bytes,
                                     const ProgressCallback& progress,
                                     const std::shared_ptr<LentMemory>& lent) {
  // A tensor held under several keys (tied parameters) goes out once.
  const std::vector<int64_t> shared = SharedEntries(state);
  std::vector<Tensor> sent;
  for (size_t i = 0; i < state.size(); ++i) {
    if (shared[i] < 0) sent.push_back(state.entries()[i].tensor);
  }
  ChunkSender sender(std::move(sent), chunk_bytes);
  SendHasher hasher(sender.tensors());
  v1::LoadStateDictRequest message;
  *message.mutable_header() =
      ToLoadHeaderWithoutChecksums(load, state, sender.total_bytes());
  MarkSharedTensors(state, shared, message.mutable_header()->mutable_tensors());
  bool open = call.Write(SerializeToByteBuffer(message));
  ChunkSender::Chunk chunk;
  while (open && sender.Next(&chunk)) {
    for (absl::Span<const uint8_t> piece : chunk.pieces) hasher.Add(piece);
    for (std::shared_ptr<const Storage>& owner : chunk.owners)
      owner = LentMemory::Lend(lent, std::move(owner));
    open = call.Write(FrameLoadChunk(chunk));
    if (progress) progress(chunk.offset + chunk.size, sender.total_bytes());
  }
  if (open) {
    v1::End* end = message.mutable_end();
    end->set_total_bytes(sender.total_bytes());
    const std::vector<uint64_t> checksums = hasher.Finish();
    end->mutable_xxh3_64()->Add(checksums.begin(), checksums.end());
    call.Write(SerializeToByteBuffer(message));
  }
  return call.Finish();
}

}  // namespace

absl::StatusOr<LoadOutcome> Client::Load(const LoadRequest& load,
                                         const modelstate::StateDict& state,
                                         const TransferOptions& transfer) {
  ASSIGN_OR_RETURN(const uint32_t chunk_bytes,
                   ResolveChunkBytes(transfer.chunk_bytes, kDefaultChunkBytes));
  auto lent = std::make_shared<LentMemory>();
  absl::StatusOr<LoadOutcome> outcome;
  {
    grpc::ClientContext context;
    Prepare(&context);
    CancelScope cancel_scope(transfer.canceller, &context);
    RawLoadCall call(channel_.get(), &context);
    outcome = SendLoad(call, load, state, chunk_bytes, transfer.progress, lent);
  }
  // The call is gone, and with it every message gRPC kept for it.
  lent->WaitUntilReturned();
  return outcome;
}

}  // namespace modelstate

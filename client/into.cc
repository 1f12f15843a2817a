// Fetching a state dict into the caller's memory (a worker's in-place
// refresh): matching destinations to the manifest, then receiving either
// straight into them or staged and verified first.
#include <algorithm>
#include <cstring>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "client/client.h"
#include "client/fetch_call.h"
#include "client/local_fetch.h"
#include "common/status_macros.h"
#include "model/state_dict.h"
#include "proto/convert.h"
#include "transfer/transfer.h"

namespace modelstate {
namespace {

// Keys quoted and joined the way torch lists them, at most 20 of them.
std::string QuotedKeys(const std::vector<std::string>& keys) {
  constexpr size_t kMaxListed = 20;
  std::vector<std::string> quoted;
  for (size_t i = 0; i < keys.size() && i < kMaxListed; ++i)
    quoted.push_back(absl::StrCat("\"", keys[i], "\""));
  std::string text = absl::StrJoin(quoted, ", ");
  if (keys.size() > kMaxListed)
    absl::StrAppend(&text, " and ", keys.size() - kMaxListed, " more");
  return text;
}

// Checks what can be checked before the call: unique keys, usable memory.
absl::Status CheckDestinations(const std::vector<Destination>& destinations) {
  std::set<absl::string_view> keys;
  for (const Destination& destination : destinations) {
    if (!keys.insert(destination.key).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("duplicate destination key \"", destination.key, "\""));
    }
    absl::StatusOr<int64_t> bytes =
        NumBytes(destination.dtype, destination.shape);
    if (!bytes.ok()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "destination \"", destination.key, "\": ", bytes.status().message()));
    }
    if (*bytes > 0 && destination.data == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat("destination \"", destination.key, "\" has no memory"));
    }
  }
  return absl::OkStatus();
}

// Returns, for each fetched entry, its destination. FailedPrecondition naming
// every key without a counterpart and every shape that differs.
// With `drop_unmatched`, fetched keys without a destination get nullptr (to
// be received and dropped) instead.
absl::StatusOr<std::vector<const Destination*>> MatchDestinations(
    const std::vector<TransferEntry>& entries,
    const std::vector<Destination>& destinations, bool drop_unmatched) {
  std::map<absl::string_view, const Destination*> by_key;
  for (const Destination& destination : destinations)
    by_key[destination.key] = &destination;
  std::vector<const Destination*> targets;
  std::vector<std::string> unexpected, mismatched;
  for (const TransferEntry& entry : entries) {
    auto found = by_key.find(entry.key);
    if (found == by_key.end()) {
      if (!drop_unmatched) unexpected.push_back(entry.key);
      targets.push_back(nullptr);
      continue;
    }
    if (found->second->shape != entry.shape) {
      mismatched.push_back(
          SizeMismatchText(entry.key, entry.shape, found->second->shape));
    }
    targets.push_back(found->second);
    by_key.erase(found);
  }
  std::vector<std::string> missing;
  for (const Destination& destination : destinations) {
    if (by_key.count(destination.key) > 0) missing.push_back(destination.key);
  }
  if (unexpected.empty() && missing.empty() && mismatched.empty())
    return targets;
  std::vector<std::string> problems;
  if (!missing.empty())
    problems.push_back(
        absl::StrCat("destinations not fetched: ", QuotedKeys(missing), "."));
  if (!unexpected.empty())
    problems.push_back(absl::StrCat(
        "fetched keys without a destination: ", QuotedKeys(unexpected), "."));
  for (std::string& problem : mismatched) problems.push_back(problem);
  return absl::FailedPreconditionError(absl::StrCat(
      "cannot fetch into the destinations: ", absl::StrJoin(problems, " ")));
}

// Per entry whose bytes travel (SentEntries), every destination they fill:
// its own, and those of the entries shared with it whose memory differs
// (tied parameters in one tensor need one write).
using SentTargets = std::vector<std::vector<const Destination*>>;

// Per entry, the index among SentEntries(entries) of the entry whose bytes
// it gets (its own, or its source's when shared).
std::vector<size_t> SentIndexes(const std::vector<TransferEntry>& entries) {
  std::vector<size_t> sent_index(entries.size());
  size_t sent = 0;
  for (size_t i = 0; i < entries.size(); ++i) {
    const int64_t source = entries[i].shared_with;
    sent_index[i] = source < 0 ? sent++ : sent_index[source];
  }
  return sent_index;
}

SentTargets TargetsOfSentEntries(
    const std::vector<TransferEntry>& entries,
    const std::vector<const Destination*>& targets) {
  const std::vector<size_t> sent_index = SentIndexes(entries);
  SentTargets sent(std::count_if(
      entries.begin(), entries.end(),
      [](const TransferEntry& entry) { return entry.shared_with < 0; }));
  for (size_t i = 0; i < entries.size(); ++i) {
    const Destination* target = targets[i];
    if (target == nullptr) continue;
    std::vector<const Destination*>& filled = sent[sent_index[i]];
    const bool same_memory =
        std::any_of(filled.begin(), filled.end(), [&](const Destination* d) {
          return d->data == target->data && d->dtype == target->dtype;
        });
    if (!same_memory) filled.push_back(target);
  }
  return sent;
}

// The keys `targets` fills from the first `sent_written` sent entries, in
// manifest order.
void AddWrittenKeys(const std::vector<TransferEntry>& entries,
                    const std::vector<const Destination*>& targets,
                    size_t sent_written, std::vector<std::string>* written) {
  if (written == nullptr) return;
  const std::vector<size_t> sent_index = SentIndexes(entries);
  for (size_t i = 0; i < entries.size(); ++i) {
    if (targets[i] != nullptr && sent_index[i] < sent_written)
      written->push_back(entries[i].key);
  }
}

// Writes a transfer straight into caller-owned destinations (IntoOptions::
// allow_partial_write): each piece is copied, or cast element by element,
// where it belongs. A tensor without a destination is verified and dropped.
class DestinationSink : public TensorSink {
 public:
  // `sent` and `targets` (one list per sent entry) must outlive the sink.
  DestinationSink(const std::vector<TransferEntry>& sent,
                  const SentTargets& targets)
      : sent_(sent), targets_(targets) {}

  absl::Status Write(size_t index, uint64_t offset,
                     absl::string_view piece) override {
    touched_ = std::max(touched_, index + 1);
    const DType dtype = sent_[index].dtype;
    uint8_t carry[8];
    std::memcpy(carry, carry_, sizeof(carry));
    for (const Destination* target : targets_[index]) {
      if (dtype == target->dtype) {
        std::memcpy(static_cast<uint8_t*>(target->data) + offset, piece.data(),
                    piece.size());
      } else {
        // Each target's cast starts from the bytes the last piece left.
        std::memcpy(carry_, carry, sizeof(carry));
        Cast(dtype, *target, offset, piece);
      }
    }
    return absl::OkStatus();
  }

  absl::Status Complete(size_t index) override {
    // A tensor without bytes had no Write to count it.
    touched_ = std::max(touched_, index + 1);
    return absl::OkStatus();
  }

  // How many sent entries (a prefix) had bytes written, or were empty.
  size_t touched() const { return touched_; }

 private:
  // Converts a piece of `dtype` elements `offset` bytes into its tensor to
  // the target's dtype. Elements may straddle pieces: their first bytes wait
  // in carry_.
  void Cast(DType dtype, const Destination& target, uint64_t offset,
            absl::string_view piece) {
    auto* out = static_cast<uint8_t*>(target.data);
    const size_t in_size = ElementSize(dtype);
    const size_t out_size = ElementSize(target.dtype);
    const size_t partial = offset % in_size;
    if (partial > 0) {
      const size_t take = std::min(in_size - partial, piece.size());
      std::memcpy(carry_ + partial, piece.data(), take);
      piece.remove_prefix(take);
      offset += take;
      if (offset % in_size == 0) {
        ConvertElements(dtype, carry_, target.dtype,
                        out + (offset / in_size - 1) * out_size, 1);
      }
    }
    const size_t whole = piece.size() / in_size;
    ConvertElements(dtype, piece.data(), target.dtype,
                    out + (offset / in_size) * out_size, whole);
    piece.remove_prefix(whole * in_size);
    std::memcpy(carry_, piece.data(), piece.size());
  }

  const std::vector<TransferEntry>& sent_;
  const SentTargets& targets_;
  size_t touched_ = 0;
  uint8_t carry_[8] = {};
};

// Copies verified staged tensors (one per sent entry) into their
// destinations.
void CopyStaged(const std::vector<Tensor>& staged, const SentTargets& targets) {
  for (size_t i = 0; i < staged.size(); ++i) {
    for (const Destination* target : targets[i]) {
      ConvertElements(staged[i].dtype(), staged[i].data(), target->dtype,
                      target->data,
                      static_cast<size_t>(staged[i].num_elements()));
    }
  }
}

// Picks each fetched tensor's destination (nullptr: drop it) from the
// manifest.
using DestinationResolver =
    std::function<absl::StatusOr<std::vector<const Destination*>>(
        const v1::Manifest&, const std::vector<TransferEntry>&)>;

// Receives a fetch straight into its destinations (allow_partial_write).
// The keys written, finished or not, go to `written`.
absl::Status ReceiveInPlace(ResumableFetch& call,
                            const std::vector<TransferEntry>& entries,
                            const std::vector<const Destination*>& targets,
                            std::vector<std::string>* written) {
  const std::vector<TransferEntry> sent = SentEntries(entries);
  const SentTargets sent_targets = TargetsOfSentEntries(entries, targets);
  DestinationSink sink(sent, sent_targets);
  absl::StatusOr<std::unique_ptr<ChunkReceiver>> receiver =
      ChunkReceiver::CreateIntoSink(sent, &sink);
  if (!receiver.ok()) return call.Abandon(receiver.status());
  const absl::Status received = call.ReadToEnd(**receiver);
  AddWrittenKeys(entries, targets, sink.touched(), written);
  return received;
}

// Receives a fetch into staging tensors and copies them into their
// destinations once every one was verified.
absl::Status ReceiveStaged(ResumableFetch& call,
                           const std::vector<TransferEntry>& entries,
                           const std::vector<const Destination*>& targets,
                           std::vector<std::string>* written) {
  std::vector<Tensor> staged;
  absl::StatusOr<std::unique_ptr<ChunkReceiver>> receiver =
      ChunkReceiver::Create(
          SentEntries(entries),
          [&](size_t, const TransferEntry&, Tensor tensor) {
            staged.push_back(std::move(tensor));
            return absl::OkStatus();
          },
          /*min_chunk_bytes=*/0, TensorPacking::kPackSmall);
  if (!receiver.ok()) return call.Abandon(receiver.status());
  RETURN_IF_ERROR(call.ReadToEnd(**receiver));
  CopyStaged(staged, TargetsOfSentEntries(entries, targets));
  AddWrittenKeys(entries, targets, staged.size(), written);
  return absl::OkStatus();
}

// FetchInto over gRPC: read the manifest, resolve destinations, then receive
// in the mode `into` chooses.
absl::StatusOr<int64_t> FetchIntoOverGrpc(
    grpc::Channel* channel, absl::Time deadline, const std::string& token,
    const FetchRequest& fetch, const DestinationResolver& resolve,
    const TransferOptions& transfer, const IntoOptions& into) {
  if (into.written_keys != nullptr) into.written_keys->clear();
  FetchRequest shared_once = fetch;
  shared_once.accept_shared_tensors = true;
  ResumableFetch call(channel, deadline, token, shared_once, transfer);
  ASSIGN_OR_RETURN(const v1::Manifest* manifest, call.Start());
  absl::StatusOr<std::vector<TransferEntry>> entries =
      ToTransferEntries(manifest->tensors());
  if (!entries.ok()) return call.Abandon(entries.status());
  absl::StatusOr<std::vector<const Destination*>> targets =
      resolve(*manifest, *entries);
  if (!targets.ok()) return call.Abandon(targets.status());
  RETURN_IF_ERROR(
      into.allow_partial_write
          ? ReceiveInPlace(call, *entries, *targets, into.written_keys)
          : ReceiveStaged(call, *entries, *targets, into.written_keys));
  return manifest->version();
}

// FetchInto through shared memory: destinations are resolved from the
// manifest before any byte moves, and written only once every tensor in the
// region has been verified, so a failure leaves them untouched (which keeps
// the promises of both IntoOptions modes).
absl::StatusOr<absl::optional<int64_t>> FetchIntoThroughSharedMemory(
    const ClientOptions& options, const FetchRequest& fetch,
    const DestinationResolver& resolve, const TransferOptions& transfer,
    const IntoOptions& into) {
  if (into.written_keys != nullptr) into.written_keys->clear();
  std::vector<const Destination*> targets;
  ASSIGN_OR_RETURN(
      const absl::optional<LocalFetched> fetched,
      FetchThroughSharedMemory(
          options, fetch, transfer,
          [&](const v1::Manifest& manifest,
              const std::vector<TransferEntry>& entries) -> absl::Status {
            ASSIGN_OR_RETURN(targets, resolve(manifest, entries));
            return absl::OkStatus();
          }));
  if (!fetched.has_value()) return absl::nullopt;
  CopyStaged(fetched->tensors, TargetsOfSentEntries(fetched->entries, targets));
  AddWrittenKeys(fetched->entries, targets, fetched->tensors.size(),
                 into.written_keys);
  return fetched->manifest.version();
}

// FetchInto through shared memory when `options` say the daemon is local
// and its socket answers, through gRPC otherwise.
absl::StatusOr<int64_t> FetchIntoEitherWay(
    const ClientOptions& options, grpc::Channel* channel, absl::Time deadline,
    const FetchRequest& fetch, const DestinationResolver& resolve,
    const TransferOptions& transfer, const IntoOptions& into) {
  ASSIGN_OR_RETURN(
      const absl::optional<int64_t> local,
      FetchIntoThroughSharedMemory(options, fetch, resolve, transfer, into));
  if (local.has_value()) return *local;
  return FetchIntoOverGrpc(channel, deadline, options.token, fetch, resolve,
                           transfer, into);
}

}  // namespace

absl::StatusOr<int64_t> Client::FetchInto(
    const FetchRequest& fetch, const std::vector<Destination>& destinations,
    const TransferOptions& transfer, const IntoOptions& into) {
  if (into.written_keys != nullptr) into.written_keys->clear();
  RETURN_IF_ERROR(CheckDestinations(destinations));
  const DestinationResolver resolve =
      [&](const v1::Manifest&, const std::vector<TransferEntry>& entries) {
        return MatchDestinations(entries, destinations,
                                 /*drop_unmatched=*/false);
      };
  return FetchIntoEitherWay(options_, channel_.get(), Deadline(), fetch,
                            resolve, transfer, into);
}

absl::StatusOr<int64_t> Client::FetchInto(const FetchRequest& fetch,
                                          const DestinationAllocator& allocate,
                                          const TransferOptions& transfer,
                                          const IntoOptions& into) {
  std::vector<Destination> destinations;
  const DestinationResolver resolve =
      [&](const v1::Manifest& manifest,
          const std::vector<TransferEntry>& entries)
      -> absl::StatusOr<std::vector<const Destination*>> {
    std::vector<TensorDescription> tensors;
    tensors.reserve(entries.size());
    for (size_t i = 0; i < entries.size(); ++i)
      tensors.push_back(
          Describe(manifest.tensors(static_cast<int>(i)), entries[i]));
    ASSIGN_OR_RETURN(destinations, allocate(tensors));
    RETURN_IF_ERROR(CheckDestinations(destinations));
    return MatchDestinations(entries, destinations,
                             /*drop_unmatched=*/true);
  };
  return FetchIntoEitherWay(options_, channel_.get(), Deadline(), fetch,
                            resolve, transfer, into);
}

}  // namespace modelstate

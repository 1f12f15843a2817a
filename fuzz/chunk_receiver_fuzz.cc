// The chunk receiver (every LoadStateDict stream and every client fetch) on a
// manifest and a chunk sequence derived from the input: dtypes, shapes (mostly
// small, sometimes arbitrary int64s), checksums (mostly right), chunk sizes and
// offsets (mostly in order), the end marker, small tensors packed into shared
// blocks or not. A transfer that finishes must give exactly the bytes that
// were sent, every tensor aligned as Storage promises.
#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "fuzzer/FuzzedDataProvider.h"
#include "transfer/transfer.h"

namespace modelstate {
namespace {

int64_t Dimension(FuzzedDataProvider& in) {
  if (in.ConsumeIntegralInRange<int>(0, 15) == 0)
    return in.ConsumeIntegral<int64_t>();
  return in.ConsumeIntegralInRange<int64_t>(0, 40);
}

TransferEntry Entry(FuzzedDataProvider& in, int index) {
  TransferEntry entry;
  entry.key = "t" + std::to_string(index);
  entry.dtype = static_cast<DType>(
      in.ConsumeIntegralInRange<int>(1, static_cast<int>(kLastDType)));
  const int dims = in.ConsumeIntegralInRange<int>(0, 5);
  for (int d = 0; d < dims; ++d) entry.shape.push_back(Dimension(in));
  return entry;
}

// Sets each checksum from the stream bytes the tensor will receive, except
// entry `wrong`'s; tensors past the end of the stream get 0.
void SetChecksums(const std::string& stream, size_t wrong,
                  std::vector<TransferEntry>* entries) {
  uint64_t at = 0;
  for (size_t i = 0; i < entries->size(); ++i) {
    TransferEntry& entry = (*entries)[i];
    absl::StatusOr<int64_t> bytes = NumBytes(entry.dtype, entry.shape);
    if (!bytes.ok() || static_cast<uint64_t>(*bytes) > stream.size() - at) {
      at = stream.size();
      continue;
    }
    absl::Span<const uint8_t> piece(
        reinterpret_cast<const uint8_t*>(stream.data()) + at, *bytes);
    entry.checksum =
        Tensor::FromBytes(entry.dtype, entry.shape, piece).value().Checksum() ^
        (i == wrong ? 1 : 0);
    at += *bytes;
  }
}

void FuzzOne(const uint8_t* data, size_t size) {
  FuzzedDataProvider in(data, size);
  std::vector<TransferEntry> entries(in.ConsumeIntegralInRange<int>(0, 12));
  for (size_t i = 0; i < entries.size(); ++i) entries[i] = Entry(in, i);
  std::vector<uint32_t> chunk_sizes(in.ConsumeIntegralInRange<int>(0, 16));
  for (uint32_t& s : chunk_sizes)
    s = in.ConsumeIntegralInRange<uint32_t>(0, 600);
  const bool perturb = in.ConsumeIntegralInRange<int>(0, 15) == 0;
  const uint64_t end_delta = in.ConsumeIntegralInRange<int>(0, 15) == 0;
  const size_t wrong_checksum = in.ConsumeIntegralInRange<size_t>(0, 63);
  const TensorPacking packing =
      in.ConsumeBool() ? TensorPacking::kPackSmall : TensorPacking::kOwnStorage;
  const std::string stream = in.ConsumeRemainingBytesAsString();
  SetChecksums(stream, wrong_checksum, &entries);

  absl::StatusOr<std::unique_ptr<ChunkReceiver>> receiver =
      ChunkReceiver::Create(entries, nullptr, 0, packing);
  if (!receiver.ok()) return;
  uint64_t offset = 0;
  size_t next = 0;
  bool perturbed = false;  // A chunk claimed the wrong offset.
  while (offset < stream.size()) {
    size_t take = next < chunk_sizes.size() ? chunk_sizes[next++] : 4096;
    take = std::min<size_t>(take, stream.size() - offset);
    uint64_t claimed = offset;
    if (perturb && next == 2) {
      claimed = offset + 1;
      perturbed = true;
    }
    if (!(*receiver)->Accept(claimed, stream.substr(offset, take)).ok()) return;
    offset += take;
  }
  absl::StatusOr<std::vector<Tensor>> tensors =
      (*receiver)->Finish(offset + end_delta);
  if (!tensors.ok()) return;
  if (perturbed || end_delta != 0 || tensors->size() != entries.size() ||
      wrong_checksum < entries.size())
    __builtin_trap();
  std::string received;
  for (const Tensor& t : *tensors) {
    if (reinterpret_cast<uintptr_t>(t.data()) % kStorageAlignment != 0)
      __builtin_trap();
    received.append(reinterpret_cast<const char*>(t.data()), t.num_bytes());
  }
  if (received != stream) __builtin_trap();
}

}  // namespace
}  // namespace modelstate

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  modelstate::FuzzOne(data, size);
  return 0;
}

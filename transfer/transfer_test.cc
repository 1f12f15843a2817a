#include "transfer/transfer.h"

#include <algorithm>
#include <map>
#include <set>
#include <string>

#include "common/limits.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "model/test_util.h"

namespace modelstate {
namespace {

using ::testing::HasSubstr;

std::vector<Tensor> SampleTensors() {
  std::vector<Tensor> tensors;
  tensors.push_back(FloatTensor({3}, {1, 2, 3}));
  tensors.push_back(Tensor::Zeros(DType::kFloat32, {0}).value());
  tensors.push_back(FullTensor(DType::kBFloat16, {100}, 2.5f));
  tensors.push_back(Tensor::Zeros(DType::kInt64, {}).value());
  tensors.push_back(FullTensor(DType::kFloat32, {1000}, -1.0f));
  return tensors;
}

std::vector<TransferEntry> EntriesOf(const std::vector<Tensor>& tensors) {
  std::vector<TransferEntry> entries;
  for (size_t i = 0; i < tensors.size(); ++i) {
    entries.push_back({"t" + std::to_string(i), tensors[i].dtype(),
                       tensors[i].shape(), tensors[i].Checksum()});
  }
  return entries;
}

std::string Join(const ChunkSender::Chunk& chunk) {
  std::string out;
  for (auto piece : chunk.pieces)
    out.append(reinterpret_cast<const char*>(piece.data()), piece.size());
  return out;
}

TEST(TransferTest, RoundTripsAtEveryChunkSize) {
  const std::vector<Tensor> tensors = SampleTensors();
  for (uint64_t chunk_bytes : {1, 7, 64, 4096, 1 << 20}) {
    ChunkSender sender(tensors, chunk_bytes);
    auto receiver = ChunkReceiver::Create(EntriesOf(tensors)).value();
    ChunkSender::Chunk chunk;
    int chunks = 0;
    while (sender.Next(&chunk)) {
      ASSERT_LE(chunk.size, chunk_bytes);
      ASSERT_TRUE(receiver->Accept(chunk.offset, Join(chunk)).ok());
      ++chunks;
    }
    EXPECT_EQ(chunks, (sender.total_bytes() + chunk_bytes - 1) / chunk_bytes);
    std::vector<Tensor> received =
        receiver->Finish(sender.total_bytes()).value();
    ASSERT_EQ(received.size(), tensors.size());
    for (size_t i = 0; i < tensors.size(); ++i)
      EXPECT_TRUE(received[i].BitwiseEquals(tensors[i]));
  }
}

// Writes every piece where a flat buffer per tensor says, and records the
// order of the calls.
class RecordingSink : public TensorSink {
 public:
  explicit RecordingSink(const std::vector<Tensor>& tensors) {
    for (const Tensor& tensor : tensors)
      bytes_.emplace_back(tensor.num_bytes(), '\0');
  }
  absl::Status Write(size_t index, uint64_t offset,
                     absl::string_view piece) override {
    bytes_[index].replace(offset, piece.size(), piece.data(), piece.size());
    return absl::OkStatus();
  }
  absl::Status Complete(size_t index) override {
    completed_.push_back(index);
    return absl::OkStatus();
  }
  const std::string& bytes(size_t index) const { return bytes_[index]; }
  const std::vector<size_t>& completed() const { return completed_; }

 private:
  std::vector<std::string> bytes_;
  std::vector<size_t> completed_;
};

TEST(TransferTest, ASinkGetsEveryByteAndEveryTensorCompletesInOrder) {
  const std::vector<Tensor> tensors = SampleTensors();
  for (uint64_t chunk_bytes : {1, 7, 64, 1 << 20}) {
    RecordingSink sink(tensors);
    ChunkSender sender(tensors, chunk_bytes);
    auto receiver =
        ChunkReceiver::CreateIntoSink(EntriesOf(tensors), &sink).value();
    ChunkSender::Chunk chunk;
    while (sender.Next(&chunk))
      ASSERT_TRUE(receiver->Accept(chunk.offset, Join(chunk)).ok());
    EXPECT_TRUE(receiver->Finish(sender.total_bytes()).value().empty());
    EXPECT_THAT(sink.completed(), ::testing::ElementsAre(0, 1, 2, 3, 4));
    for (size_t i = 0; i < tensors.size(); ++i) {
      EXPECT_EQ(sink.bytes(i),
                std::string(reinterpret_cast<const char*>(tensors[i].data()),
                            tensors[i].num_bytes()));
    }
  }
}

TEST(TransferTest, ASinkTensorFailingItsChecksumIsDataLoss) {
  const std::vector<Tensor> tensors = SampleTensors();
  std::vector<TransferEntry> entries = EntriesOf(tensors);
  entries[2].checksum ^= 1;
  RecordingSink sink(tensors);
  ChunkSender sender(tensors, 64);
  auto receiver = ChunkReceiver::CreateIntoSink(entries, &sink).value();
  ChunkSender::Chunk chunk;
  absl::Status status;
  while (status.ok() && sender.Next(&chunk))
    status = receiver->Accept(chunk.offset, Join(chunk));
  EXPECT_EQ(status.code(), absl::StatusCode::kDataLoss) << status;
  EXPECT_THAT(std::string(status.message()), HasSubstr("\"t2\""));
  EXPECT_TRUE(receiver->callback_error().ok());
}

// A resumed fetch: a sender started at any byte sends exactly the rest, at the
// same offsets, and a receiver that got the first part completes from it.
TEST(TransferTest, SenderStartsAtAnOffsetAndResumesAReceiver) {
  const std::vector<Tensor> tensors = SampleTensors();
  ChunkSender whole(tensors, 5);
  const uint64_t total = whole.total_bytes();
  for (uint64_t start : {uint64_t{0}, uint64_t{1}, uint64_t{12}, uint64_t{13},
                         uint64_t{211}, total - 1, total}) {
    auto receiver = ChunkReceiver::Create(EntriesOf(tensors)).value();
    ChunkSender first(tensors, 5);
    ChunkSender::Chunk chunk;
    while (receiver->received_bytes() < start && first.Next(&chunk)) {
      const std::string bytes = Join(chunk).substr(
          0, std::min<uint64_t>(chunk.size, start - chunk.offset));
      ASSERT_TRUE(receiver->Accept(chunk.offset, bytes).ok());
    }
    ASSERT_EQ(receiver->received_bytes(), start);
    ChunkSender rest(tensors, 5, start);
    EXPECT_EQ(rest.total_bytes(), total);
    while (rest.Next(&chunk)) {
      ASSERT_TRUE(receiver->Accept(chunk.offset, Join(chunk)).ok())
          << "start " << start << " chunk at " << chunk.offset;
    }
    std::vector<Tensor> received = receiver->Finish(total).value();
    ASSERT_EQ(received.size(), tensors.size());
    for (size_t i = 0; i < tensors.size(); ++i)
      EXPECT_TRUE(received[i].BitwiseEquals(tensors[i])) << "start " << start;
  }
  ChunkSender past(tensors, 5, total + 10);
  ChunkSender::Chunk chunk;
  EXPECT_FALSE(past.Next(&chunk));
}

TEST(TransferTest, SenderPiecesAliasTensorStorage) {
  const std::vector<Tensor> tensors = SampleTensors();
  ChunkSender sender(tensors, 1 << 20);
  ChunkSender::Chunk chunk;
  ASSERT_TRUE(sender.Next(&chunk));
  EXPECT_EQ(chunk.pieces.front().data(), tensors[0].data());
  EXPECT_EQ(chunk.pieces.size(), 4u);  // the empty tensor contributes no piece
}

TEST(TransferTest, SharedEntriesTravelOnceAndAreCheckedAgainstTheirSource) {
  const Tensor tied = FullTensor(DType::kFloat32, {4}, 3);
  const Tensor other = FullTensor(DType::kFloat32, {4}, 1);
  std::vector<TransferEntry> entries = EntriesOf({tied, other, tied});
  entries[2].shared_with = 0;
  ASSERT_TRUE(CheckSharedEntries(entries).ok());
  EXPECT_TRUE(HasSharedEntries(entries));
  const std::vector<TransferEntry> sent = SentEntries(entries);
  ASSERT_EQ(sent.size(), 2u);
  EXPECT_EQ(sent[1].key, "t1");
  EXPECT_EQ(TransferSizes(entries).status().code(),
            absl::StatusCode::kInvalidArgument);

  const std::vector<Tensor> all =
      WithSharedTensors(entries, {tied, other}).value();
  ASSERT_EQ(all.size(), 3u);
  EXPECT_TRUE(all[2].SharesBytesWith(all[0]));
  entries[2].checksum = other.Checksum();
  EXPECT_EQ(WithSharedTensors(entries, {tied, other}).status().code(),
            absl::StatusCode::kInvalidArgument);

  // Only an earlier, unshared entry of the same dtype and shape may be named.
  std::vector<TransferEntry> later = EntriesOf({tied, tied});
  later[0].shared_with = 1;
  EXPECT_FALSE(CheckSharedEntries(later).ok());
  std::vector<TransferEntry> chained = EntriesOf({tied, tied, tied});
  chained[1].shared_with = 0;
  chained[2].shared_with = 1;
  EXPECT_FALSE(CheckSharedEntries(chained).ok());
  std::vector<TransferEntry> reshaped =
      EntriesOf({tied, FullTensor(DType::kFloat32, {2, 2}, 3)});
  reshaped[1].shared_with = 0;
  EXPECT_FALSE(CheckSharedEntries(reshaped).ok());
}

TEST(TransferTest, BadStreamsAreRefused) {
  const std::vector<Tensor> tensors = SampleTensors();
  const std::string first(reinterpret_cast<const char*>(tensors[0].data()), 12);
  {
    auto receiver = ChunkReceiver::Create(EntriesOf(tensors)).value();
    EXPECT_THAT(std::string(receiver->Accept(4, "abcd").message()),
                HasSubstr("missing bytes"));
    EXPECT_FALSE(receiver->Accept(0, first).ok());  // dead after an error
  }
  {
    auto receiver = ChunkReceiver::Create(EntriesOf(tensors)).value();
    ASSERT_TRUE(receiver->Accept(0, first).ok());
    EXPECT_THAT(std::string(receiver->Accept(8, "abcd").message()),
                HasSubstr("overlap"));
  }
  {
    auto receiver = ChunkReceiver::Create(EntriesOf(tensors)).value();
    EXPECT_THAT(
        std::string(receiver->Accept(0, std::string(5000, 'x')).message()),
        HasSubstr("runs past the end"));
  }
  {
    auto receiver = ChunkReceiver::Create(EntriesOf(tensors)).value();
    std::string corrupt = first;
    corrupt[0] ^= 1;
    absl::Status status = receiver->Accept(0, corrupt);
    EXPECT_EQ(status.code(), absl::StatusCode::kDataLoss);
    EXPECT_THAT(std::string(status.message()), HasSubstr("tensor \"t0\""));
  }
  {
    auto receiver = ChunkReceiver::Create(EntriesOf(tensors)).value();
    ASSERT_TRUE(receiver->Accept(0, first).ok());
    EXPECT_THAT(std::string(receiver->Finish(12).status().message()),
                HasSubstr("stream ended"));
  }
  std::vector<TransferEntry> bad = {{"x", DType::kFloat32, {-1}, 0}};
  EXPECT_EQ(ChunkReceiver::Create(bad).status().code(),
            absl::StatusCode::kInvalidArgument);
  std::vector<TransferEntry> huge = {
      {"a", DType::kFloat64, {INT64_MAX / 9}, 0},
      {"b", DType::kFloat64, {INT64_MAX / 9}, 0}};
  EXPECT_EQ(ChunkReceiver::Create(huge).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(TransferTest, CallbackReceivesEachTensorOnceVerified) {
  const std::vector<Tensor> tensors = SampleTensors();
  std::vector<size_t> seen;
  auto receiver =
      ChunkReceiver::Create(EntriesOf(tensors), [&](size_t index,
                                                    const TransferEntry& entry,
                                                    Tensor tensor) {
        EXPECT_TRUE(tensor.BitwiseEquals(tensors[index]));
        EXPECT_EQ(entry.key, EntriesOf(tensors)[index].key);
        seen.push_back(index);
        return absl::OkStatus();
      }).value();
  ChunkSender sender(tensors, 100);
  ChunkSender::Chunk chunk;
  while (sender.Next(&chunk))
    ASSERT_TRUE(receiver->Accept(chunk.offset, Join(chunk)).ok());
  EXPECT_TRUE(receiver->Finish(sender.total_bytes()).value().empty());
  EXPECT_EQ(seen, (std::vector<size_t>{0, 1, 2, 3, 4}));
}

// Sends every tensor of `tensors` into `receiver` in chunks of 100 bytes.
void SendAll(const std::vector<Tensor>& tensors, ChunkReceiver& receiver) {
  ChunkSender sender(tensors, 100);
  ChunkSender::Chunk chunk;
  while (sender.Next(&chunk)) {
    ASSERT_TRUE(receiver.BeginChunk(chunk.offset, chunk.size).ok());
    ASSERT_TRUE(receiver.Accept(chunk.offset, Join(chunk)).ok());
  }
}

std::vector<uint64_t> ChecksumsOf(const std::vector<Tensor>& tensors) {
  std::vector<uint64_t> checksums;
  for (const Tensor& tensor : tensors) checksums.push_back(tensor.Checksum());
  return checksums;
}

TEST(TransferTest, ChecksumsAtTheEndAreVerifiedByFinish) {
  const std::vector<Tensor> tensors = SampleTensors();
  const uint64_t total = 12 + 200 + 8 + 4000;
  std::vector<TransferEntry> zeros = EntriesOf(tensors);
  for (TransferEntry& entry : zeros) entry.checksum = 0;
  const std::vector<uint64_t> right = ChecksumsOf(tensors);
  {  // Header says 0, End carries the checksums: verified at the end.
    auto receiver = ChunkReceiver::CreateVerifyingAtEnd(zeros).value();
    SendAll(tensors, *receiver);
    std::vector<Tensor> received = receiver->Finish(total, right).value();
    ASSERT_EQ(received.size(), tensors.size());
    for (size_t i = 0; i < tensors.size(); ++i)
      EXPECT_TRUE(received[i].BitwiseEquals(tensors[i]));
  }
  {  // One checksum in End is wrong.
    auto receiver = ChunkReceiver::CreateVerifyingAtEnd(zeros).value();
    SendAll(tensors, *receiver);
    std::vector<uint64_t> wrong = right;
    wrong[2] ^= 1;
    absl::Status status = receiver->Finish(total, wrong).status();
    EXPECT_EQ(status.code(), absl::StatusCode::kDataLoss);
    EXPECT_THAT(std::string(status.message()),
                HasSubstr("checksum mismatch for tensor \"t2\""));
  }
  {  // End carries too few checksums.
    auto receiver = ChunkReceiver::CreateVerifyingAtEnd(zeros).value();
    SendAll(tensors, *receiver);
    absl::Status status =
        receiver->Finish(total, absl::MakeConstSpan(right).subspan(1)).status();
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(status.message()), HasSubstr("4 checksums for 5"));
  }
  {  // Header says 0 and End says nothing: the header's 0 is checked.
    auto receiver = ChunkReceiver::CreateVerifyingAtEnd(zeros).value();
    SendAll(tensors, *receiver);
    EXPECT_EQ(receiver->Finish(total).status().code(),
              absl::StatusCode::kDataLoss);
  }
  {  // Header checksums (an old client) and End disagree.
    auto receiver =
        ChunkReceiver::CreateVerifyingAtEnd(EntriesOf(tensors)).value();
    SendAll(tensors, *receiver);
    std::vector<uint64_t> wrong = right;
    wrong[4] ^= 1;
    absl::Status status = receiver->Finish(total, wrong).status();
    EXPECT_EQ(status.code(), absl::StatusCode::kDataLoss);
    EXPECT_THAT(std::string(status.message()), HasSubstr("header says"));
  }
  {  // Header checksums alone still work, and are still verified as each
     // tensor completes.
    auto receiver =
        ChunkReceiver::CreateVerifyingAtEnd(EntriesOf(tensors)).value();
    SendAll(tensors, *receiver);
    EXPECT_TRUE(receiver->Finish(total).ok());
    auto corrupt =
        ChunkReceiver::CreateVerifyingAtEnd(EntriesOf(tensors)).value();
    std::string first(reinterpret_cast<const char*>(tensors[0].data()), 12);
    first[3] ^= 1;
    EXPECT_EQ(corrupt->Accept(0, first).code(), absl::StatusCode::kDataLoss);
  }
  // Without CreateVerifyingAtEnd a 0 in the manifest is checked at once.
  auto plain = ChunkReceiver::Create(zeros).value();
  EXPECT_EQ(
      plain
          ->Accept(0, std::string(
                          reinterpret_cast<const char*>(tensors[0].data()), 12))
          .code(),
      absl::StatusCode::kDataLoss);
}

TEST(TransferTest, BeginChunkBoundsAWholeChunkBeforeItsPieces) {
  const std::vector<Tensor> tensors = SampleTensors();
  auto receiver = ChunkReceiver::Create(EntriesOf(tensors)).value();
  EXPECT_THAT(
      std::string(receiver->BeginChunk(0, kMaxChunkBytes + 1).message()),
      HasSubstr("larger than the maximum"));
  EXPECT_FALSE(receiver->BeginChunk(0, 12).ok());  // dead after an error
  auto late = ChunkReceiver::Create(EntriesOf(tensors)).value();
  EXPECT_THAT(std::string(late->BeginChunk(4, 8).message()),
              HasSubstr("missing bytes"));
  auto past = ChunkReceiver::Create(EntriesOf(tensors)).value();
  EXPECT_THAT(std::string(past->BeginChunk(0, 5000).message()),
              HasSubstr("runs past the end"));
  auto good = ChunkReceiver::Create(EntriesOf(tensors)).value();
  EXPECT_TRUE(good->BeginChunk(0, 12).ok());
}

TEST(TransferTest, ChunksBelowTheMinimumAreRefusedUnlessTheyEndTheStream) {
  const std::vector<Tensor> tensors = SampleTensors();
  ChunkSender sender(tensors, 1000);
  std::string data;
  ChunkSender::Chunk chunk;
  while (sender.Next(&chunk)) data += Join(chunk);
  ASSERT_EQ(data.size(), 4220u);
  // Full chunks of the minimum and a short last one: accepted.
  auto good = ChunkReceiver::Create(EntriesOf(tensors), nullptr, 1000).value();
  for (uint64_t offset = 0; offset < data.size(); offset += 1000) {
    ASSERT_TRUE(good->Accept(offset, data.substr(offset, 1000)).ok());
  }
  ASSERT_TRUE(good->Finish(data.size()).ok());
  // A small chunk anywhere but at the end, or an empty one anywhere: refused.
  for (const auto& [first, second] :
       std::vector<std::pair<size_t, size_t>>{{999, 0}, {0, 0}, {4220, 0}}) {
    SCOPED_TRACE(first);
    auto bad = ChunkReceiver::Create(EntriesOf(tensors), nullptr, 1000).value();
    absl::Status status = bad->Accept(0, data.substr(0, first));
    if (status.ok()) status = bad->Accept(first, data.substr(first, second));
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(status.message()),
                HasSubstr("smaller than the minimum of 1000"));
  }
  // Without a minimum (the default) one-byte chunks are fine.
  auto any = ChunkReceiver::Create(EntriesOf(tensors)).value();
  for (size_t i = 0; i < data.size(); ++i)
    ASSERT_TRUE(any->Accept(i, data.substr(i, 1)).ok());
  // A chunk announced with BeginChunk is checked whole; its pieces are not
  // chunks of their own.
  auto pieces =
      ChunkReceiver::Create(EntriesOf(tensors), nullptr, 1000).value();
  ASSERT_TRUE(pieces->BeginChunk(0, 1000).ok());
  for (uint64_t offset = 0; offset < 1000; offset += 10)
    ASSERT_TRUE(pieces->Accept(offset, data.substr(offset, 10)).ok());
  EXPECT_THAT(std::string(pieces->BeginChunk(1000, 10).message()),
              HasSubstr("smaller than the minimum of 1000"));
}

// A model of small tensors around a large one: 300 of 10 KB (more than one
// block's worth), empty ones among them, one of 64 KiB (not packed), and a
// last run shorter than a block.
std::vector<Tensor> ManySmallTensors() {
  std::vector<Tensor> tensors;
  for (int i = 0; i < 300; ++i) {
    tensors.push_back(FullTensor(DType::kFloat32, {2500 + i % 7}, 0.5f * i));
    if (i % 50 == 0)
      tensors.push_back(Tensor::Zeros(DType::kFloat32, {0}).value());
  }
  tensors.push_back(FullTensor(DType::kFloat32, {16384}, 3.0f));
  for (int i = 0; i < 20; ++i)
    tensors.push_back(FullTensor(DType::kBFloat16, {1 + i}, -1.0f * i));
  return tensors;
}

std::vector<Tensor> ReceiveAll(const std::vector<Tensor>& tensors,
                               TensorPacking packing) {
  ChunkSender sender(tensors, 100000);
  auto receiver =
      ChunkReceiver::Create(EntriesOf(tensors), nullptr, 0, packing).value();
  ChunkSender::Chunk chunk;
  while (sender.Next(&chunk))
    EXPECT_TRUE(receiver->Accept(chunk.offset, Join(chunk)).ok());
  std::vector<Tensor> received = receiver->Finish(sender.total_bytes()).value();
  // The receiver, still alive, holds no block once its tensors are done.
  std::map<const Storage*, long> tensors_per_storage;
  for (const Tensor& tensor : received)
    ++tensors_per_storage[tensor.storage().get()];
  for (const Tensor& tensor : received) {
    if (tensor.num_bytes() > 0) {
      EXPECT_EQ(tensor.storage().use_count(),
                tensors_per_storage[tensor.storage().get()]);
    }
  }
  return received;
}

TEST(TransferTest, PackedSmallTensorsShareAlignedBlocksAndKeepTheirBytes) {
  const std::vector<Tensor> sent = ManySmallTensors();
  const std::vector<Tensor> received =
      ReceiveAll(sent, TensorPacking::kPackSmall);
  ASSERT_EQ(received.size(), sent.size());
  std::map<const Storage*, int> tensors_per_block;
  for (size_t i = 0; i < sent.size(); ++i) {
    EXPECT_TRUE(received[i].BitwiseEquals(sent[i])) << i;
    EXPECT_EQ(
        reinterpret_cast<uintptr_t>(received[i].data()) % kStorageAlignment,
        0u);
    EXPECT_EQ(received[i].Checksum(), sent[i].Checksum());
    if (received[i].num_bytes() == 0) {
      EXPECT_EQ(received[i].storage()->size(), 0u);
      continue;
    }
    const bool packed = received[i].num_bytes() < kPackedTensorMaxBytes;
    if (packed) {
      ++tensors_per_block[received[i].storage().get()];
    } else {
      EXPECT_EQ(received[i].storage()->size(), 65536u);
    }
  }
  // 300 tensors of ~10 KB fill one block (208 of them) and part of a second;
  // the 20 after the large tensor make a third.
  ASSERT_EQ(tensors_per_block.size(), 3u);
  for (size_t i = 0; i < sent.size(); ++i) {
    if (received[i].num_bytes() == 0 ||
        received[i].num_bytes() >= kPackedTensorMaxBytes)
      continue;
    const Storage& block = *received[i].storage();
    // Cut short by the next tensor: a whole block; a run's last: exact.
    if (i < 200) {
      EXPECT_EQ(block.size(), kPackBlockBytes) << i;
    }
    if (i + 1 == sent.size()) {
      EXPECT_LT(block.size(), 4096u);
    }
  }
}

TEST(TransferTest, OwnStorageGivesEveryTensorItsOwn) {
  const std::vector<Tensor> sent = ManySmallTensors();
  const std::vector<Tensor> received =
      ReceiveAll(sent, TensorPacking::kOwnStorage);
  std::set<const Storage*> storages;
  for (size_t i = 0; i < sent.size(); ++i) {
    EXPECT_TRUE(received[i].BitwiseEquals(sent[i])) << i;
    EXPECT_EQ(received[i].storage()->size(), received[i].num_bytes());
    storages.insert(received[i].storage().get());
  }
  EXPECT_EQ(storages.size(), sent.size());
}

TEST(TransferTest, PackedTensorsHandedOverEarlyKeepTheirBytes) {
  // Each tensor leaves through the callback while later ones are still
  // written into its block: its bytes must not change.
  const std::vector<Tensor> sent = ManySmallTensors();
  std::vector<Tensor> handed;
  std::vector<std::string> bytes_when_handed;
  auto receiver = ChunkReceiver::Create(
                      EntriesOf(sent),
                      [&](size_t, const TransferEntry&, Tensor tensor) {
                        bytes_when_handed.emplace_back(
                            reinterpret_cast<const char*>(tensor.data()),
                            tensor.num_bytes());
                        handed.push_back(std::move(tensor));
                        return absl::OkStatus();
                      },
                      0, TensorPacking::kPackSmall)
                      .value();
  ChunkSender sender(sent, 3000);
  ChunkSender::Chunk chunk;
  while (sender.Next(&chunk))
    ASSERT_TRUE(receiver->Accept(chunk.offset, Join(chunk)).ok());
  ASSERT_TRUE(receiver->Finish(sender.total_bytes()).ok());
  ASSERT_EQ(handed.size(), sent.size());
  for (size_t i = 0; i < sent.size(); ++i) {
    EXPECT_EQ(std::string(reinterpret_cast<const char*>(handed[i].data()),
                          handed[i].num_bytes()),
              bytes_when_handed[i]);
    EXPECT_TRUE(handed[i].BitwiseEquals(sent[i])) << i;
  }
}

TEST(TransferTest, APackedTransferThatFailsReleasesItsBlock) {
  const std::vector<Tensor> sent = ManySmallTensors();
  std::vector<TransferEntry> entries = EntriesOf(sent);
  entries[5].checksum ^= 1;
  std::vector<Tensor> handed;
  auto receiver = ChunkReceiver::Create(
                      entries,
                      [&](size_t, const TransferEntry&, Tensor tensor) {
                        handed.push_back(std::move(tensor));
                        return absl::OkStatus();
                      },
                      0, TensorPacking::kPackSmall)
                      .value();
  ChunkSender sender(sent, 100000);
  ChunkSender::Chunk chunk;
  ASSERT_TRUE(sender.Next(&chunk));
  EXPECT_EQ(receiver->Accept(chunk.offset, Join(chunk)).code(),
            absl::StatusCode::kDataLoss);
  ASSERT_EQ(handed.size(), 5u);  // Four tensors and an empty one.
  // Only the tensors handed over hold the block now.
  EXPECT_EQ(handed[0].storage().use_count(), 4);
}

TEST(TransferTest, TensorsBackToBackInOneStorageShareAPiece) {
  std::shared_ptr<Storage> bytes = Storage::Allocate(4096).value();
  for (int i = 0; i < 4096; ++i) bytes->mutable_data()[i] = i % 251;
  auto view = [&](size_t offset, int64_t floats) {
    return Tensor::View(DType::kFloat32, {floats}, bytes, offset).value();
  };
  // Two views back to back, then a gap, then one of its own storage.
  const std::vector<Tensor> tensors = {view(0, 100), view(400, 50),
                                       view(1024, 10),
                                       FullTensor(DType::kFloat32, {8}, 1.0f)};
  ChunkSender sender(tensors, 1 << 20);
  ChunkSender::Chunk chunk;
  ASSERT_TRUE(sender.Next(&chunk));
  ASSERT_EQ(chunk.pieces.size(), 3u);
  EXPECT_EQ(chunk.pieces[0].data(), bytes->data());
  EXPECT_EQ(chunk.pieces[0].size(), 600u);
  EXPECT_EQ(chunk.pieces[1].data(), bytes->data() + 1024);
  EXPECT_EQ(chunk.pieces[2].data(), tensors[3].data());
  EXPECT_EQ(chunk.owners.size(), chunk.pieces.size());
  EXPECT_EQ(chunk.owners[0], tensors[0].storage());
  EXPECT_EQ(chunk.owners[2], tensors[3].storage());
  // The bytes are still every tensor's, in order.
  auto receiver = ChunkReceiver::Create(EntriesOf(tensors)).value();
  ASSERT_TRUE(receiver->Accept(chunk.offset, Join(chunk)).ok());
  std::vector<Tensor> received = receiver->Finish(chunk.size).value();
  for (size_t i = 0; i < tensors.size(); ++i)
    EXPECT_TRUE(received[i].BitwiseEquals(tensors[i])) << i;
  // Across chunks: a chunk boundary inside the run splits it there only.
  ChunkSender small(tensors, 500);
  ASSERT_TRUE(small.Next(&chunk));
  ASSERT_EQ(chunk.pieces.size(), 1u);
  EXPECT_EQ(chunk.pieces[0].size(), 500u);
  ASSERT_TRUE(small.Next(&chunk));
  ASSERT_EQ(chunk.pieces.size(), 3u);
  EXPECT_EQ(chunk.pieces[0].data(), bytes->data() + 500);
  EXPECT_EQ(chunk.pieces[0].size(), 100u);
}

}  // namespace
}  // namespace modelstate

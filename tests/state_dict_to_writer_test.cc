// Client::StateDictToWriter, the fetch into the caller's storage: the pieces
// handed to the writer reassemble bit for bit into the same bytes StateDict
// returns, in stream order and as the manifest given to on_manifest describes
// them; an error of the writer or of on_manifest ends the fetch with exactly
// that error, and the client serves on. Against an in-process server.
#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "client/client.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/test_support.h"

namespace modelstate {
namespace {

using ::testing::ElementsAre;
using ::testing::IsEmpty;
using testing_support::ConnectTo;
using testing_support::StartServer;

// Small enough that the larger tensors below span several chunks; the
// server's default minimum chunk, so the server does not raise it.
constexpr uint32_t kChunkBytes = 64u << 10;

// A tensor of `dtype` and `shape` holding reproducible pseudo-random bytes.
Tensor RandomTensor(DType dtype, const Shape& shape, uint32_t seed) {
  std::mt19937 random(seed);
  std::vector<uint8_t> bytes(NumBytes(dtype, shape).value());
  for (uint8_t& byte : bytes) byte = static_cast<uint8_t>(random());
  return Tensor::FromBytes(dtype, shape, bytes).value();
}

// Tensors of several dtypes: three span many chunks, two have no bytes (one
// between others, one last), and one is a few bytes.
StateDict MixedState() {
  StateDict state;
  state.Set("encoder.weight", RandomTensor(DType::kFloat32, {300, 257}, 1));
  state.Set("encoder.empty", RandomTensor(DType::kFloat32, {0}, 2));
  state.Set("encoder.steps", RandomTensor(DType::kInt64, {3, 5}, 3));
  state.Set("decoder.weight", RandomTensor(DType::kFloat16, {999, 70}, 4));
  state.Set("decoder.bias", RandomTensor(DType::kFloat64, {20001}, 5));
  state.Set("decoder.mask", RandomTensor(DType::kInt8, {7}, 6));
  state.Set("decoder.none", RandomTensor(DType::kBFloat16, {0, 4}, 7));
  return state;
}

// Starts a server holding MixedState() as model "mixed" at version 1.
std::unique_ptr<Server> ServerWithMixedModel(const StateDict& state) {
  auto server = StartServer();
  LoadRequest create("mixed");
  create.create_if_missing = true;
  absl::StatusOr<LoadOutcome> created =
      ConnectTo(*server)->LoadStateDict(create, state);
  EXPECT_TRUE(created.ok()) << created.status();
  if (created.ok()) {
    EXPECT_EQ(created->version, 1);
  }
  return server;
}

// Transfers in kChunkBytes chunks.
TransferOptions Chunked() {
  TransferOptions transfer;
  transfer.chunk_bytes = kChunkBytes;
  return transfer;
}

absl::string_view BytesOf(const Tensor& tensor) {
  return absl::string_view(reinterpret_cast<const char*>(tensor.data()),
                           tensor.num_bytes());
}

// Reassembles a StateDictToWriter stream into one buffer per tensor and
// records every break of the writer's contract as it happens.
class Collector {
 public:
  // Options whose on_manifest keeps the manifest.
  TransferOptions Transfer() {
    TransferOptions transfer = Chunked();
    transfer.on_manifest = [this](const std::vector<TensorDescription>& m) {
      if (manifests_++ > 0) problems_.push_back("second manifest");
      manifest_ = m;
      bytes_.assign(m.size(), "");
      pieces_.assign(m.size(), 0);
      return absl::OkStatus();
    };
    return transfer;
  }

  Client::PieceWriter Writer() {
    return [this](size_t index, uint64_t offset, absl::string_view piece) {
      Record(index, offset, piece);
      return absl::OkStatus();
    };
  }

  // Appends `piece` to tensor `index`, noting whatever is out of order.
  void Record(size_t index, uint64_t offset, absl::string_view piece) {
    if (manifests_ == 0) problems_.push_back("piece before the manifest");
    if (index >= bytes_.size()) {
      problems_.push_back(absl::StrCat("index ", index, " out of range"));
      return;
    }
    if (index < last_index_)
      problems_.push_back(
          absl::StrCat("index ", index, " after ", last_index_));
    if (offset != bytes_[index].size())
      problems_.push_back(absl::StrCat("tensor ", index, ": offset ", offset,
                                       " after ", bytes_[index].size()));
    if (piece.empty()) problems_.push_back("empty piece");
    last_index_ = index;
    bytes_[index].append(piece.data(), piece.size());
    ++pieces_[index];
  }

  const std::vector<TensorDescription>& manifest() const { return manifest_; }
  const std::vector<std::string>& bytes() const { return bytes_; }
  const std::vector<int>& pieces() const { return pieces_; }
  const std::vector<std::string>& problems() const { return problems_; }

 private:
  int manifests_ = 0;
  std::vector<TensorDescription> manifest_;
  std::vector<std::string> bytes_;
  std::vector<int> pieces_;
  size_t last_index_ = 0;
  std::vector<std::string> problems_;
};

// Expects `collected` to hold exactly `expected` (what StateDict fetched with
// the same request), as its manifest describes it.
void ExpectSameAs(const Collector& collected,
                  const FetchedStateDict& expected) {
  EXPECT_THAT(collected.problems(), IsEmpty());
  ASSERT_EQ(collected.manifest().size(), expected.state.size());
  ASSERT_EQ(collected.bytes().size(), expected.state.size());
  for (size_t i = 0; i < expected.state.size(); ++i) {
    const StateDict::Entry& entry = expected.state.entries()[i];
    const TensorDescription& described = collected.manifest()[i];
    SCOPED_TRACE(entry.key);
    EXPECT_EQ(described.name, entry.key);
    EXPECT_EQ(described.dtype, entry.tensor.dtype());
    EXPECT_EQ(described.shape, entry.tensor.shape());
    EXPECT_EQ(described.num_bytes, entry.tensor.num_bytes());
    EXPECT_EQ(collected.bytes()[i].size(), described.num_bytes);
    EXPECT_TRUE(collected.bytes()[i] == BytesOf(entry.tensor));
  }
}

// Fetches "mixed" through StateDictToWriter into `collector` and expects it
// to match StateDict of the same model, both at version 1.
void ExpectWriterMatchesStateDict(Client& client, Collector& collector) {
  absl::StatusOr<FetchedStateDict> fetched = client.StateDict({"mixed"});
  ASSERT_TRUE(fetched.ok()) << fetched.status();
  absl::StatusOr<int64_t> version = client.StateDictToWriter(
      {"mixed"}, collector.Transfer(), collector.Writer());
  ASSERT_TRUE(version.ok()) << version.status();
  EXPECT_EQ(*version, 1);
  EXPECT_EQ(fetched->version, 1);
  ExpectSameAs(collector, *fetched);
}

TEST(StateDictToWriterTest, PiecesReassembleBitExactlyInStreamOrder) {
  const StateDict state = MixedState();
  auto server = ServerWithMixedModel(state);
  auto client = ConnectTo(*server);
  Collector collector;
  ExpectWriterMatchesStateDict(*client, collector);
  // Against what was loaded too, by key.
  for (size_t i = 0; i < collector.manifest().size(); ++i) {
    const TensorDescription& described = collector.manifest()[i];
    SCOPED_TRACE(described.name);
    const Tensor* loaded = state.Find(described.name);
    ASSERT_NE(loaded, nullptr);
    EXPECT_TRUE(collector.bytes()[i] == BytesOf(*loaded));
    // Tensors without bytes get no piece; those beyond a chunk get several.
    if (described.num_bytes == 0) {
      EXPECT_EQ(collector.pieces()[i], 0);
    }
    if (described.num_bytes > kChunkBytes) {
      EXPECT_GT(collector.pieces()[i], 1);
    }
  }
}

TEST(StateDictToWriterTest, AWriterErrorEndsTheFetchWithThatError) {
  auto server = ServerWithMixedModel(MixedState());
  auto client = ConnectTo(*server);
  // Whatever its code: an InvalidArgument of the writer's is not a bad stream
  // (DataLoss), nor is its Unavailable a dropped connection to resume.
  for (const absl::Status& error : {absl::ResourceExhaustedError("disk full"),
                                    absl::InvalidArgumentError("bad path"),
                                    absl::UnavailableError("device busy")}) {
    SCOPED_TRACE(error.ToString());
    int pieces = 0;
    int pieces_after_error = 0;
    absl::StatusOr<int64_t> version = client->StateDictToWriter(
        {"mixed"}, Chunked(), [&](size_t, uint64_t, absl::string_view) {
          if (++pieces > 3) ++pieces_after_error;
          return pieces == 3 ? error : absl::OkStatus();
        });
    EXPECT_EQ(version.status(), error);
    EXPECT_EQ(pieces, 3);
    EXPECT_EQ(pieces_after_error, 0);
  }

  // The daemon and the client's connection serve on.
  Collector collector;
  ExpectWriterMatchesStateDict(*client, collector);
}

TEST(StateDictToWriterTest, AnOnManifestErrorEndsTheFetchBeforeAnyPiece) {
  auto server = ServerWithMixedModel(MixedState());
  auto client = ConnectTo(*server);
  TransferOptions transfer = Chunked();
  int manifests = 0;
  transfer.on_manifest = [&](const std::vector<TensorDescription>&) {
    ++manifests;
    return absl::FailedPreconditionError("no room for 7 tensors");
  };
  int pieces = 0;
  absl::StatusOr<int64_t> version = client->StateDictToWriter(
      {"mixed"}, transfer, [&](size_t, uint64_t, absl::string_view) {
        ++pieces;
        return absl::OkStatus();
      });
  EXPECT_EQ(version.status(),
            absl::FailedPreconditionError("no room for 7 tensors"));
  EXPECT_EQ(manifests, 1);
  EXPECT_EQ(pieces, 0);

  Collector collector;
  version = client->StateDictToWriter({"mixed"}, collector.Transfer(),
                                      collector.Writer());
  EXPECT_TRUE(version.ok()) << version.status();
  EXPECT_THAT(collector.problems(), IsEmpty());
}

// Requests that select or cast: the pieces match the manifest on_manifest got,
// and both match what StateDict fetches for the same request.
TEST(StateDictToWriterTest, SubsetsAndCastsDeliverWhatTheManifestSays) {
  auto server = ServerWithMixedModel(MixedState());
  auto client = ConnectTo(*server);
  FetchRequest subset("mixed");
  subset.keys = {"decoder.bias", "encoder.empty", "encoder.weight"};
  FetchRequest cast("mixed");
  cast.dtype = DType::kBFloat16;
  FetchRequest both = subset;
  both.dtype = DType::kFloat16;
  for (const FetchRequest& request : {subset, cast, both}) {
    SCOPED_TRACE(::testing::Message()
                 << request.keys.size() << " keys, cast "
                 << (request.dtype ? TorchName(*request.dtype) : "none"));
    absl::StatusOr<FetchedStateDict> fetched = client->StateDict(request);
    ASSERT_TRUE(fetched.ok()) << fetched.status();
    Collector collector;
    absl::StatusOr<int64_t> version = client->StateDictToWriter(
        request, collector.Transfer(), collector.Writer());
    ASSERT_TRUE(version.ok()) << version.status();
    ExpectSameAs(collector, *fetched);
    for (const TensorDescription& described : collector.manifest()) {
      if (request.dtype && described.name != "encoder.steps" &&
          described.name != "decoder.mask") {
        EXPECT_EQ(described.dtype, *request.dtype) << described.name;
      }
    }
  }
  Collector collector;
  ASSERT_TRUE(
      client->StateDictToWriter(both, collector.Transfer(), collector.Writer())
          .ok());
  std::vector<std::string> names;
  for (const TensorDescription& described : collector.manifest())
    names.push_back(described.name);
  EXPECT_THAT(names,
              ElementsAre("decoder.bias", "encoder.empty", "encoder.weight"));
  EXPECT_EQ(collector.manifest()[2].num_bytes, 300u * 257u * 2u);
}

}  // namespace
}  // namespace modelstate

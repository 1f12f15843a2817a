// Every bad and valid input of the reference spec (§4, §7.11, §7.12), plus
// round trips.
#include "model/safetensors.h"

#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <string>

#include "common/file_util.h"
#include "common/status_macros.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "model/test_util.h"

namespace modelstate {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::StartsWith;

std::string LengthPrefix(uint64_t n) {
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xFF);
  return out;
}

// A file with `header` as its JSON and `data_bytes` zero bytes of data.
std::string File(const std::string& header, size_t data_bytes) {
  return LengthPrefix(header.size()) + header + std::string(data_bytes, '\0');
}

absl::StatusOr<SafetensorsFile> Parse(const std::string& file) {
  auto storage = Storage::Allocate(file.size()).value();
  std::memcpy(storage->mutable_data(), file.data(), file.size());
  return ReadSafetensors(storage);
}

std::string ErrorOf(const std::string& file) {
  absl::StatusOr<SafetensorsFile> parsed = Parse(file);
  EXPECT_FALSE(parsed.ok());
  EXPECT_EQ(parsed.status().code(), absl::StatusCode::kInvalidArgument);
  return std::string(parsed.status().message());
}

constexpr char kF32x4[] =
    R"("t":{"dtype":"F32","shape":[4],"data_offsets":[0,16]})";

TEST(SafetensorsTest, RejectsEveryBadInputWithItsOwnError) {
  EXPECT_THAT(ErrorOf(std::string(7, '\0')), StartsWith("header too small"));
  EXPECT_THAT(ErrorOf(LengthPrefix(uint64_t{1} << 63) + "{}"),
              StartsWith("header too large"));
  EXPECT_THAT(ErrorOf(LengthPrefix(100'000'001) + "{}"),
              StartsWith("header too large"));
  EXPECT_THAT(ErrorOf(LengthPrefix(50) + "{}"),
              StartsWith("invalid header length"));
  EXPECT_THAT(ErrorOf(File("{\"\xff\":1}", 0)),
              StartsWith("invalid header: header is not valid UTF-8"));
  EXPECT_THAT(ErrorOf(File("{", 0)), StartsWith("invalid header"));
  EXPECT_THAT(ErrorOf(File("[]", 0)), StartsWith("invalid header"));
  std::string ten_overlapping = "{";
  for (int i = 0; i < 10; ++i) {
    ten_overlapping += (i ? "," : "") + std::string("\"t") + std::to_string(i) +
                       R"(":{"dtype":"F32","shape":[4],"data_offsets":[0,16]})";
  }
  ten_overlapping += "}";
  EXPECT_THAT(ErrorOf(File(ten_overlapping, 16)), StartsWith("invalid offset"));
  EXPECT_THAT(
      ErrorOf(File(R"({"t":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}})",
                   24)),
      StartsWith("invalid offset"));  // gap before the first tensor
  EXPECT_THAT(
      ErrorOf(File(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                   R"("b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}})",
                   12)),
      StartsWith("invalid offset"));  // gap between tensors
  EXPECT_THAT(
      ErrorOf(
          File(R"({"t":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}})", 4)),
      StartsWith("invalid offset"));
  EXPECT_THAT(ErrorOf(File(std::string("{") + kF32x4 + "}", 17)),
              StartsWith("incomplete buffer"));
  EXPECT_THAT(ErrorOf(File(std::string("{") + kF32x4 + "}", 15)),
              StartsWith("incomplete buffer"));
  EXPECT_THAT(
      ErrorOf(File(R"({"t":{"dtype":"F32","shape":[4611686018427387904,4],)"
                   R"("data_offsets":[0,16]}})",
                   16)),
      StartsWith("validation overflow"));
  EXPECT_THAT(
      ErrorOf(File(R"({"t":{"dtype":"F32","shape":[3],"data_offsets":[0,16]}})",
                   16)),
      StartsWith("tensor invalid info"));
  EXPECT_THAT(ErrorOf(File(std::string("{") + kF32x4 + "," + kF32x4 + "}", 16)),
              AllOf(StartsWith("invalid header"),
                    HasSubstr("duplicate tensor name \"t\"")));
  EXPECT_THAT(
      ErrorOf(File(
          R"({"t":{"dtype":"F128","shape":[1],"data_offsets":[0,16]}})", 16)),
      StartsWith("invalid header"));
  EXPECT_THAT(
      ErrorOf(File(R"({"t":{"dtype":"F32","shape":[-1],"data_offsets":[0,0]}})",
                   0)),
      StartsWith("invalid header"));
  EXPECT_THAT(ErrorOf(File(R"({"__metadata__":{"a":1}})", 0)),
              StartsWith("invalid header"));
  EXPECT_THAT(ErrorOf(File(R"({"t":{"dtype":"F32","shape":[1]}})", 0)),
              StartsWith("invalid header"));
}

TEST(SafetensorsTest, HeaderLengthLimitIsInclusive) {
  // A header of exactly 100,000,000 bytes passes the size check (and then
  // parses as JSON).
  std::string header = "{}" + std::string(100'000'000 - 2, ' ');
  absl::StatusOr<SafetensorsFile> parsed = Parse(File(header, 0));
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_TRUE(parsed->tensors.empty());
}

TEST(SafetensorsTest, AcceptsEveryValidOddity) {
  EXPECT_TRUE(Parse(File("  {}  ", 0)).ok());
  EXPECT_TRUE(Parse(File("{}", 0)).ok());  // header length not a multiple of 8
  absl::StatusOr<SafetensorsFile> zero =
      Parse(File(R"({"a":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},)"
                 R"("b":{"dtype":"I64","shape":[2,0],"data_offsets":[0,0]},)"
                 R"("c":{"dtype":"F32","shape":[],"data_offsets":[0,4]},)"
                 R"("__metadata__":{"format":"pt"}})",
                 4));
  ASSERT_TRUE(zero.ok()) << zero.status();
  EXPECT_THAT(zero->tensors.Keys(), ElementsAre("a", "b", "c"));
  EXPECT_TRUE(zero->tensors.Find("c")->shape().empty());
  EXPECT_THAT(zero->metadata, ElementsAre(std::make_pair("format", "pt")));
  // JSON keys in any order, in an entry and among entries.
  absl::StatusOr<SafetensorsFile> unsorted =
      Parse(File(R"({"z":{"data_offsets":[4,8],"shape":[1],"dtype":"F32"},)"
                 R"("a":{"shape":[1],"dtype":"F32","data_offsets":[0,4]}})",
                 8));
  ASSERT_TRUE(unsorted.ok()) << unsorted.status();
  EXPECT_THAT(unsorted->tensors.Keys(), ElementsAre("a", "z"));  // data order
}

StateDict Sample() {
  StateDict state;
  state.Set("layer.weight", FloatTensor({2, 3}, {1, 2, 3, 4, 5, 6}));
  state.Set("b", FullTensor(DType::kBFloat16, {3}, 1.5f));
  state.Set("count", Tensor::Zeros(DType::kInt64, {}).value());
  state.Set("empty", Tensor::Zeros(DType::kFloat32, {0}).value());
  state.Set("flag", FullTensor(DType::kBool, {2}, 1));
  return state;
}

TEST(SafetensorsTest, WriterIsDeterministicAlignedAndRoundTrips) {
  StateDict state = Sample();
  std::string file = SerializeSafetensors(state, {{"format", "pt"}}).value();
  EXPECT_EQ(file, SerializeSafetensors(state, {{"format", "pt"}}).value());
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<uint8_t>(file[i]);
  EXPECT_EQ(n % 8, 0u);
  EXPECT_EQ(file.substr(8, 34),
            R"({"__metadata__":{"format":"pt"},"c)");  // 8-byte types first
  SafetensorsFile parsed = Parse(file).value();
  EXPECT_THAT(parsed.tensors.Keys(),
              ElementsAre("count", "empty", "layer.weight", "b", "flag"));
  for (const auto& entry : state.entries()) {
    EXPECT_TRUE(parsed.tensors.Find(entry.key)->BitwiseEquals(entry.tensor))
        << entry.key;
  }
  StateDict bad;
  bad.Set("__metadata__", FloatTensor({1}, {0}));
  EXPECT_FALSE(SerializeSafetensors(bad).ok());
}

TEST(SafetensorsTest, FilesAreReadAndLargeOnesMapped) {
  const std::string path = testing::TempDir() + "/sample.safetensors";
  StateDict state = Sample();
  state.Set(
      "big",
      Tensor::Zeros(DType::kFloat32, {1 << 19}).value());  // 2 MiB: mapped
  ASSERT_TRUE(WriteSafetensorsFile(path, state).ok());
  SafetensorsFile parsed = ReadSafetensorsFile(path).value();
  for (const auto& entry : state.entries()) {
    EXPECT_TRUE(parsed.tensors.Find(entry.key)->BitwiseEquals(entry.tensor))
        << entry.key;
  }
  EXPECT_EQ(ReadSafetensorsFile(path + ".missing").status().code(),
            absl::StatusCode::kNotFound);
  std::remove(path.c_str());
}

// A fresh directory for one test, and what it holds.
class ScratchDirectory {
 public:
  ScratchDirectory() {
    std::string pattern = testing::TempDir() + "/safetensors_test.XXXXXX";
    path_ = mkdtemp(pattern.data()) ? pattern : "";
  }
  ~ScratchDirectory() {
    for (const std::string& name : Names())
      std::remove((path_ + "/" + name).c_str());
    rmdir(path_.c_str());
  }
  std::string file(const std::string& name) const { return path_ + "/" + name; }
  std::vector<std::string> Names() const {
    std::vector<std::string> names;
    DIR* dir = opendir(path_.c_str());
    if (dir == nullptr) return names;
    while (const dirent* entry = readdir(dir)) {
      const std::string name = entry->d_name;
      if (name != "." && name != "..") names.push_back(name);
    }
    closedir(dir);
    std::sort(names.begin(), names.end());
    return names;
  }

 private:
  std::string path_;
};

std::vector<SafetensorsTensorInfo> Describe(const StateDict& state) {
  std::vector<SafetensorsTensorInfo> tensors;
  for (const auto& entry : state.entries())
    tensors.push_back({entry.key, entry.tensor.dtype(), entry.tensor.shape()});
  return tensors;
}

std::string Contents(const std::string& path) {
  return ReadFileToString(path).value_or("<unreadable>");
}

StateDict SampleWithBig() {
  StateDict state = Sample();
  state.Set("big", FullTensor(DType::kFloat32, {1 << 18}, 3));
  return state;
}

// Feeds the writer `state`'s tensors in reverse order: the stream writer must
// not depend on arrival order.
absl::Status WriteAllReversed(SafetensorsStreamWriter& writer,
                              const StateDict& state) {
  const auto& entries = state.entries();
  for (auto it = entries.rbegin(); it != entries.rend(); ++it)
    RETURN_IF_ERROR(writer.WriteTensor(it->key, it->tensor));
  return absl::OkStatus();
}

TEST(SafetensorsTest, HeaderFromDescriptionsEqualsHeaderFromTensors) {
  const StateDict state = SampleWithBig();
  EXPECT_EQ(SerializeSafetensorsHeaderFor(Describe(state), {{"a", "b"}}),
            SerializeSafetensorsHeader(state, {{"a", "b"}}));
  std::vector<SafetensorsTensorInfo> twice = Describe(state);
  twice.push_back(twice.front());
  EXPECT_THAT(SerializeSafetensorsHeaderFor(twice).status().message(),
              HasSubstr("duplicate tensor name"));
  EXPECT_EQ(SerializeSafetensorsHeaderFor({{"x", DType::kFloat32, {-1}}})
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(SafetensorsTest, StreamWriterFileIsByteIdenticalToWriteSafetensorsFile) {
  const ScratchDirectory dir;
  const StateDict state = SampleWithBig();
  ASSERT_TRUE(
      WriteSafetensorsFile(dir.file("old"), state, {{"format", "pt"}}).ok());
  auto writer = SafetensorsStreamWriter::Create(
      dir.file("new"), Describe(state), {{"format", "pt"}}, {});
  ASSERT_TRUE(writer.ok()) << writer.status();
  // Built under a hidden name beside the destination, which appears only on
  // Commit.
  EXPECT_THAT((*writer)->temporary_path(), StartsWith(dir.file(".new.tmp.")));
  ASSERT_TRUE(WriteAllReversed(**writer, state).ok());
  EXPECT_THAT(dir.Names(), ElementsAre(HasSubstr(".new.tmp."), "old"));
  ASSERT_TRUE((*writer)->Commit().ok());
  EXPECT_THAT(dir.Names(), ElementsAre("new", "old"));
  EXPECT_EQ(Contents(dir.file("new")), Contents(dir.file("old")));
  EXPECT_EQ((*writer)->file_bytes(), Contents(dir.file("new")).size());
  EXPECT_FALSE((*writer)->synced());
}

TEST(SafetensorsTest, StreamWriterFsyncsOnlyWhenAsked) {
  const ScratchDirectory dir;
  const StateDict state = Sample();
  for (bool fsync : {false, true}) {
    SafetensorsStreamWriter::Options options;
    options.fsync = fsync;
    auto writer = SafetensorsStreamWriter::Create(dir.file("out"),
                                                  Describe(state), {}, options)
                      .value();
    ASSERT_TRUE(WriteAllReversed(*writer, state).ok());
    EXPECT_FALSE(writer->synced());
    ASSERT_TRUE(writer->Commit().ok());
    EXPECT_EQ(writer->synced(), fsync);
    EXPECT_EQ(Contents(dir.file("out")), SerializeSafetensors(state).value());
  }
}

TEST(SafetensorsTest, StreamWriterFailureLeavesTheOldFileAndNoTemporary) {
  const ScratchDirectory dir;
  const std::string path = dir.file("model.safetensors");
  ASSERT_TRUE(WriteSafetensorsFile(path, Sample()).ok());
  const std::string before = Contents(path);
  const StateDict state = SampleWithBig();
  {  // Abandoned half way: destroyed without Commit.
    auto writer =
        SafetensorsStreamWriter::Create(path, Describe(state), {}, {}).value();
    ASSERT_TRUE(writer->WriteTensor("big", *state.Find("big")).ok());
    EXPECT_EQ(dir.Names().size(), 2u);
  }
  EXPECT_THAT(dir.Names(), ElementsAre("model.safetensors"));
  EXPECT_EQ(Contents(path), before);
  // Committed with a tensor missing.
  auto writer =
      SafetensorsStreamWriter::Create(path, Describe(state), {}, {}).value();
  ASSERT_TRUE(writer->WriteTensor("big", *state.Find("big")).ok());
  absl::Status committed = writer->Commit();
  EXPECT_EQ(committed.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(committed.message(), HasSubstr("was never written"));
  EXPECT_THAT(dir.Names(), ElementsAre("model.safetensors"));
  EXPECT_EQ(Contents(path), before);
  // A destination that cannot be replaced (a directory) fails the rename.
  ASSERT_EQ(mkdir(dir.file("taken").c_str(), 0755), 0);
  ASSERT_EQ(mkdir(dir.file("taken/inside").c_str(), 0755), 0);
  auto blocked = SafetensorsStreamWriter::Create(dir.file("taken"),
                                                 Describe(state), {}, {})
                     .value();
  ASSERT_TRUE(WriteAllReversed(*blocked, state).ok());
  EXPECT_FALSE(blocked->Commit().ok());
  EXPECT_THAT(dir.Names(), ElementsAre("model.safetensors", "taken"));
  rmdir(dir.file("taken/inside").c_str());
  // No directory: nothing to create the temporary file in.
  EXPECT_EQ(SafetensorsStreamWriter::Create(dir.file("none/x"), Describe(state),
                                            {}, {})
                .status()
                .code(),
            absl::StatusCode::kNotFound);
}

TEST(SafetensorsTest, StreamWriterAssemblesTensorsFromPiecesInOrder) {
  const ScratchDirectory dir;
  const StateDict state = SampleWithBig();
  auto writer =
      SafetensorsStreamWriter::Create(dir.file("out"), Describe(state), {}, {})
          .value();
  for (const auto& entry : state.entries()) {
    const absl::Span<const uint8_t> bytes = entry.tensor.bytes();
    const absl::string_view all(reinterpret_cast<const char*>(bytes.data()),
                                bytes.size());
    // Pieces of an odd size, so that they straddle elements.
    const size_t piece = all.size() > 4096 ? 4099 : 3;
    for (size_t at = 0; at < all.size(); at += piece) {
      ASSERT_TRUE(
          writer->WritePiece(entry.key, at, all.substr(at, piece)).ok());
    }
  }
  // Every tensor is whole: more bytes are refused.
  absl::Status extra =
      writer->WritePiece("big", state.Find("big")->num_bytes(), "x");
  EXPECT_EQ(extra.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(writer->WriteTensor("big", *state.Find("big")).message(),
              HasSubstr("written already"));
  ASSERT_TRUE(writer->Commit().ok());
  EXPECT_EQ(Contents(dir.file("out")), SerializeSafetensors(state).value());
}

TEST(SafetensorsTest, StreamWriterRefusesPiecesOutOfPlace) {
  const ScratchDirectory dir;
  const StateDict state = Sample();
  auto writer =
      SafetensorsStreamWriter::Create(dir.file("out"), Describe(state), {}, {})
          .value();
  const uint64_t bytes = state.Find("layer.weight")->num_bytes();
  const std::string piece(4, '\0');
  EXPECT_THAT(writer->WritePiece("nope", 0, piece).message(),
              HasSubstr("is not one of the file's"));
  // A gap, then an overlap, then past the end.
  EXPECT_EQ(writer->WritePiece("layer.weight", 4, piece).code(),
            absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE(writer->WritePiece("layer.weight", 0, piece).ok());
  EXPECT_EQ(writer->WritePiece("layer.weight", 0, piece).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(
      writer->WritePiece("layer.weight", 4, std::string(bytes, '\0')).code(),
      absl::StatusCode::kInvalidArgument);
  // Partly written: not a tensor of the file yet.
  EXPECT_THAT(writer->WriteTensor("layer.weight", *state.Find("layer.weight"))
                  .message(),
              HasSubstr("written already"));
  absl::Status committed = writer->Commit();
  EXPECT_THAT(committed.message(), HasSubstr("was never written"));
}

TEST(SafetensorsTest, StreamWriterRefusesTensorsThatDoNotMatchTheHeader) {
  const ScratchDirectory dir;
  const StateDict state = Sample();
  auto writer =
      SafetensorsStreamWriter::Create(dir.file("out"), Describe(state), {}, {})
          .value();
  const Tensor& weight = *state.Find("layer.weight");
  EXPECT_THAT(writer->WriteTensor("nope", weight).message(),
              HasSubstr("is not one of the file's"));
  EXPECT_THAT(
      writer->WriteTensor("layer.weight", FloatTensor({1}, {0})).message(),
      HasSubstr("but the header says"));
  EXPECT_THAT(writer
                  ->WriteTensor("layer.weight",
                                FullTensor(DType::kFloat16, weight.shape(), 1))
                  .message(),
              HasSubstr("but the header says"));
  ASSERT_TRUE(writer->WriteTensor("layer.weight", weight).ok());
  EXPECT_THAT(writer->WriteTensor("layer.weight", weight).message(),
              HasSubstr("written already"));
  StateDict bad;
  bad.Set("__metadata__", FloatTensor({1}, {0}));
  EXPECT_FALSE(
      SafetensorsStreamWriter::Create(dir.file("bad"), Describe(bad), {}, {})
          .ok());
  EXPECT_THAT(dir.Names(), ElementsAre(HasSubstr(".out.tmp.")));
}

}  // namespace
}  // namespace modelstate

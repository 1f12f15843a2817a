// Every bad and valid input of the reference spec (§4, §7.11, §7.12), plus
// round trips.
#include "core/safetensors.h"

#include <cstdio>
#include <string>

#include "core/test_util.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

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

}  // namespace
}  // namespace modelstate

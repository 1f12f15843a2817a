// Element types of tensors, with PyTorch's and safetensors' names, and
// bit-exact conversions.
#ifndef MODELSTATE_MODEL_DTYPE_H_
#define MODELSTATE_MODEL_DTYPE_H_

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace modelstate {

// The numeric values are part of the wire protocol (proto DType mirrors them);
// never renumber. They run from 1 to kLastDType without gaps, and dtype.cc's
// table has one row per value (checked at compile time). Functions taking a
// DType require a valid enumerator (check untrusted values with IsValidDType)
// and abort on anything else.
enum class DType : int {
  kFloat64 = 1,
  kFloat32 = 2,
  kFloat16 = 3,
  kBFloat16 = 4,
  kInt64 = 5,
  kInt32 = 6,
  kInt16 = 7,
  kInt8 = 8,
  kUInt8 = 9,
  kUInt16 = 10,
  kUInt32 = 11,
  kUInt64 = 12,
  kBool = 13,
  kComplex64 = 14,
  kFloat8E4M3 = 15,  // torch.float8_e4m3fn
  kFloat8E5M2 = 16,  // torch.float8_e5m2
};

// The enumerator with the largest value; move it when adding a dtype.
inline constexpr DType kLastDType = DType::kFloat8E5M2;

// Every dtype, in the order of their values.
inline constexpr auto kAllDTypes = [] {
  std::array<DType, static_cast<size_t>(kLastDType)> all{};
  for (size_t i = 0; i < all.size(); ++i) all[i] = static_cast<DType>(i + 1);
  return all;
}();

// Returns the size of one element in bytes (1 to 8).
size_t ElementSize(DType dtype);

// Returns torch's name without the "torch." prefix, e.g. "float32", "bfloat16",
// "float8_e4m3fn".
absl::string_view TorchName(DType dtype);

// Returns the safetensors header name, e.g. "F32", "BF16", "F8_E4M3".
absl::string_view SafetensorsName(DType dtype);

// True for float64/32/16, bfloat16 and the float8 types (not complex): the
// types a fetch may cast.
bool IsFloatingPoint(DType dtype);

// True when `value` is a valid enumerator (used to validate untrusted wire
// values).
bool IsValidDType(int value);

// Parses a safetensors name ("F32"). Returns InvalidArgument for anything else.
absl::StatusOr<DType> ParseSafetensorsDType(absl::string_view name);

// Parses a torch name with or without the "torch." prefix ("float32",
// "torch.half", "bf16", "long"), including torch's aliases. Returns
// InvalidArgument for anything else.
absl::StatusOr<DType> ParseTorchDType(absl::string_view name);

// Converts `count` elements from `src` (of type `from`) to `dst` (of type `to`)
// with exactly the results of torch's `dst.copy_(src)` on x86-64 CPUs: float to
// float16/bfloat16 rounds to nearest even (via float32 for wider sources, as
// torch does); NaN stays NaN, infinities and subnormals are kept; float to
// integer truncates toward zero; anything to bool is `value != 0`; complex to
// real keeps the real part. `src` and `dst` need no alignment and must not
// overlap. When `from == to` this is a memcpy.
void ConvertElements(DType from, const void* src, DType to, void* dst,
                     size_t count);

// Scalar helpers, exposed for tests and for code that builds single values.
uint16_t Float32ToFloat16Bits(float value);
float Float16BitsToFloat32(uint16_t bits);
uint16_t Float32ToBFloat16Bits(float value);
float BFloat16BitsToFloat32(uint16_t bits);
uint8_t Float32ToFloat8E4M3Bits(float value);
float Float8E4M3BitsToFloat32(uint8_t bits);
uint8_t Float32ToFloat8E5M2Bits(float value);
float Float8E5M2BitsToFloat32(uint8_t bits);

}  // namespace modelstate

#endif  // MODELSTATE_MODEL_DTYPE_H_

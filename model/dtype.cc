#include "model/dtype.h"

#include <array>
#include <cmath>
#include <complex>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"

namespace modelstate {
namespace {

// Everything the lookups below need to know about one dtype.
struct DTypeInfo {
  DType dtype;
  absl::string_view torch_name;  // Without the "torch." prefix.
  absl::string_view safetensors_name;
  size_t size;    // Bytes per element.
  bool floating;  // IsFloatingPoint.
};

// The one list of dtypes: row i describes the DType of value i + 1, so lookups
// index it directly. Checked against the enum (and against the Traits the
// conversions use) by the static_asserts of CheckRow below.
constexpr DTypeInfo kInfos[] = {
    // dtype, torch name, safetensors name, size, floating point
    {DType::kFloat64, "float64", "F64", 8, true},
    {DType::kFloat32, "float32", "F32", 4, true},
    {DType::kFloat16, "float16", "F16", 2, true},
    {DType::kBFloat16, "bfloat16", "BF16", 2, true},
    {DType::kInt64, "int64", "I64", 8, false},
    {DType::kInt32, "int32", "I32", 4, false},
    {DType::kInt16, "int16", "I16", 2, false},
    {DType::kInt8, "int8", "I8", 1, false},
    {DType::kUInt8, "uint8", "U8", 1, false},
    {DType::kUInt16, "uint16", "U16", 2, false},
    {DType::kUInt32, "uint32", "U32", 4, false},
    {DType::kUInt64, "uint64", "U64", 8, false},
    {DType::kBool, "bool", "BOOL", 1, false},
    {DType::kComplex64, "complex64", "C64", 8, false},
    {DType::kFloat8E4M3, "float8_e4m3fn", "F8_E4M3", 1, true},
    {DType::kFloat8E5M2, "float8_e5m2", "F8_E5M2", 1, true},
};
constexpr size_t kNumDTypes = sizeof(kInfos) / sizeof(kInfos[0]);
static_assert(kNumDTypes == static_cast<size_t>(kLastDType),
              "kInfos needs exactly one row per DType value 1..kLastDType");

// The row of `dtype` in kInfos; kNumDTypes or more for an invalid value.
constexpr size_t RowOf(DType dtype) { return static_cast<size_t>(dtype) - 1; }

[[noreturn]] void DieOfInvalidDType(DType dtype) {
  std::fprintf(stderr, "modelstate: invalid DType value %d\n",
               static_cast<int>(dtype));
  std::abort();
}

// RowOf for a DType that indexes kInfos; an invalid value (a bug: untrusted
// values are checked with IsValidDType first) aborts instead of reading past
// the table.
size_t CheckedRow(DType dtype) {
  const size_t row = RowOf(dtype);
  if (row >= kNumDTypes) DieOfInvalidDType(dtype);
  return row;
}

const DTypeInfo& Info(DType dtype) { return kInfos[CheckedRow(dtype)]; }

inline uint32_t FloatBits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
inline float BitsFloat(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

}  // namespace

size_t ElementSize(DType dtype) { return Info(dtype).size; }
absl::string_view TorchName(DType dtype) { return Info(dtype).torch_name; }
absl::string_view SafetensorsName(DType dtype) {
  return Info(dtype).safetensors_name;
}

bool IsFloatingPoint(DType dtype) { return Info(dtype).floating; }

bool IsValidDType(int value) {
  return value >= 1 && static_cast<size_t>(value) <= kNumDTypes;
}

absl::StatusOr<DType> ParseSafetensorsDType(absl::string_view name) {
  for (const DTypeInfo& info : kInfos) {
    if (info.safetensors_name == name) return info.dtype;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("unknown safetensors dtype \"", name, "\""));
}

absl::StatusOr<DType> ParseTorchDType(absl::string_view name) {
  std::string lower = absl::AsciiStrToLower(name);
  absl::string_view n = lower;
  absl::ConsumePrefix(&n, "torch.");
  for (const DTypeInfo& info : kInfos) {
    if (info.torch_name == n) return info.dtype;
  }
  struct Alias {
    absl::string_view name;
    DType dtype;
  };
  static constexpr Alias kAliases[] = {
      {"double", DType::kFloat64},  {"f64", DType::kFloat64},
      {"float", DType::kFloat32},   {"f32", DType::kFloat32},
      {"half", DType::kFloat16},    {"f16", DType::kFloat16},
      {"bf16", DType::kBFloat16},   {"long", DType::kInt64},
      {"int", DType::kInt32},       {"short", DType::kInt16},
      {"cfloat", DType::kComplex64}};
  for (const Alias& alias : kAliases) {
    if (alias.name == n) return alias.dtype;
  }
  // Accept safetensors spellings too, so one parser serves every command-line
  // flag.
  for (const DTypeInfo& info : kInfos) {
    if (absl::EqualsIgnoreCase(info.safetensors_name, n)) return info.dtype;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("unknown dtype \"", name, "\""));
}

// float16: the algorithm of the FP16 library (Marat Dukhan) that torch's
// c10::Half uses.
uint16_t Float32ToFloat16Bits(float f) {
  const float scale_to_inf = BitsFloat(UINT32_C(0x77800000));
  const float scale_to_zero = BitsFloat(UINT32_C(0x08800000));
  float base = (std::fabs(f) * scale_to_inf) * scale_to_zero;
  const uint32_t w = FloatBits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & UINT32_C(0x80000000);
  uint32_t bias = shl1_w & UINT32_C(0xFF000000);
  if (bias < UINT32_C(0x71000000)) bias = UINT32_C(0x71000000);
  base = BitsFloat((bias >> 1) + UINT32_C(0x07800000)) + base;
  const uint32_t bits = FloatBits(base);
  const uint32_t exp_bits = (bits >> 13) & UINT32_C(0x00007C00);
  const uint32_t mantissa_bits = bits & UINT32_C(0x00000FFF);
  const uint32_t nonsign = exp_bits + mantissa_bits;
  return static_cast<uint16_t>(
      (sign >> 16) | (shl1_w > UINT32_C(0xFF000000) ? 0x7E00 : nonsign));
}

float Float16BitsToFloat32(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & UINT32_C(0x80000000);
  const uint32_t two_w = w + w;
  const uint32_t exp_offset = UINT32_C(0xE0) << 23;
  const float exp_scale = 0x1.0p-112f;
  const float normalized = BitsFloat((two_w >> 4) + exp_offset) * exp_scale;
  const uint32_t magic_mask = UINT32_C(126) << 23;
  const float denormalized = BitsFloat((two_w >> 17) | magic_mask) - 0.5f;
  const uint32_t denormalized_cutoff = UINT32_C(1) << 27;
  return BitsFloat(sign |
                   (two_w < denormalized_cutoff ? FloatBits(denormalized)
                                                : FloatBits(normalized)));
}

// bfloat16: round to nearest even (c10::detail::round_to_nearest_even). NaN
// becomes 0x7FC0, as in torch's scalar path; float32 sources take torch's
// vectorised AVX2 path instead, whose NaN is 0xFFFF (see
// Float32ToBFloat16BitsVectorPath). Branch-free so conversion loops vectorise.
uint16_t Float32ToBFloat16Bits(float f) {
  const uint32_t u = FloatBits(f);
  const uint32_t rounding_bias = ((u >> 16) & 1) + UINT32_C(0x7FFF);
  const uint16_t rounded = static_cast<uint16_t>((u + rounding_bias) >> 16);
  return f != f ? uint16_t{0x7FC0} : rounded;
}

namespace {
// torch 1.13's copy_ from float32 to bfloat16 (cvtfp32_bf16 in
// vec256_bfloat16.h): the same rounding, but NaN gives 0xFFFF. Newer torch
// releases give 0x7FC0 here too; both are NaN.
uint16_t Float32ToBFloat16BitsVectorPath(float f) {
  const uint16_t rounded = Float32ToBFloat16Bits(f);
  return f != f ? uint16_t{0xFFFF} : rounded;
}
}  // namespace

float BFloat16BitsToFloat32(uint16_t bits) {
  return BitsFloat(static_cast<uint32_t>(bits) << 16);
}

// float8: c10/util/Float8_e4m3fn.h and Float8_e5m2.h.
uint8_t Float32ToFloat8E4M3Bits(float f) {
  constexpr uint32_t kFp8Max = UINT32_C(1087) << 20;
  constexpr uint32_t kDenormMask = UINT32_C(141) << 23;
  uint32_t f_bits = FloatBits(f);
  const uint32_t sign = f_bits & UINT32_C(0x80000000);
  f_bits ^= sign;
  uint8_t result;
  if (f_bits >= kFp8Max) {
    result = 0x7F;
  } else if (f_bits < (UINT32_C(121) << 23)) {
    f_bits = FloatBits(BitsFloat(f_bits) + BitsFloat(kDenormMask));
    result = static_cast<uint8_t>(f_bits - kDenormMask);
  } else {
    const uint32_t mant_odd = (f_bits >> 20) & 1;
    f_bits += (static_cast<uint32_t>(7 - 127) << 23) + 0x7FFFF;
    f_bits += mant_odd;
    result = static_cast<uint8_t>(f_bits >> 20);
  }
  return result | static_cast<uint8_t>(sign >> 24);
}

float Float8E4M3BitsToFloat32(uint8_t bits) {
  const bool negative = bits & 0x80;
  const int exponent = (bits >> 3) & 0xF;
  const int mantissa = bits & 0x7;
  float magnitude;
  if (exponent == 0xF && mantissa == 0x7) {
    magnitude = std::numeric_limits<float>::quiet_NaN();
  } else if (exponent == 0) {
    magnitude = std::ldexp(static_cast<float>(mantissa), -9);
  } else {
    magnitude = std::ldexp(1.0f + mantissa / 8.0f, exponent - 7);
  }
  return negative ? -magnitude : magnitude;
}

uint8_t Float32ToFloat8E5M2Bits(float f) {
  constexpr uint32_t kFp32Inf = UINT32_C(255) << 23;
  constexpr uint32_t kFp8Max = UINT32_C(143) << 23;
  constexpr uint32_t kDenormMask = UINT32_C(134) << 23;
  uint32_t f_bits = FloatBits(f);
  const uint32_t sign = f_bits & UINT32_C(0x80000000);
  f_bits ^= sign;
  uint8_t result;
  if (f_bits >= kFp8Max) {
    result = f_bits > kFp32Inf ? 0x7F : 0x7C;
  } else if (f_bits < (UINT32_C(113) << 23)) {
    f_bits = FloatBits(BitsFloat(f_bits) + BitsFloat(kDenormMask));
    result = static_cast<uint8_t>(f_bits - kDenormMask);
  } else {
    const uint32_t mant_odd = (f_bits >> 21) & 1;
    f_bits += (static_cast<uint32_t>(15 - 127) << 23) + 0xFFFFF;
    f_bits += mant_odd;
    result = static_cast<uint8_t>(f_bits >> 21);
  }
  return result | static_cast<uint8_t>(sign >> 24);
}

float Float8E5M2BitsToFloat32(uint8_t bits) {
  return Float16BitsToFloat32(static_cast<uint16_t>(bits) << 8);
}

namespace {

// Each dtype is stored as `Storage` and computed with as `Compute`, the type
// torch's kernels convert through (half, bfloat16 and float8 go through float).
template <DType D>
struct Traits;

#define MS_PLAIN_TRAITS(D, T)                      \
  template <>                                      \
  struct Traits<D> {                               \
    using Storage = T;                             \
    using Compute = T;                             \
    static Compute Decode(Storage s) { return s; } \
    static Storage Encode(Compute c) { return c; } \
  };
MS_PLAIN_TRAITS(DType::kFloat64, double)
MS_PLAIN_TRAITS(DType::kFloat32, float)
MS_PLAIN_TRAITS(DType::kInt64, int64_t)
MS_PLAIN_TRAITS(DType::kInt32, int32_t)
MS_PLAIN_TRAITS(DType::kInt16, int16_t)
MS_PLAIN_TRAITS(DType::kInt8, int8_t)
MS_PLAIN_TRAITS(DType::kUInt8, uint8_t)
MS_PLAIN_TRAITS(DType::kUInt16, uint16_t)
MS_PLAIN_TRAITS(DType::kUInt32, uint32_t)
MS_PLAIN_TRAITS(DType::kUInt64, uint64_t)
MS_PLAIN_TRAITS(DType::kComplex64, std::complex<float>)
#undef MS_PLAIN_TRAITS

template <>
struct Traits<DType::kBool> {
  using Storage = uint8_t;
  using Compute = bool;
  static Compute Decode(Storage s) { return s != 0; }
  static Storage Encode(Compute c) { return c ? 1 : 0; }
};

#define MS_FLOAT_TRAITS(D, T, ENCODE, DECODE)              \
  template <>                                              \
  struct Traits<D> {                                       \
    using Storage = T;                                     \
    using Compute = float;                                 \
    static Compute Decode(Storage s) { return DECODE(s); } \
    static Storage Encode(Compute c) { return ENCODE(c); } \
  };
MS_FLOAT_TRAITS(DType::kFloat16, uint16_t, Float32ToFloat16Bits,
                Float16BitsToFloat32)
MS_FLOAT_TRAITS(DType::kBFloat16, uint16_t, Float32ToBFloat16Bits,
                BFloat16BitsToFloat32)
MS_FLOAT_TRAITS(DType::kFloat8E4M3, uint8_t, Float32ToFloat8E4M3Bits,
                Float8E4M3BitsToFloat32)
MS_FLOAT_TRAITS(DType::kFloat8E5M2, uint8_t, Float32ToFloat8E5M2Bits,
                Float8E5M2BitsToFloat32)
#undef MS_FLOAT_TRAITS

template <typename T>
struct IsComplex : std::false_type {};
template <typename T>
struct IsComplex<std::complex<T>> : std::true_type {};

// A floating value to an integer as x86-64's cvttss2si/cvttsd2si do:
// truncation, and the "integer indefinite" value (the minimum) for NaN and
// out-of-range input. Types narrower than 32 bits go through int32 and keep the
// low bits, as the compiled static_cast in torch does.
template <typename Int, typename Float>
Int FloatToInt(Float v) {
  if constexpr (sizeof(Int) == 8) {
    constexpr Float kLimit = static_cast<Float>(9223372036854775808.0);
    if (!(v >= -kLimit && v < kLimit)) {
      return static_cast<Int>(std::numeric_limits<int64_t>::min());
    }
    if (std::is_unsigned<Int>::value && v >= 0) {
      return static_cast<Int>(static_cast<uint64_t>(v));
    }
    return static_cast<Int>(static_cast<int64_t>(v));
  } else if constexpr (std::is_same<Int, uint32_t>::value) {
    // torch converts float to uint32 through int64.
    return static_cast<Int>(FloatToInt<int64_t>(v));
  } else {
    constexpr Float kLimit = static_cast<Float>(2147483648.0);
    if (!(v >= -kLimit && v < kLimit)) {
      return static_cast<Int>(std::numeric_limits<int32_t>::min());
    }
    return static_cast<Int>(static_cast<int32_t>(v));
  }
}

template <typename To, typename From>
To CastValue(From v) {
  if constexpr (std::is_same<To, From>::value) {
    return v;
  } else if constexpr (std::is_same<To, bool>::value) {
    return v != From(0);
  } else if constexpr (IsComplex<From>::value) {
    return CastValue<To>(v.real());
  } else if constexpr (IsComplex<To>::value) {
    return To(static_cast<typename To::value_type>(v), 0);
  } else if constexpr (std::is_integral<To>::value &&
                       std::is_floating_point<From>::value) {
    return FloatToInt<To>(v);
  } else {
    return static_cast<To>(v);
  }
}

template <DType From, DType To>
void ConvertLoop(const void* src, void* dst, size_t count) {
  using S = typename Traits<From>::Storage;
  using T = typename Traits<To>::Storage;
  const unsigned char* in = static_cast<const unsigned char*>(src);
  unsigned char* out = static_cast<unsigned char*>(dst);
  for (size_t i = 0; i < count; ++i) {
    S s;
    std::memcpy(&s, in + i * sizeof(S), sizeof(S));
    T t;
    if constexpr (From == DType::kFloat32 && To == DType::kBFloat16) {
      t = Float32ToBFloat16BitsVectorPath(s);
    } else {
      t = Traits<To>::Encode(
          CastValue<typename Traits<To>::Compute>(Traits<From>::Decode(s)));
    }
    std::memcpy(out + i * sizeof(T), &t, sizeof(T));
  }
}

// Checks row `Row` of kInfos against the enum and against the Traits its
// conversions use, so the table and the types cannot drift apart.
template <size_t Row>
struct CheckRow {
  static constexpr DType kDType = kInfos[Row].dtype;
  static_assert(RowOf(kDType) == Row,
                "kInfos row i must describe the DType of value i + 1");
  static_assert(sizeof(typename Traits<kDType>::Storage) == kInfos[Row].size,
                "a dtype's size must be the size of its Traits' Storage");
  static_assert(
      std::is_floating_point<typename Traits<kDType>::Compute>::value ==
          kInfos[Row].floating,
      "a dtype is floating point exactly when its Traits compute in float");
  static constexpr bool kChecked = true;
};

template <size_t... Rows>
constexpr bool CheckRows(std::index_sequence<Rows...>) {
  return (CheckRow<Rows>::kChecked && ...);
}
static_assert(CheckRows(std::make_index_sequence<kNumDTypes>()));

using ConvertFunction = void (*)(const void* src, void* dst, size_t count);

template <size_t FromRow, size_t... ToRows>
constexpr std::array<ConvertFunction, kNumDTypes> ConvertersFrom(
    std::index_sequence<ToRows...>) {
  return {{&ConvertLoop<kInfos[FromRow].dtype, kInfos[ToRows].dtype>...}};
}

template <size_t... FromRows>
constexpr std::array<std::array<ConvertFunction, kNumDTypes>, kNumDTypes>
MakeConverters(std::index_sequence<FromRows...>) {
  return {
      {ConvertersFrom<FromRows>(std::make_index_sequence<kNumDTypes>())...}};
}

// kConverters[RowOf(from)][RowOf(to)] converts elements of `from` to `to`.
constexpr auto kConverters =
    MakeConverters(std::make_index_sequence<kNumDTypes>());

}  // namespace

void ConvertElements(DType from, const void* src, DType to, void* dst,
                     size_t count) {
  if (from == to) {
    if (count > 0) std::memcpy(dst, src, count * ElementSize(from));
    return;
  }
  kConverters[CheckedRow(from)][CheckedRow(to)](src, dst, count);
}

}  // namespace modelstate

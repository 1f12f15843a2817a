#include "model/dtype.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "gtest/gtest.h"

namespace modelstate {
namespace {

uint32_t Bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
float FromBits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

TEST(DTypeTest, NamesRoundTrip) {
  for (DType dtype : kAllDTypes) {
    EXPECT_EQ(ParseSafetensorsDType(SafetensorsName(dtype)).value(), dtype);
    EXPECT_EQ(ParseTorchDType(TorchName(dtype)).value(), dtype);
    EXPECT_EQ(
        ParseTorchDType(std::string("torch.") + std::string(TorchName(dtype)))
            .value(),
        dtype);
  }
  EXPECT_EQ(ElementSize(DType::kComplex64), 8u);
  EXPECT_EQ(ElementSize(DType::kBFloat16), 2u);
  EXPECT_EQ(ElementSize(DType::kFloat8E5M2), 1u);
  EXPECT_EQ(ParseTorchDType("half").value(), DType::kFloat16);
  EXPECT_EQ(ParseTorchDType("bf16").value(), DType::kBFloat16);
  EXPECT_EQ(ParseTorchDType("long").value(), DType::kInt64);
  EXPECT_FALSE(ParseSafetensorsDType("F128").ok());
  EXPECT_FALSE(ParseSafetensorsDType("f32")
                   .ok());  // safetensors names are case-sensitive
  EXPECT_FALSE(ParseTorchDType("quint8").ok());
  EXPECT_FALSE(IsValidDType(0));
  EXPECT_FALSE(IsValidDType(17));
  EXPECT_TRUE(IsFloatingPoint(DType::kBFloat16));
  EXPECT_FALSE(IsFloatingPoint(DType::kComplex64));
}

TEST(DTypeTest, EveryPairOfDTypesConvertsOne) {
  EXPECT_EQ(kAllDTypes.size(), 16u);
  for (DType from : kAllDTypes) {
    EXPECT_TRUE(IsValidDType(static_cast<int>(from)));
    const float one = 1.0f;
    uint8_t source[8] = {};
    ConvertElements(DType::kFloat32, &one, from, source, 1);
    for (DType to : kAllDTypes) {
      uint8_t converted[8] = {};
      ConvertElements(from, source, to, converted, 1);
      float back = 0.0f;
      ConvertElements(to, converted, DType::kFloat32, &back, 1);
      EXPECT_EQ(back, 1.0f) << TorchName(from) << " -> " << TorchName(to);
    }
  }
}

TEST(DTypeDeathTest, AnInvalidDTypeAbortsInsteadOfReadingPastTheTable) {
  EXPECT_DEATH(ElementSize(static_cast<DType>(0)), "invalid DType value 0");
  EXPECT_DEATH(TorchName(static_cast<DType>(17)), "invalid DType value 17");
  float in = 1.0f;
  float out = 0.0f;
  EXPECT_DEATH(
      ConvertElements(DType::kFloat32, &in, static_cast<DType>(-3), &out, 1),
      "invalid DType value -3");
}

TEST(DTypeTest, BFloat16RoundsToNearestEvenAndKeepsSpecials) {
  EXPECT_EQ(Float32ToBFloat16Bits(1.0f), 0x3F80);
  // 1 + 2^-8 is exactly halfway between two bfloat16 values: ties go to the
  // even mantissa.
  EXPECT_EQ(Float32ToBFloat16Bits(FromBits(0x3F808000)), 0x3F80);
  EXPECT_EQ(Float32ToBFloat16Bits(FromBits(0x3F818000)), 0x3F82);
  EXPECT_EQ(Float32ToBFloat16Bits(FromBits(0x3F808001)), 0x3F81);
  EXPECT_EQ(Float32ToBFloat16Bits(std::numeric_limits<float>::infinity()),
            0x7F80);
  EXPECT_EQ(Float32ToBFloat16Bits(-std::numeric_limits<float>::infinity()),
            0xFF80);
  EXPECT_EQ(Float32ToBFloat16Bits(std::nanf("")), 0x7FC0);
  // A float32 tensor's copy_ takes torch's vectorised path, whose NaN is
  // 0xFFFF.
  const float nan = std::nanf("");
  uint16_t copied;
  ConvertElements(DType::kFloat32, &nan, DType::kBFloat16, &copied, 1);
  EXPECT_EQ(copied, 0xFFFF);
  EXPECT_EQ(Float32ToBFloat16Bits(FromBits(0x00010000)),
            0x0001);  // subnormal kept
  EXPECT_EQ(Float32ToBFloat16Bits(FromBits(0x7F7FFFFF)),
            0x7F80);  // max float rounds to inf
  EXPECT_EQ(Bits(BFloat16BitsToFloat32(0x3F82)), 0x3F820000u);
}

TEST(DTypeTest, Float16RoundsToNearestEvenAndKeepsSpecials) {
  EXPECT_EQ(Float32ToFloat16Bits(1.0f), 0x3C00);
  EXPECT_EQ(Float32ToFloat16Bits(65504.0f), 0x7BFF);
  EXPECT_EQ(Float32ToFloat16Bits(65520.0f),
            0x7C00);  // halfway to the next: rounds to inf
  EXPECT_EQ(Float32ToFloat16Bits(-0.0f), 0x8000);
  EXPECT_EQ(Float32ToFloat16Bits(std::numeric_limits<float>::infinity()),
            0x7C00);
  EXPECT_EQ(Float32ToFloat16Bits(std::nanf("")), 0x7E00);
  EXPECT_EQ(Float32ToFloat16Bits(std::ldexp(1.0f, -24)),
            0x0001);  // smallest subnormal
  EXPECT_EQ(Float32ToFloat16Bits(std::ldexp(1.0f, -25)),
            0x0000);  // tie to even (zero)
  EXPECT_EQ(Float32ToFloat16Bits(std::ldexp(3.0f, -25)),
            0x0002);  // tie to even (two)
  EXPECT_EQ(Float32ToFloat16Bits(1.0f + std::ldexp(1.0f, -11)), 0x3C00);
  EXPECT_EQ(Float32ToFloat16Bits(1.0f + std::ldexp(3.0f, -11)), 0x3C02);
  EXPECT_EQ(Float16BitsToFloat32(0x0001), std::ldexp(1.0f, -24));
  EXPECT_TRUE(std::isnan(Float16BitsToFloat32(0x7E00)));
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const float f = Float16BitsToFloat32(static_cast<uint16_t>(h));
    if (!std::isnan(f)) {
      ASSERT_EQ(Float32ToFloat16Bits(f), h) << h;
    }
  }
}

TEST(DTypeTest, Float8RoundTripsEveryValue) {
  for (uint32_t b = 0; b < 256; ++b) {
    const float e4m3 = Float8E4M3BitsToFloat32(static_cast<uint8_t>(b));
    if (std::isnan(e4m3)) {
      EXPECT_EQ(b & 0x7F, 0x7Fu);
    } else {
      EXPECT_EQ(Float32ToFloat8E4M3Bits(e4m3), b);
    }
    const float e5m2 = Float8E5M2BitsToFloat32(static_cast<uint8_t>(b));
    if (!std::isnan(e5m2)) {
      EXPECT_EQ(Float32ToFloat8E5M2Bits(e5m2), b);
    }
  }
  EXPECT_EQ(Float8E4M3BitsToFloat32(0x7E), 448.0f);
  EXPECT_EQ(Float32ToFloat8E4M3Bits(460.0f), 0x7E);  // rounds down to the max
  EXPECT_EQ(Float32ToFloat8E4M3Bits(1000.0f),
            0x7F);                                 // no infinity in e4m3fn: NaN
  EXPECT_EQ(Float32ToFloat8E5M2Bits(1e6f), 0x7C);  // e5m2 overflows to infinity
}

TEST(DTypeTest, ConvertElementsFollowsTorchCopySemantics) {
  const std::vector<float> in = {1.9f, -1.9f, 0.0f, 300.5f, std::nanf("")};
  std::vector<int32_t> i32(in.size());
  ConvertElements(DType::kFloat32, in.data(), DType::kInt32, i32.data(),
                  in.size());
  EXPECT_EQ(i32, (std::vector<int32_t>{1, -1, 0, 300,
                                       std::numeric_limits<int32_t>::min()}));
  std::vector<uint8_t> as_bool(in.size());
  ConvertElements(DType::kFloat32, in.data(), DType::kBool, as_bool.data(),
                  in.size());
  EXPECT_EQ(as_bool, (std::vector<uint8_t>{1, 1, 0, 1, 1}));
  std::vector<uint8_t> u8(in.size());
  ConvertElements(DType::kFloat32, in.data(), DType::kUInt8, u8.data(), 4);
  EXPECT_EQ(u8[0], 1);
  EXPECT_EQ(u8[1], 255);  // -1 wraps, as the compiled static_cast does
  EXPECT_EQ(u8[3], 44);   // 300 mod 256
  const std::vector<uint8_t> bools = {0, 1, 2};
  std::vector<float> from_bool(3);
  ConvertElements(DType::kBool, bools.data(), DType::kFloat32, from_bool.data(),
                  3);
  EXPECT_EQ(from_bool, (std::vector<float>{0, 1, 1}));
  // Wide sources reach half precision through float, as torch does.
  const std::vector<double> wide = {1.0 + std::ldexp(1.0, -11) +
                                    std::ldexp(1.0, -40)};
  uint16_t half;
  ConvertElements(DType::kFloat64, wide.data(), DType::kFloat16, &half, 1);
  EXPECT_EQ(half, Float32ToFloat16Bits(static_cast<float>(wide[0])));
  // Complex to real keeps the real part; real to complex has a zero imaginary
  // part.
  const std::vector<float> complex_in = {3.5f, -2.0f};
  float real;
  ConvertElements(DType::kComplex64, complex_in.data(), DType::kFloat32, &real,
                  1);
  EXPECT_EQ(real, 3.5f);
  float complex_out[2];
  ConvertElements(DType::kFloat32, &real, DType::kComplex64, complex_out, 1);
  EXPECT_EQ(complex_out[0], 3.5f);
  EXPECT_EQ(complex_out[1], 0.0f);
  // Unaligned source and destination are fine.
  alignas(8) uint8_t raw[9 * 4] = {};
  const float one = 1.0f;
  std::memcpy(raw + 1, &one, 4);
  double out[2];
  ConvertElements(DType::kFloat32, raw + 1, DType::kFloat64, out, 1);
  EXPECT_EQ(out[0], 1.0);
}

}  // namespace
}  // namespace modelstate

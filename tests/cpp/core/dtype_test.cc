#include "core/dtype.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <typeinfo>
#include <vector>

#include "core/errors.h"
#include "test_util.h"

namespace lorart {
namespace {

using testing_util::expect_error;

constexpr float kInf = std::numeric_limits<float>::infinity();

TEST(DTypeTest, SizesNamesAndKinds) {
  EXPECT_EQ(dtype_size(DType::kFloat32), 4u);
  EXPECT_EQ(dtype_size(DType::kFloat16), 2u);
  EXPECT_EQ(dtype_size(DType::kBFloat16), 2u);
  EXPECT_EQ(dtype_size(DType::kInt32), 4u);
  EXPECT_EQ(dtype_size(DType::kInt64), 8u);
  EXPECT_STREQ(dtype_name(DType::kFloat32), "float32");
  EXPECT_STREQ(dtype_name(DType::kFloat16), "float16");
  EXPECT_STREQ(dtype_name(DType::kBFloat16), "bfloat16");
  EXPECT_STREQ(dtype_name(DType::kInt32), "int32");
  EXPECT_STREQ(dtype_name(DType::kInt64), "int64");
  EXPECT_TRUE(is_floating(DType::kFloat32));
  EXPECT_TRUE(is_floating(DType::kFloat16));
  EXPECT_TRUE(is_floating(DType::kBFloat16));
  EXPECT_FALSE(is_floating(DType::kInt32));
  EXPECT_FALSE(is_floating(DType::kInt64));
}

TEST(DTypeTest, FromNameIsInverseOfNameAndAcceptsAliases) {
  for (DType d :
       {DType::kFloat32, DType::kFloat16, DType::kBFloat16, DType::kInt32, DType::kInt64}) {
    EXPECT_EQ(dtype_from_name(dtype_name(d)), d) << dtype_name(d);
  }
  EXPECT_EQ(dtype_from_name("fp32"), DType::kFloat32);
  EXPECT_EQ(dtype_from_name("fp16"), DType::kFloat16);
  EXPECT_EQ(dtype_from_name("bf16"), DType::kBFloat16);
}

TEST(DTypeTest, FromNameRejectsUnknownNamingFieldAndValue) {
  expect_error<InvalidArgument>(
      [] { dtype_from_name("float8"); },
      "dtype must be one of float32, float16, bfloat16, int32, int64; got 'float8'");
  expect_error<InvalidArgument>([] { dtype_from_name("Float32", "torch_dtype"); },
                                "torch_dtype must be one of");
}

TEST(DTypeTest, UnknownDTypeCodeThrows) {
  expect_error<InvalidArgument>([] { dtype_size(static_cast<DType>(42)); },
                                "unknown dtype code 42");
}

TEST(HalfTest, ExactValuesRoundTrip) {
  const std::vector<std::pair<float, uint16_t>> cases = {
      {0.0f, 0x0000},     {-0.0f, 0x8000},    {1.0f, 0x3c00},     {-2.0f, 0xc000},
      {0.5f, 0x3800},     {1.5f, 0x3e00},     {65504.0f, 0x7bff}, {-65504.0f, 0xfbff},
      {0x1p-14f, 0x0400}, {0x1p-24f, 0x0001}, {0x3p-24f, 0x0003}, {0x1.ff8p-15f, 0x03ff},
  };
  for (const auto& [value, bits] : cases) {
    EXPECT_EQ(float_to_half(value), bits) << value;
    EXPECT_EQ(half_to_float(bits), value) << std::hex << bits;
  }
  EXPECT_TRUE(std::signbit(half_to_float(0x8000)));
}

TEST(HalfTest, RoundsToNearestEven) {
  // The half ulp at 1 is 2^-10: 1 + 2^-11 is a tie that goes down to the even 1.0 ...
  EXPECT_EQ(float_to_half(1.0f + 0x1p-11f), 0x3c00);
  // ... and 1 + 3*2^-11 is a tie that goes up to the even 1 + 2^-9.
  EXPECT_EQ(float_to_half(1.0f + 0x3p-11f), 0x3c02);
  EXPECT_EQ(float_to_half(1.0f + 0x1p-11f + 0x1p-20f), 0x3c01);  // just above the tie
  // A mantissa carry moves into the exponent: just under 2 rounds to 2.
  EXPECT_EQ(float_to_half(0x1.fffp0f), 0x4000);
  // Subnormal ties: 2^-25 -> 0 (even), 3*2^-25 -> 2*2^-24 (even).
  EXPECT_EQ(float_to_half(0x1p-25f), 0x0000);
  EXPECT_EQ(float_to_half(0x3p-25f), 0x0002);
  EXPECT_EQ(float_to_half(0x1p-30f), 0x0000);
  EXPECT_EQ(float_to_half(-0x1p-24f), 0x8001);
}

TEST(HalfTest, OverflowInfinityAndNan) {
  EXPECT_EQ(float_to_half(65504.0f), 0x7bff);
  EXPECT_EQ(float_to_half(65519.0f), 0x7bff);  // below the tie with 65536 still rounds down
  EXPECT_EQ(float_to_half(65520.0f), 0x7c00);
  EXPECT_EQ(float_to_half(-65520.0f), 0xfc00);
  EXPECT_EQ(float_to_half(1e30f), 0x7c00);
  EXPECT_EQ(float_to_half(kInf), 0x7c00);
  EXPECT_EQ(float_to_half(-kInf), 0xfc00);
  EXPECT_EQ(half_to_float(0x7c00), kInf);
  EXPECT_EQ(half_to_float(0xfc00), -kInf);

  const uint16_t nan_bits = float_to_half(std::nanf(""));
  EXPECT_EQ(nan_bits & 0x7c00, 0x7c00);
  EXPECT_NE(nan_bits & 0x03ff, 0);
  EXPECT_TRUE(std::isnan(half_to_float(nan_bits)));
  EXPECT_TRUE(std::isnan(half_to_float(0x7c01)));
}

TEST(BFloat16Test, ExactValuesRoundTrip) {
  const std::vector<std::pair<float, uint16_t>> cases = {
      {0.0f, 0x0000},   {1.0f, 0x3f80},     {-2.0f, 0xc000},     {0.5f, 0x3f00},
      {300.0f, 0x4396}, {0x1p127f, 0x7f00}, {0x1p-133f, 0x0001}, {-kInf, 0xff80},
  };
  for (const auto& [value, bits] : cases) {
    EXPECT_EQ(float_to_bfloat16(value), bits) << value;
    EXPECT_EQ(bfloat16_to_float(bits), value) << std::hex << bits;
  }
}

TEST(BFloat16Test, RoundsToNearestEven) {
  // The bf16 ulp at 1 is 2^-7: 1 + 2^-8 ties down to 1, 1 + 3*2^-8 ties up to 1 + 2^-6.
  EXPECT_EQ(float_to_bfloat16(1.0f + 0x1p-8f), 0x3f80);
  EXPECT_EQ(bfloat16_to_float(float_to_bfloat16(1.0f + 0x1p-8f)), 1.0f);
  EXPECT_EQ(float_to_bfloat16(1.0f + 0x3p-8f), 0x3f82);
  EXPECT_EQ(bfloat16_to_float(float_to_bfloat16(1.0f + 0x3p-8f)), 1.0f + 0x1p-6f);
  EXPECT_EQ(float_to_bfloat16(1.0f + 0x1p-8f + 0x1p-20f), 0x3f81);          // just above the tie
  EXPECT_EQ(float_to_bfloat16(std::numeric_limits<float>::max()), 0x7f80);  // rounds to inf
}

TEST(BFloat16Test, InfinityAndNan) {
  EXPECT_EQ(float_to_bfloat16(kInf), 0x7f80);
  EXPECT_EQ(bfloat16_to_float(0x7f80), kInf);
  // A nan whose payload sits only in the low 16 bits must not truncate to inf.
  uint32_t low_payload_nan_bits = 0x7f800001u;
  float low_payload_nan;
  std::memcpy(&low_payload_nan, &low_payload_nan_bits, sizeof(float));
  EXPECT_TRUE(std::isnan(bfloat16_to_float(float_to_bfloat16(low_payload_nan))));
  EXPECT_TRUE(std::isnan(bfloat16_to_float(float_to_bfloat16(std::nanf("")))));
  EXPECT_TRUE(std::isnan(bfloat16_to_float(float_to_bfloat16(-std::nanf("")))));
}

TEST(ConvertFloatsTest, ConvertsBetweenFloatingDtypes) {
  const std::vector<float> src = {1.0f, -0.5f, 1.0f + 0x3p-8f, 65520.0f};
  std::vector<uint16_t> bf16(src.size());
  convert_floats(src.data(), DType::kFloat32, bf16.data(), DType::kBFloat16, src.size());
  EXPECT_EQ(bf16, (std::vector<uint16_t>{0x3f80, 0xbf00, 0x3f82, 0x4780}));

  // bf16 rounded 65520 up to 65536, which is past the half range.
  std::vector<uint16_t> half(src.size());
  convert_floats(bf16.data(), DType::kBFloat16, half.data(), DType::kFloat16, src.size());
  EXPECT_EQ(half, (std::vector<uint16_t>{0x3c00, 0xb800, 0x3c10, 0x7c00}));

  std::vector<float> back(src.size());
  convert_floats(half.data(), DType::kFloat16, back.data(), DType::kFloat32, src.size());
  EXPECT_EQ(back, (std::vector<float>{1.0f, -0.5f, 1.015625f, kInf}));

  std::vector<float> same(src.size());
  convert_floats(src.data(), DType::kFloat32, same.data(), DType::kFloat32, src.size());
  EXPECT_EQ(same, src);
}

TEST(ConvertFloatsTest, RejectsIntegerDtypes) {
  int32_t ints[2] = {1, 2};
  float out[2];
  expect_error<InvalidArgument>(
      [&] { convert_floats(ints, DType::kInt32, out, DType::kFloat32, 2); },
      "convert_floats: cannot convert int32 to float32 (floating dtypes only)");
  expect_error<InvalidArgument>(
      [&] { convert_floats(out, DType::kFloat32, ints, DType::kInt64, 2); },
      "cannot convert float32 to int64");
}

}  // namespace
}  // namespace lorart

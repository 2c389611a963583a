#include "kernels/cpu/skinny_gemm.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "test_util.h"

#if defined(__SSE__)
#include <xmmintrin.h>
#endif

namespace lorart::cpu {
namespace {

// Weights stored in `dtype` plus the float32 values the kernels see after widening.
struct Weights {
  std::vector<uint8_t> raw;
  std::vector<float> values;
};

Weights make_weights(int64_t count, DType dtype, uint32_t seed) {
  const std::vector<float> f = testing_util::random_floats(count, seed);
  Weights w{std::vector<uint8_t>(count * dtype_size(dtype)), std::vector<float>(count)};
  convert_floats(f.data(), DType::kFloat32, w.raw.data(), dtype, count);
  convert_floats(w.raw.data(), dtype, w.values.data(), DType::kFloat32, count);
  return w;
}

using testing_util::random_floats;

class SkinnyGemmTest : public ::testing::TestWithParam<DType> {};

INSTANTIATE_TEST_SUITE_P(WeightDtypes, SkinnyGemmTest,
                         ::testing::Values(DType::kFloat32, DType::kFloat16, DType::kBFloat16),
                         [](const auto& info) { return std::string(dtype_name(info.param)); });

// Every row-count group (4, 2, 1), column-block and K-tail path, on strided x and y, for columns
// [n_begin, n_end) only; beta 0 never reads y.
TEST_P(SkinnyGemmTest, NtMatchesDoubleReference) {
  const DType dtype = GetParam();
  for (int64_t m : {1, 2, 3, 4, 7, 8, 13, 16}) {
    for (int64_t k : {1, 15, 16, 33, 100}) {
      for (float beta : {0.0f, 1.0f}) {
        SCOPED_TRACE(testing::Message() << "m " << m << ", k " << k << ", beta " << beta);
        const int64_t n = 41, n_begin = 3, n_end = 38, ldx = k + 5, ldw = k + 2, ldy = n + 4;
        const std::vector<float> x = random_floats(m * ldx, 1);
        const Weights w = make_weights(n * ldw, dtype, 2);
        std::vector<float> y = random_floats(m * ldy, 3);
        if (beta == 0.0f) {
          for (int64_t j = 0; j < m; ++j) {
            for (int64_t c = n_begin; c < n_end; ++c) {
              y[j * ldy + c] = std::numeric_limits<float>::quiet_NaN();
            }
          }
        }
        const std::vector<float> before = y;
        skinny_gemm_nt(dtype, m, n_begin, n_end, k, x.data(), ldx, w.raw.data(), ldw, beta,
                       y.data(), ldy);
        for (int64_t j = 0; j < m; ++j) {
          for (int64_t c = 0; c < ldy; ++c) {
            const int64_t i = j * ldy + c;
            if (c < n_begin || c >= n_end) {
              ASSERT_TRUE(std::memcmp(&y[i], &before[i], 4) == 0) << "touched " << j << "," << c;
              continue;
            }
            double ref = beta == 0.0f ? 0.0 : before[i];
            for (int64_t t = 0; t < k; ++t) ref += double{x[j * ldx + t]} * w.values[c * ldw + t];
            ASSERT_NEAR(y[i], ref, 1e-5 * std::max(1.0, std::abs(ref)))
                << "row " << j << ", col " << c;
          }
        }
      }
    }
  }
}

TEST_P(SkinnyGemmTest, NnMatchesDoubleReference) {
  const DType dtype = GetParam();
  for (int64_t m : {1, 2, 5, 16}) {
    for (int64_t k : {1, 3, 16}) {
      for (int64_t n_end : {1, 17, 64, 64 + 40, 200}) {
        SCOPED_TRACE(testing::Message() << "m " << m << ", k " << k << ", n_end " << n_end);
        const int64_t n_begin = n_end > 1 ? 1 : 0, ldx = k + 1, ldw = n_end + 3, ldy = n_end + 2;
        const std::vector<float> x = random_floats(m * ldx, 4);
        const Weights w = make_weights(k * ldw, dtype, 5);
        std::vector<float> y = random_floats(m * ldy, 6);
        const std::vector<float> before = y;
        skinny_gemm_nn(dtype, m, n_begin, n_end, k, x.data(), ldx, w.raw.data(), ldw, y.data(),
                       ldy);
        for (int64_t j = 0; j < m; ++j) {
          for (int64_t c = 0; c < ldy; ++c) {
            const int64_t i = j * ldy + c;
            if (c < n_begin || c >= n_end) {
              ASSERT_EQ(y[i], before[i]) << "touched " << j << "," << c;
              continue;
            }
            double ref = before[i];
            for (int64_t r = 0; r < k; ++r) ref += double{x[j * ldx + r]} * w.values[r * ldw + c];
            ASSERT_NEAR(y[i], ref, 1e-5 * std::max(1.0, std::abs(ref)))
                << "row " << j << ", col " << c;
          }
        }
      }
    }
  }
}

// A row's result is bitwise the same whatever rows share the call and wherever a column split
// falls: the property that makes a decode token's output independent of its batch.
TEST_P(SkinnyGemmTest, ResultsDoNotDependOnBatchOrSplit) {
  const DType dtype = GetParam();
  const int64_t m = 11, n = 150, k = 77;
  const std::vector<float> x = random_floats(m * k, 7);
  const Weights w_nt = make_weights(n * k, dtype, 8);
  const Weights w_nn = make_weights(k * n, dtype, 9);
  std::vector<float> all_nt(m * n), all_nn(m * n, 0.5f);
  skinny_gemm_nt(dtype, m, 0, n, k, x.data(), k, w_nt.raw.data(), k, 0.0f, all_nt.data(), n);
  skinny_gemm_nn(dtype, m, 0, n, k, x.data(), k, w_nn.raw.data(), n, all_nn.data(), n);
  for (int64_t j = 0; j < m; ++j) {
    for (int64_t split : {1, 37, 64, 149}) {
      std::vector<float> one_nt(n), one_nn(n, 0.5f);
      const float* xj = x.data() + j * k;
      skinny_gemm_nt(dtype, 1, 0, split, k, xj, k, w_nt.raw.data(), k, 0.0f, one_nt.data(), n);
      skinny_gemm_nt(dtype, 1, split, n, k, xj, k, w_nt.raw.data(), k, 0.0f, one_nt.data(), n);
      skinny_gemm_nn(dtype, 1, 0, split, k, xj, k, w_nn.raw.data(), n, one_nn.data(), n);
      skinny_gemm_nn(dtype, 1, split, n, k, xj, k, w_nn.raw.data(), n, one_nn.data(), n);
      ASSERT_EQ(0, std::memcmp(one_nt.data(), all_nt.data() + j * n, n * 4)) << "nt row " << j;
      ASSERT_EQ(0, std::memcmp(one_nn.data(), all_nn.data() + j * n, n * 4)) << "nn row " << j;
    }
  }
}

// Widening is exact for every class of 16-bit value: x = e_i picks out weight i unchanged.
void check_special_values() {
  // (-0 is left out: a sum that starts at +0 turns it into +0, as any float dot product does.)
  const std::vector<float> specials = {0.0f,           1.0f,
                                       -2.5f,          65504.0f,
                                       6.1035156e-05f,                   // fp16 max, min normal
                                       5.9604645e-08f, -3.0517578e-05f,  // fp16 subnormals
                                       1e-30f,         -3.0e38f};        // bf16-only range
  for (DType dtype : {DType::kFloat16, DType::kBFloat16}) {
    for (float value : specials) {
      uint16_t word;
      convert_floats(&value, DType::kFloat32, &word, dtype, 1);
      float expected;
      convert_floats(&word, dtype, &expected, DType::kFloat32, 1);
      if (std::isinf(expected)) continue;  // out of fp16 range; covered below
      const int64_t k = 20;
      std::vector<uint16_t> w(k, 0);
      w[17] = word;  // in the zero-padded K tail
      std::vector<float> x(k, 0.0f);
      x[17] = 1.0f;
      float y = 0.0f;
      skinny_gemm_nt(dtype, 1, 0, 1, k, x.data(), k, w.data(), k, 0.0f, &y, 1);
      EXPECT_EQ(0, std::memcmp(&y, &expected, 4)) << dtype_name(dtype) << " " << value;
    }
    const uint16_t inf_word = dtype == DType::kFloat16 ? 0xfc00 : 0xff80;  // -inf
    const float one = 1.0f;
    float y = 0.0f;
    skinny_gemm_nt(dtype, 1, 0, 1, 1, &one, 1, &inf_word, 1, 0.0f, &y, 1);
    EXPECT_EQ(y, -std::numeric_limits<float>::infinity()) << dtype_name(dtype);
  }
}

TEST(SkinnyGemmWidenTest, SixteenBitSpecialValuesWidenExactly) { check_special_values(); }

#if defined(__SSE__)
// Another library in the process (or torch.set_flush_denormal) may set denormals-are-zero; fp16
// subnormals must still widen exactly, since float32 holds them as normal numbers.
TEST(SkinnyGemmWidenTest, WideningIgnoresDenormalsAreZero) {
  const unsigned int saved = _mm_getcsr();
  _mm_setcsr(saved | 0x8040u);  // DAZ | FTZ
  check_special_values();
  _mm_setcsr(saved);
}
#endif

}  // namespace
}  // namespace lorart::cpu

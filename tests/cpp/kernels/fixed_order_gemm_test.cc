#include "kernels/cpu/fixed_order_gemm.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "core/dtype.h"
#include "kernels/cpu/cpu_kernels.h"
#include "kernels/kernel_test_util.h"
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

using testing_util::max_abs_diff;
using testing_util::random_floats;

// Each weight dtype on each instruction set this CPU runs.
class FixedOrderGemmTest : public ::testing::TestWithParam<std::tuple<DType, GemmIsa>> {
 protected:
  FixedOrderGemmTest() : isa_(std::get<1>(GetParam())) {}
  DType dtype() const { return std::get<0>(GetParam()); }

 private:
  testing_util::ScopedGemmIsa isa_;
};

INSTANTIATE_TEST_SUITE_P(
    WeightDtypesAndIsas, FixedOrderGemmTest,
    ::testing::Combine(::testing::Values(DType::kFloat32, DType::kFloat16, DType::kBFloat16),
                       ::testing::ValuesIn(testing_util::supported_gemm_isas())),
    [](const auto& info) {
      return std::string(dtype_name(std::get<0>(info.param))) + "_" +
             gemm_isa_name(std::get<1>(info.param));
    });

// Every row-group (6, 4, 3, 2, 1), column-block and K-tail path, on strided x and y, for columns
// [n_begin, n_end) only; beta 0 never reads y.
TEST_P(FixedOrderGemmTest, NtMatchesDoubleReference) {
  const DType dtype = this->dtype();
  for (int64_t m : {1, 2, 3, 4, 5, 6, 7, 8, 13, 16, 25}) {
    for (int64_t k : {1, 7, 15, 16, 33, 100}) {
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
        gemm_nt(dtype, m, n_begin, n_end, k, x.data(), ldx, w.raw.data(), ldw, beta, y.data(), ldy);
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

TEST_P(FixedOrderGemmTest, NnMatchesDoubleReference) {
  const DType dtype = this->dtype();
  for (int64_t m : {1, 2, 3, 5, 16}) {
    for (int64_t k : {1, 3, 16}) {
      for (int64_t n_end : {1, 17, 64, 64 + 40, 200}) {
        SCOPED_TRACE(testing::Message() << "m " << m << ", k " << k << ", n_end " << n_end);
        const int64_t n_begin = n_end > 1 ? 1 : 0, ldx = k + 1, ldw = n_end + 3, ldy = n_end + 2;
        const std::vector<float> x = random_floats(m * ldx, 4);
        const Weights w = make_weights(k * ldw, dtype, 5);
        std::vector<float> y = random_floats(m * ldy, 6);
        const std::vector<float> before = y;
        gemm_nn(dtype, m, n_begin, n_end, k, x.data(), ldx, w.raw.data(), ldw, y.data(), ldy);
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
TEST_P(FixedOrderGemmTest, ResultsDoNotDependOnBatchOrSplit) {
  const DType dtype = this->dtype();
  const int64_t m = 11, n = 150, k = 77;
  const std::vector<float> x = random_floats(m * k, 7);
  const Weights w_nt = make_weights(n * k, dtype, 8);
  const Weights w_nn = make_weights(k * n, dtype, 9);
  std::vector<float> all_nt(m * n), all_nn(m * n, 0.5f);
  gemm_nt(dtype, m, 0, n, k, x.data(), k, w_nt.raw.data(), k, 0.0f, all_nt.data(), n);
  gemm_nn(dtype, m, 0, n, k, x.data(), k, w_nn.raw.data(), n, all_nn.data(), n);
  for (int64_t j = 0; j < m; ++j) {
    for (int64_t split : {1, 37, 64, 149}) {
      std::vector<float> one_nt(n), one_nn(n, 0.5f);
      const float* xj = x.data() + j * k;
      gemm_nt(dtype, 1, 0, split, k, xj, k, w_nt.raw.data(), k, 0.0f, one_nt.data(), n);
      gemm_nt(dtype, 1, split, n, k, xj, k, w_nt.raw.data(), k, 0.0f, one_nt.data(), n);
      gemm_nn(dtype, 1, 0, split, k, xj, k, w_nn.raw.data(), n, one_nn.data(), n);
      gemm_nn(dtype, 1, split, n, k, xj, k, w_nn.raw.data(), n, one_nn.data(), n);
      ASSERT_EQ(0, std::memcmp(one_nt.data(), all_nt.data() + j * n, n * 4)) << "nt row " << j;
      ASSERT_EQ(0, std::memcmp(one_nn.data(), all_nn.data() + j * n, n * 4)) << "nn row " << j;
    }
  }
}

// Lanes of the instruction set in use, and whether it fuses multiply-adds.
int lanes() {
  switch (gemm_isa()) {
    case GemmIsa::kAvx512:
      return 16;
    case GemmIsa::kAvx2:
      return 8;
    default:
      return 4;
  }
}

float multiply_add(float a, float b, float c) {
  if (gemm_isa() != GemmIsa::kBaseline) return std::fma(a, b, c);
  const float product = a * b;  // rounded, then added: the baseline has no fused multiply-add
  return product + c;
}

// The documented order of one gemm_nt output, in scalar code: lane l sums x[i] w[i] for
// i = l, l + L, ... in order, then the lanes fold pairwise (lane i + lane i + h, h = L/2 ... 1).
float nt_in_documented_order(const float* x, const float* w, int64_t k) {
  const int num_lanes = lanes();
  std::vector<float> lane(num_lanes, 0.0f);
  const int64_t padded = (k + num_lanes - 1) / num_lanes * num_lanes;
  for (int64_t i = 0; i < padded; ++i) {
    const float xi = i < k ? x[i] : 0.0f, wi = i < k ? w[i] : 0.0f;
    lane[i % num_lanes] = multiply_add(xi, wi, lane[i % num_lanes]);
  }
  for (int h = num_lanes / 2; h >= 1; h /= 2) {
    for (int i = 0; i < h; ++i) lane[i] = lane[i] + lane[i + h];
  }
  return lane[0];
}

// Every output is exactly the documented sum, for every row count and split: the order is the
// kernels' contract, not a property of the shapes tried.
TEST_P(FixedOrderGemmTest, OutputsFollowTheDocumentedOrder) {
  const DType dtype = this->dtype();
  const int64_t n = 70;
  for (int64_t k : {5, 16, 77, 300}) {
    const int64_t m = 31;
    const std::vector<float> x = random_floats(m * k, 30);
    const Weights w = make_weights(n * k, dtype, 31);
    const Weights w_nn = make_weights(k * n, dtype, 32);
    for (int64_t rows : {1, 2, 3, 6, 9, 31}) {
      std::vector<float> nt(rows * n, 0.0f), nn(rows * n, 0.25f);
      gemm_nt(dtype, rows, 0, n, k, x.data(), k, w.raw.data(), k, 0.0f, nt.data(), n);
      gemm_nn(dtype, rows, 0, n, k, x.data(), k, w_nn.raw.data(), n, nn.data(), n);
      for (int64_t j = 0; j < rows; ++j) {
        for (int64_t c = 0; c < n; ++c) {
          const float want_nt = nt_in_documented_order(&x[j * k], &w.values[c * k], k);
          float want_nn = 0.25f;
          for (int64_t r = 0; r < k; ++r) {
            want_nn = multiply_add(x[j * k + r], w_nn.values[r * n + c], want_nn);
          }
          ASSERT_EQ(0, std::memcmp(&nt[j * n + c], &want_nt, 4))
              << "nt k " << k << ", " << rows << " rows, row " << j << ", col " << c << ": "
              << nt[j * n + c] << " vs " << want_nt;
          ASSERT_EQ(0, std::memcmp(&nn[j * n + c], &want_nn, 4))
              << "nn k " << k << ", " << rows << " rows, row " << j << ", col " << c;
        }
      }
    }
  }
}

// 16-bit weights give bitwise what their float32 values give, at every row count: lora_gemm
// widens a long segment's adapter to float32 once and a short one's in registers.
TEST_P(FixedOrderGemmTest, SixteenBitWeightsMatchTheirFloat32Values) {
  const DType dtype = this->dtype();
  const int64_t n = 40, k = 70;
  const std::vector<float> x = random_floats(20 * k, 33);
  const Weights w = make_weights(n * k, dtype, 34);
  for (int64_t m : {1, 5, 20}) {
    std::vector<float> low(m * n), wide(m * n), low_nn(m * k, 1.0f), wide_nn(m * k, 1.0f);
    gemm_nt(dtype, m, 0, n, k, x.data(), k, w.raw.data(), k, 0.0f, low.data(), n);
    gemm_nt(DType::kFloat32, m, 0, n, k, x.data(), k, w.values.data(), k, 0.0f, wide.data(), n);
    // nn reads the same weights as [n, k]: y [m, k] += x [m, n] @ w.
    gemm_nn(dtype, m, 0, k, n, x.data(), k, w.raw.data(), k, low_nn.data(), k);
    gemm_nn(DType::kFloat32, m, 0, k, n, x.data(), k, w.values.data(), k, wide_nn.data(), k);
    EXPECT_EQ(0, std::memcmp(low.data(), wide.data(), low.size() * 4))
        << m << " rows: max |diff| " << max_abs_diff(low.data(), wide.data(), m * n);
    EXPECT_EQ(0, std::memcmp(low_nn.data(), wide_nn.data(), low_nn.size() * 4)) << m << " rows";
  }
}

// bfloat16 weights in the k32-interleaved layout give bitwise the row-major results: every K with
// full blocks only, a tail shorter or longer than a register (16 / 8 / 4 lanes), or no full
// block; every row-group tile; column splits and beta; on every instruction set.
TEST(FixedOrderGemmLayoutTest, InterleavedBfloat16MatchesRowMajorBitwise) {
  for (GemmIsa isa : testing_util::supported_gemm_isas()) {
    SCOPED_TRACE(gemm_isa_name(isa));
    testing_util::ScopedGemmIsa scoped(isa);
    for (int64_t k : {7, 16, 31, 32, 33, 48, 50, 64, 96, 101, 2048}) {
      const int64_t n = 37, ldw = k + 3;  // rows padded: the layout is per row
      const Weights w = make_weights(n * ldw, DType::kBFloat16, 71 + static_cast<uint32_t>(k));
      std::vector<uint16_t> interleaved(n * ldw);
      std::memcpy(interleaved.data(), w.raw.data(), interleaved.size() * 2);
      to_layout(interleaved.data(), n, k, ldw, WeightLayout::kK32Interleaved);
      if (k >= 32) EXPECT_NE(0, std::memcmp(interleaved.data(), w.raw.data(), n * ldw * 2));
      const std::vector<float> x = random_floats(20 * k, 72);
      for (int64_t m : {1, 2, 3, 4, 5, 6, 7, 8, 13, 20}) {
        for (float beta : {0.0f, 0.5f}) {
          std::vector<float> row_major(m * n, 1.0f), ours(m * n, 1.0f);
          gemm_nt(DType::kBFloat16, m, 0, n, k, x.data(), k, w.raw.data(), ldw, beta,
                  row_major.data(), n);
          gemm_nt(DType::kBFloat16, m, 0, 11, k, x.data(), k, interleaved.data(), ldw, beta,
                  ours.data(), n, WeightLayout::kK32Interleaved);
          gemm_nt(DType::kBFloat16, m, 11, n, k, x.data(), k, interleaved.data(), ldw, beta,
                  ours.data(), n, WeightLayout::kK32Interleaved);
          EXPECT_EQ(0, std::memcmp(row_major.data(), ours.data(), ours.size() * 4))
              << "k " << k << ", m " << m << ", beta " << beta << ": max |diff| "
              << max_abs_diff(row_major.data(), ours.data(), m * n);
        }
      }
    }
  }
}

TEST(FixedOrderGemmLayoutTest, InterleavingPairsEachBlocksHalvesAndKeepsTheTail) {
  std::vector<uint16_t> row(70);
  for (int i = 0; i < 70; ++i) row[i] = static_cast<uint16_t>(i);
  interleave_k32(row.data(), 70);
  for (int b = 0; b < 64; b += 32) {
    for (int j = 0; j < 16; ++j) {
      EXPECT_EQ(row[b + 2 * j], b + j);
      EXPECT_EQ(row[b + 2 * j + 1], b + 16 + j);
    }
  }
  for (int i = 64; i < 70; ++i) EXPECT_EQ(row[i], i);
}

TEST(FixedOrderGemmLayoutTest, InterleavedLayoutIsForBfloat16Only) {
  const std::vector<float> x(32, 1.0f), w(32, 1.0f);
  float y = 0.0f;
  testing_util::expect_error<InvalidArgument>(
      [&] {
        gemm_nt(DType::kFloat32, 1, 0, 1, 32, x.data(), 32, w.data(), 32, 0.0f, &y, 1,
                WeightLayout::kK32Interleaved);
      },
      "k32-interleaved layout is for bfloat16 weights, got float32");
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
      gemm_nt(dtype, 1, 0, 1, k, x.data(), k, w.data(), k, 0.0f, &y, 1);
      EXPECT_EQ(0, std::memcmp(&y, &expected, 4)) << dtype_name(dtype) << " " << value;
    }
    const uint16_t inf_word = dtype == DType::kFloat16 ? 0xfc00 : 0xff80;  // -inf
    const float one = 1.0f;
    float y = 0.0f;
    gemm_nt(dtype, 1, 0, 1, 1, &one, 1, &inf_word, 1, 0.0f, &y, 1);
    EXPECT_EQ(y, -std::numeric_limits<float>::infinity()) << dtype_name(dtype);
  }
}

void check_special_values_on_every_isa() {
  for (GemmIsa isa : testing_util::supported_gemm_isas()) {
    SCOPED_TRACE(gemm_isa_name(isa));
    testing_util::ScopedGemmIsa scoped(isa);
    check_special_values();
  }
}

TEST(FixedOrderGemmWidenTest, SixteenBitSpecialValuesWidenExactly) {
  check_special_values_on_every_isa();
}

#if defined(__SSE__)
// Another library in the process (or torch.set_flush_denormal) may set denormals-are-zero; fp16
// subnormals must still widen exactly, since float32 holds them as normal numbers.
TEST(FixedOrderGemmWidenTest, WideningIgnoresDenormalsAreZero) {
  const unsigned int saved = _mm_getcsr();
  _mm_setcsr(saved | 0x8040u);  // DAZ | FTZ
  check_special_values_on_every_isa();
  _mm_setcsr(saved);
}
#endif

TEST(FixedOrderGemmIsaTest, RejectsAnInstructionSetTheCpuLacks) {
  const std::vector<GemmIsa> supported = testing_util::supported_gemm_isas();
  EXPECT_EQ(supported.front(), GemmIsa::kBaseline);
  EXPECT_EQ(supported.back(), gemm_isa());  // the default is the best one
  if (supported.back() != GemmIsa::kAvx512) {
    testing_util::expect_error<InvalidArgument>([] { set_gemm_isa(GemmIsa::kAvx512); },
                                                "this CPU has no avx512");
  }
}

}  // namespace
}  // namespace lorart::cpu

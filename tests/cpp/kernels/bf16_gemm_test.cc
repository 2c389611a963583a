#include "kernels/cpu/bf16_gemm.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "core/dtype.h"
#include "core/errors.h"
#include "kernels/cpu/cpu_kernels.h"
#include "kernels/kernel_test_util.h"
#include "test_util.h"

namespace lorart::cpu {
namespace {

using testing_util::random_floats;

std::vector<Bf16Isa> supported_isas() {
  const Bf16Isa saved = bf16_isa();
  std::vector<Bf16Isa> out;
  for (Bf16Isa isa : {Bf16Isa::kEmulated, Bf16Isa::kAvx512Bf16, Bf16Isa::kAmx}) {
    try {
      set_bf16_isa(isa);
      out.push_back(isa);
    } catch (const InvalidArgument&) {
    }
  }
  set_bf16_isa(saved);
  return out;
}

class ScopedBf16Isa {
 public:
  explicit ScopedBf16Isa(Bf16Isa isa) : saved_(bf16_isa()) { set_bf16_isa(isa); }
  ~ScopedBf16Isa() { set_bf16_isa(saved_); }

 private:
  Bf16Isa saved_;
};

uint32_t bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

// Index of the first element whose bits differ, or -1.
int64_t first_difference(const std::vector<float>& a, const std::vector<float>& b) {
  for (size_t i = 0; i < a.size(); ++i) {
    if (bits(a[i]) != bits(b[i])) return static_cast<int64_t>(i);
  }
  return -1;
}

std::vector<uint16_t> to_bf16(const std::vector<float>& f) {
  std::vector<uint16_t> out(f.size());
  convert_floats(f.data(), DType::kFloat32, out.data(), DType::kBFloat16, f.size());
  return out;
}

float bf16_value(float f) { return bfloat16_to_float(float_to_bfloat16(f)); }

std::vector<float> call(const std::vector<float>& x, int64_t ldx, const void* w, DType dtype,
                        int64_t m, int64_t n, int64_t k) {
  std::vector<float> y(m * n, std::numeric_limits<float>::quiet_NaN());
  linear_bf16(x.data(), ldx, w, dtype, m, n, k, 0.0f, y.data(), n);
  return y;
}

class Bf16GemmTest : public ::testing::TestWithParam<Bf16Isa> {
 protected:
  Bf16GemmTest() : isa_(GetParam()) {}

 private:
  ScopedBf16Isa isa_;
};

INSTANTIATE_TEST_SUITE_P(Isas, Bf16GemmTest, ::testing::ValuesIn(supported_isas()),
                         [](const auto& info) { return std::string(bf16_isa_name(info.param)); });

// Against a float64 sum of the bf16-rounded inputs, within float32 accumulation error relative
// to sum |x||w|; strided x and y, beta 0 never reads y (NaN there), beta 1 adds.
TEST_P(Bf16GemmTest, MatchesDoubleReferenceOnRoundedInputs) {
  for (int64_t m : {1, 3, 16, 17, 40}) {
    for (int64_t k : {1, 2, 31, 32, 33, 100, 512}) {
      for (int64_t n : {1, 15, 17, 70}) {
        for (float beta : {0.0f, 1.0f}) {
          SCOPED_TRACE(testing::Message()
                       << "m " << m << " k " << k << " n " << n << " beta " << beta);
          const int64_t ldx = k + 3, ldy = n + 5;
          const std::vector<float> x = random_floats(m * ldx, 1, -2.0f, 2.0f);
          const std::vector<uint16_t> w = to_bf16(random_floats(n * k, 2));
          std::vector<float> y = random_floats(m * ldy, 3);
          if (beta == 0.0f) {
            for (float& v : y) v = std::numeric_limits<float>::quiet_NaN();
          }
          const std::vector<float> before = y;
          linear_bf16(x.data(), ldx, w.data(), DType::kBFloat16, m, n, k, beta, y.data(), ldy);
          for (int64_t i = 0; i < m; ++i) {
            for (int64_t c = 0; c < ldy; ++c) {
              const float got = y[i * ldy + c];
              if (c >= n) {
                ASSERT_EQ(bits(got), bits(before[i * ldy + c])) << "wrote past column n";
                continue;
              }
              double ref = beta == 0.0f ? 0.0 : before[i * ldy + c], mag = std::abs(ref);
              for (int64_t j = 0; j < k; ++j) {
                const double p =
                    double{bf16_value(x[i * ldx + j])} * bfloat16_to_float(w[c * k + j]);
                ref += p;
                mag += std::abs(p);
              }
              const double tol = (k / 16.0 + 8.0) * 0x1p-24 * mag + 1e-30;
              ASSERT_LE(std::abs(got - ref), tol) << "row " << i << " col " << c;
            }
          }
        }
      }
    }
  }
}

// A row's output is bitwise the same alone and at any position of any batch, at any thread count.
TEST_P(Bf16GemmTest, BatchInvariant) {
  for (int64_t k : {64, 77, 200, 2048}) {
    const int64_t n = k == 2048 ? 333 : 131;
    const std::vector<uint16_t> w = to_bf16(random_floats(n * k, 5));
    const std::vector<float> x = random_floats(300 * k, 6, -3.0f, 3.0f);
    std::vector<std::vector<float>> alone(300);
    {
      testing_util::ScopedThreads one(1);
      for (int64_t r = 0; r < 300; ++r) {
        const std::vector<float> row(x.begin() + r * k, x.begin() + (r + 1) * k);
        alone[r] = call(row, k, w.data(), DType::kBFloat16, 1, n, k);
      }
    }
    for (int threads : testing_util::kThreadCounts) {
      testing_util::ScopedThreads scope(threads);
      for (int64_t m : {1, 7, 17, 64, 300}) {
        for (int64_t offset : {int64_t{0}, 300 - m}) {
          SCOPED_TRACE(testing::Message() << "k " << k << " threads " << threads << " m " << m
                                          << " offset " << offset);
          const std::vector<float> xs(x.begin() + offset * k, x.begin() + (offset + m) * k);
          const std::vector<float> y = call(xs, k, w.data(), DType::kBFloat16, m, n, k);
          for (int64_t r = 0; r < m; ++r) {
            const std::vector<float> got(y.begin() + r * n, y.begin() + (r + 1) * n);
            ASSERT_EQ(first_difference(got, alone[offset + r]), -1) << "row " << r;
          }
        }
      }
    }
  }
}

// A column's output does not depend on which other weight rows share the call (its position in
// a tile or in a thread's share).
TEST_P(Bf16GemmTest, ColumnsIndependentOfTheirNeighbours) {
  const int64_t m = 37, k = 96, n = 150;
  const std::vector<uint16_t> w = to_bf16(random_floats(n * k, 7));
  const std::vector<float> x = random_floats(m * k, 8);
  const std::vector<float> full = call(x, k, w.data(), DType::kBFloat16, m, n, k);
  for (int64_t begin : {1, 5, 16, 77}) {
    for (int64_t count : {1, 3, 17, 40}) {
      const std::vector<float> part =
          call(x, k, w.data() + begin * k, DType::kBFloat16, m, count, k);
      for (int64_t r = 0; r < m; ++r) {
        for (int64_t c = 0; c < count; ++c) {
          ASSERT_EQ(bits(part[r * count + c]), bits(full[r * n + begin + c]))
              << "begin " << begin << " count " << count << " row " << r << " col " << c;
        }
      }
    }
  }
}

// Weights on a cache-line boundary (read in place by AMX) and off it (copied into aligned panels
// at prefill sizes) give the same bits, at decode and prefill row counts.
TEST_P(Bf16GemmTest, WeightAlignmentDoesNotChangeResults) {
  const int64_t k = 128, n = 70;
  const std::vector<uint16_t> values = to_bf16(random_floats(n * k, 13));
  std::vector<uint16_t> storage(n * k + 64);
  const auto address = reinterpret_cast<uintptr_t>(storage.data());
  uint16_t* aligned = storage.data() + ((64 - address % 64) % 64) / 2;
  for (int64_t m : {1, 8, 40}) {
    const std::vector<float> x = random_floats(m * k, 14);
    std::copy(values.begin(), values.end(), aligned);
    const std::vector<float> on = call(x, k, aligned, DType::kBFloat16, m, n, k);
    std::copy(values.begin(), values.end(), aligned + 1);
    const std::vector<float> off = call(x, k, aligned + 1, DType::kBFloat16, m, n, k);
    EXPECT_EQ(first_difference(on, off), -1) << "m " << m;
  }
}

// float32 and float16 weights give exactly the result of their bf16 rounding.
TEST_P(Bf16GemmTest, Float32AndFloat16WeightsAreRoundedToBf16) {
  for (int64_t k : {48, 64, 77}) {
    const int64_t m = 20, n = 45;
    const std::vector<float> x = random_floats(m * k, 9);
    const std::vector<float> wf = random_floats(n * k, 10);
    std::vector<uint16_t> wh(n * k);
    convert_floats(wf.data(), DType::kFloat32, wh.data(), DType::kFloat16, wf.size());
    std::vector<float> wh_values(n * k);
    convert_floats(wh.data(), DType::kFloat16, wh_values.data(), DType::kFloat32, wh.size());
    const std::vector<float> from_bf16 = call(x, k, to_bf16(wf).data(), DType::kBFloat16, m, n, k);
    EXPECT_EQ(first_difference(call(x, k, wf.data(), DType::kFloat32, m, n, k), from_bf16), -1);
    EXPECT_EQ(first_difference(call(x, k, wh.data(), DType::kFloat16, m, n, k),
                               call(x, k, to_bf16(wh_values).data(), DType::kBFloat16, m, n, k)),
              -1);
  }
}

// Interleaved bfloat16 weights give the row-major call on activations interleaved the same way
// (float32 values moved, so rounding them is unchanged), at decode and prefill row counts, with K
// a multiple of 32 (AMX reads in place) or not (a tail in order: shorter than a block, shorter
// than half a block, longer), K < 32 (nothing interleaved).
TEST_P(Bf16GemmTest, InterleavedWeightsPairLikeInterleavedActivations) {
  for (int64_t k : {20, 32, 40, 64, 80, 2048}) {
    const int64_t n = 45;
    std::vector<uint16_t> w = to_bf16(random_floats(n * k, 21));
    to_layout(w.data(), n, k, k, WeightLayout::kK32Interleaved);
    for (int64_t m : {1, 8, 40}) {
      const std::vector<float> x = random_floats(m * k, 22);
      std::vector<float> x_interleaved = x;
      for (int64_t r = 0; r < m; ++r) {
        float* row = x_interleaved.data() + r * k;
        for (int64_t b = 0; b + 32 <= k; b += 32) {
          for (int j = 0; j < 16; ++j) {
            row[b + 2 * j] = x[r * k + b + j];
            row[b + 2 * j + 1] = x[r * k + b + 16 + j];
          }
        }
      }
      std::vector<float> y(m * n, std::numeric_limits<float>::quiet_NaN());
      linear_bf16(x.data(), k, w.data(), DType::kBFloat16, m, n, k, 0.0f, y.data(), n,
                  WeightLayout::kK32Interleaved);
      EXPECT_EQ(first_difference(y, call(x_interleaved, k, w.data(), DType::kBFloat16, m, n, k)),
                -1)
          << "k " << k << ", m " << m;
    }
  }
}

TEST(Bf16GemmErrors, RejectsIntegerWeights) {
  const float x[4] = {};
  float y[4] = {};
  const int32_t w[4] = {};
  EXPECT_THROW(linear_bf16(x, 2, w, DType::kInt32, 2, 2, 2, 0.0f, y, 2), InvalidArgument);
  const float wf[4] = {};
  testing_util::expect_error<InvalidArgument>(
      [&] {
        linear_bf16(x, 2, wf, DType::kFloat32, 2, 2, 2, 0.0f, y, 2, WeightLayout::kK32Interleaved);
      },
      "k32-interleaved layout is for bfloat16 weights, got float32");
}

// Values over the whole exponent range (subnormal products and sums included, no inf / NaN).
std::vector<float> wide_floats(size_t count, uint32_t seed, int min_exp, int max_exp) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> exponent(min_exp, max_exp);
  std::uniform_real_distribution<float> mantissa(1.0f, 2.0f);
  std::vector<float> out(count);
  for (float& v : out) v = std::ldexp(mantissa(rng), exponent(rng)) * (rng() & 1 ? 1 : -1);
  return out;
}

// The plain C++ emulation reproduces vdpbf16ps bitwise, on ordinary values and near underflow.
TEST(Bf16GemmIsas, EmulationMatchesAvx512Bf16Bitwise) {
  const std::vector<Bf16Isa> isas = supported_isas();
  if (std::find(isas.begin(), isas.end(), Bf16Isa::kAvx512Bf16) == isas.end()) {
    GTEST_SKIP() << "no AVX512-BF16 on this CPU";
  }
  for (auto [lo, hi] : {std::pair{-8, 8}, std::pair{-140, -50}, std::pair{-75, -55}}) {
    for (int64_t k : {32, 45, 256}) {
      for (int64_t m : {1, 6, 9}) {
        SCOPED_TRACE(testing::Message()
                     << "exponents " << lo << ".." << hi << " k " << k << " m " << m);
        const int64_t n = 37;
        const std::vector<float> x = wide_floats(m * k, 11, lo, hi);
        const std::vector<uint16_t> w = to_bf16(wide_floats(n * k, 12, lo, hi));
        std::vector<float> hw, emu;
        {
          ScopedBf16Isa isa(Bf16Isa::kAvx512Bf16);
          hw = call(x, k, w.data(), DType::kBFloat16, m, n, k);
        }
        {
          ScopedBf16Isa isa(Bf16Isa::kEmulated);
          emu = call(x, k, w.data(), DType::kBFloat16, m, n, k);
        }
        const int64_t diff = first_difference(hw, emu);
        ASSERT_EQ(diff, -1) << "hw " << hw[diff] << " emulated " << emu[diff];
      }
    }
  }
}

}  // namespace
}  // namespace lorart::cpu

// GPU tests of cuda::linear (csrc/kernels/cuda/gemm/): every weight dtype at both precisions
// against a float64 reference on the operands the kernel multiplies (x rounded to w's 16-bit type
// on the tensor-core path), odd shapes (K not a multiple of 16 or 8, N and M not multiples of a
// tile), beta, strided and misaligned x / y, poisoned outputs, and batch invariance across the
// decode, middle and prefill tile shapes. Each skips, saying so, without a GPU; the layout
// refusals need none.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/errors.h"
#include "kernels/cuda/cuda_test_util.h"
#include "kernels/cuda/gemm/gemm.h"
#include "kernels/exec_context.h"
#include "kernels/ops.h"
#include "test_util.h"

namespace lorart {
namespace {

using testing_util::DeviceArray;
using testing_util::random_floats;

// Weights stored as `dtype` (raw bytes), and the float values they hold.
struct HostWeights {
  std::vector<uint8_t> bytes;
  std::vector<float> values;
};

HostWeights make_weights(DType dtype, int64_t rows, int64_t stride, uint32_t seed) {
  const std::vector<float> f = random_floats(rows * stride, seed);
  HostWeights w;
  w.bytes.resize(f.size() * dtype_size(dtype));
  convert_floats(f.data(), DType::kFloat32, w.bytes.data(), dtype, f.size());
  w.values.resize(f.size());
  convert_floats(w.bytes.data(), dtype, w.values.data(), DType::kFloat32, f.size());
  return w;
}

// The value the kernel multiplies for activation v: rounded to w's type on the tensor-core path.
float operand(float v, DType w_dtype, bool tensor_cores) {
  if (!tensor_cores) return v;
  return w_dtype == DType::kBFloat16 ? bfloat16_to_float(float_to_bfloat16(v))
                                     : half_to_float(float_to_half(v));
}

struct Case {
  int64_t m, n, k;
  float beta;
  int64_t x_pad = 0, x_offset = 0, y_pad = 0;  // row stride k + x_pad, first element x_offset
};

// Runs one case and checks every output and every padding element of y.
// Error bound: the operands are exact in float32 and so are their products (bf16 x bf16 and
// fp16 x fp16 fit in 24 bits), so the error is the float32 accumulation's: at most
// c * steps * 2^-24 * sum |x w| with steps = ceil(K / 16) tensor-core steps (each an accumulate
// whose internal alignment truncates, hence c = 4) or K fused multiply-adds (c = 2), plus one
// rounding of beta * y.
void check_case(const Case& c, DType w_dtype, Precision precision) {
  SCOPED_TRACE(testing::Message() << c.m << "x" << c.n << "x" << c.k << " beta " << c.beta << " w "
                                  << dtype_name(w_dtype) << " precision "
                                  << precision_name(precision) << " x_pad " << c.x_pad
                                  << " x_offset " << c.x_offset << " y_pad " << c.y_pad);
  const bool tc = precision == Precision::kBFloat16 && w_dtype != DType::kFloat32;
  const int64_t xs = c.k + c.x_pad, ys = c.n + c.y_pad;
  const std::vector<float> x = random_floats(c.x_offset + c.m * xs + 1, 11);
  const HostWeights w = make_weights(w_dtype, c.n, c.k, 12);
  std::vector<float> y0 = random_floats(c.m * ys, 13);
  // Poison: beta == 0 must never read y (NaN in, no NaN out); padding must stay untouched.
  if (c.beta == 0.0f) y0.assign(y0.size(), std::nanf(""));
  for (int64_t i = 0; i < c.m; ++i) {
    for (int64_t j = c.n; j < ys; ++j) y0[i * ys + j] = std::nanf("");
  }
  DeviceArray<float> dx(x), dy(y0);
  DeviceArray<uint8_t> dw(w.bytes.empty() ? std::vector<uint8_t>(2) : w.bytes);
  const LinearParams p{dx.data() + c.x_offset,
                       xs,
                       WeightRef{dw.data(), w_dtype, nullptr, c.k},
                       dy.data(),
                       ys,
                       c.m,
                       c.n,
                       c.k,
                       c.beta,
                       precision};
  cuda::linear(p, nullptr);
  const std::vector<float> y = dy.to_host();
  const double steps = tc ? std::ceil(c.k / 16.0) : static_cast<double>(c.k);
  const double coef = (tc ? 4.0 : 2.0) * (steps + 1) * std::ldexp(1.0, -24);
  int64_t bad = 0;
  for (int64_t i = 0; i < c.m; ++i) {
    for (int64_t j = 0; j < c.n; ++j) {
      double ref = 0, mag = 0;
      for (int64_t kk = 0; kk < c.k; ++kk) {
        const double prod =
            double(operand(x[c.x_offset + i * xs + kk], w_dtype, tc)) * w.values[j * c.k + kk];
        ref += prod;
        mag += std::abs(prod);
      }
      double beta_term = 0;
      if (c.beta != 0.0f) beta_term = double(c.beta) * y0[i * ys + j];
      const double tol = coef * mag + std::ldexp(std::abs(ref + beta_term), -23) + 1e-30;
      const float got = y[i * ys + j];
      if (!(std::abs(got - (ref + beta_term)) <= tol) && bad++ < 5) {
        ADD_FAILURE() << "y[" << i << ", " << j << "] = " << got << ", want " << ref + beta_term
                      << " +- " << tol;
      }
    }
    for (int64_t j = c.n; j < ys; ++j) {
      if (!std::isnan(y[i * ys + j]) && bad++ < 5) {
        ADD_FAILURE() << "padding y[" << i << ", " << j << "] was written";
      }
    }
  }
  EXPECT_EQ(bad, 0);
}

const Case kCases[] = {
    {1, 1, 1, 0.0f},
    {1, 8, 16, 0.0f},
    {3, 17, 5, 0.0f},               // K < 8: element copies, N tail
    {2, 40, 24, 0.5f},              // K a multiple of 8, not of 16: a half tensor-core step
    {16, 33, 100, 0.0f},            // decode tile, K % 8 != 0
    {17, 130, 72, -1.5f},           // middle tile, N tail
    {64, 257, 264, 0.0f, 8},        // middle tile, strided x on the 16-byte path
    {65, 129, 136, 0.0f, 3, 1, 5},  // prefill tile, misaligned strided x, strided y
    {300, 200, 264, 0.25f, 0, 0, 3},
    {5, 1000, 4104, 0.0f},  // many pipeline stages, a tail step
    {4, 9, 0, 0.5f},        // K = 0: y = beta * y
};

TEST(CudaLinearTest, MatchesFloat64ReferenceAtBFloat16Precision) {
  LORART_REQUIRE_GPU();
  for (const DType dt : {DType::kBFloat16, DType::kFloat16, DType::kFloat32}) {
    for (const Case& c : kCases) check_case(c, dt, Precision::kBFloat16);
  }
}

TEST(CudaLinearTest, MatchesFloat64ReferenceAtFloat32Precision) {
  LORART_REQUIRE_GPU();
  for (const DType dt : {DType::kBFloat16, DType::kFloat16, DType::kFloat32}) {
    for (const Case& c : kCases) check_case(c, dt, Precision::kFloat32);
  }
}

// Row i of y never depends on M or on the other rows: rows of an M = 1, 37 and 300 call (the
// decode, middle and prefill tile shapes) are bitwise equal.
void check_invariance(DType w_dtype, Precision precision, int64_t n, int64_t k, int64_t x_pad) {
  SCOPED_TRACE(testing::Message() << dtype_name(w_dtype) << " " << precision_name(precision)
                                  << " n " << n << " k " << k << " x_pad " << x_pad);
  const int64_t m = 300, xs = k + x_pad;
  const std::vector<float> x = random_floats(m * xs, 21);
  const HostWeights w = make_weights(w_dtype, n, k, 22);
  DeviceArray<float> dx(x);
  DeviceArray<uint8_t> dw(w.bytes);
  auto run = [&](int64_t row0, int64_t rows) {
    DeviceArray<float> dy = DeviceArray<float>::poisoned(rows * n);
    cuda::linear({dx.data() + row0 * xs, xs, WeightRef{dw.data(), w_dtype, nullptr, k}, dy.data(),
                  n, rows, n, k, 0.0f, precision},
                 nullptr);
    return dy.to_host();
  };
  const std::vector<float> all = run(0, m), first = run(0, 37);
  for (const int64_t row : {int64_t{0}, int64_t{5}, int64_t{36}}) {
    const std::vector<float> one = run(row, 1);
    EXPECT_EQ(std::memcmp(one.data(), all.data() + row * n, n * sizeof(float)), 0)
        << "row " << row << ": M = 1 vs M = 300";
    EXPECT_EQ(std::memcmp(one.data(), first.data() + row * n, n * sizeof(float)), 0)
        << "row " << row << ": M = 1 vs M = 37";
  }
  EXPECT_EQ(std::memcmp(first.data(), all.data(), first.size() * sizeof(float)), 0)
      << "M = 37 vs M = 300";
  for (const float v : all) ASSERT_FALSE(std::isnan(v));
}

TEST(CudaLinearTest, RowsDoNotDependOnM) {
  LORART_REQUIRE_GPU();
  for (const DType dt : {DType::kBFloat16, DType::kFloat16}) {
    check_invariance(dt, Precision::kBFloat16, 520, 4104, 0);  // 16-byte copies, a tail step
    check_invariance(dt, Precision::kBFloat16, 130, 100, 3);   // element copies
  }
  check_invariance(DType::kFloat32, Precision::kBFloat16, 130, 300, 0);
  check_invariance(DType::kBFloat16, Precision::kFloat32, 130, 300, 1);
}

// ops::linear on a CUDA context dispatches to the kernel.
TEST(CudaLinearTest, OpDispatchesToTheKernel) {
  LORART_REQUIRE_GPU();
  const int64_t m = 3, n = 20, k = 32;
  const std::vector<float> x = random_floats(m * k, 31);
  const HostWeights w = make_weights(DType::kBFloat16, n, k, 32);
  DeviceArray<float> dx(x), dy = DeviceArray<float>::poisoned(m * n);
  DeviceArray<uint8_t> dw(w.bytes);
  ExecContext ctx{Device::cuda(0), nullptr, 0, Precision::kBFloat16};
  ops::linear(ctx, Tensor(dx.data(), DType::kFloat32, {m, k}, Device::cuda(0)),
              Tensor(dw.data(), DType::kBFloat16, {n, k}, Device::cuda(0)),
              Tensor(dy.data(), DType::kFloat32, {m, n}, Device::cuda(0)));
  const std::vector<float> y = dy.to_host();
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      double ref = 0, mag = 0;
      for (int64_t kk = 0; kk < k; ++kk) {
        const double prod =
            double(operand(x[i * k + kk], DType::kBFloat16, true)) * w.values[j * k + kk];
        ref += prod;
        mag += std::abs(prod);
      }
      EXPECT_NEAR(y[i * n + j], ref, 4.0 * 3 * std::ldexp(mag, -24) + 1e-30);
    }
  }
}

// The k32-interleaved layout is the CPU's: refused on CUDA before any device memory is touched
// (so this runs without a GPU: the tensors only claim to be on the device).
TEST(CudaLinearTest, RefusesTheInterleavedLayout) {
  std::vector<float> fake(64);
  const Device gpu = Device::cuda(0);
  ExecContext ctx{gpu, nullptr, 0, Precision::kBFloat16};
  const Tensor x(fake.data(), DType::kFloat32, {1, 32}, gpu);
  const Tensor w(fake.data(), DType::kBFloat16, {2, 32}, gpu);
  const Tensor y(fake.data(), DType::kFloat32, {1, 2}, gpu);
  try {
    ops::linear(ctx, x, w, y, 0.0f, Tensor(), WeightLayout::kK32Interleaved);
    ADD_FAILURE() << "linear accepted the k32-interleaved layout on CUDA";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("row-major on CUDA"), std::string::npos) << e.what();
  }
  try {
    ops::relayout_weight(ctx, w, WeightLayout::kK32Interleaved);
    ADD_FAILURE() << "relayout_weight accepted the k32-interleaved layout on CUDA";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("CUDA weights stay row-major"), std::string::npos)
        << e.what();
  }
  EXPECT_EQ(ops::preferred_layout(ctx, DType::kBFloat16), WeightLayout::kRowMajor);
  // The kernel's own check, for callers that bypass the op.
  LinearParams p{nullptr,
                 32,
                 WeightRef{nullptr, DType::kBFloat16, nullptr, 32, WeightLayout::kK32Interleaved},
                 nullptr,
                 2,
                 1,
                 2,
                 32,
                 0.0f,
                 Precision::kBFloat16};
  EXPECT_THROW(cuda::linear(p, nullptr), InvalidArgument);
}

}  // namespace
}  // namespace lorart

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "core/errors.h"
#include "kernels/kernel_test_util.h"
#include "kernels/ops.h"
#include "test_util.h"

#if defined(__SSE__)
#include <xmmintrin.h>
#endif

namespace lorart {
namespace {

using testing_util::expect_error;
using testing_util::random_floats;
using testing_util::rows_view;

std::vector<float> inv_freq(int32_t head_dim) {
  std::vector<float> inv(head_dim / 2);
  for (int32_t i = 0; i < head_dim / 2; ++i) inv[i] = std::pow(10000.0f, -2.0f * i / head_dim);
  return inv;
}

TEST(RmsNormTest, MatchesDoubleReferenceAndMayRunInPlace) {
  constexpr int64_t kT = 4, kH = 37, kStride = 45;
  std::vector<float> x = random_floats(kT * kStride, 1, -3.0f, 3.0f);
  std::fill_n(x.begin() + 2 * kStride, kH, 0.0f);  // eps keeps an all-zero row finite
  const std::vector<float> w = random_floats(kH, 2, 0.5f, 1.5f);
  const float eps = 1e-5f;
  std::vector<float> out(kT * kH);
  const Tensor weight(const_cast<float*>(w.data()), DType::kFloat32, {kH});
  ops::rms_norm(ExecContext::cpu(), rows_view(x.data(), kT, kH, kStride), weight, eps,
                Tensor(out.data(), DType::kFloat32, {kT, kH}));
  for (int64_t t = 0; t < kT; ++t) {
    double sum = 0.0;
    for (int64_t i = 0; i < kH; ++i) sum += double{x[t * kStride + i]} * x[t * kStride + i];
    const double inv = 1.0 / std::sqrt(sum / kH + eps);
    for (int64_t i = 0; i < kH; ++i) {
      const double ref = w[i] * x[t * kStride + i] * inv;
      EXPECT_NEAR(out[t * kH + i], ref, 1e-5 * std::max(1.0, std::abs(ref))) << t << ", " << i;
    }
  }
  const Tensor strided = rows_view(x.data(), kT, kH, kStride);
  ops::rms_norm(ExecContext::cpu(), strided, weight, eps, strided);
  for (int64_t t = 0; t < kT; ++t) {
    for (int64_t i = 0; i < kH; ++i)
      EXPECT_EQ(x[t * kStride + i], out[t * kH + i]) << t << ", " << i;
  }
}

#if defined(__SSE__)
// Denormals-are-zero set on the calling thread only: a row normalised by an OpenMP worker (a
// batch past the parallel threshold) gets the caller's bits too.
TEST(RmsNormTest, WorkersComputeInTheCallersFloatMode) {
  constexpr int64_t kT = 80, kH = 1024;
  std::vector<float> x = random_floats(kT * kH, 3);
  for (float& v : x) v *= 1e-39f;  // float32 subnormals
  const std::vector<float> w = random_floats(kH, 4, 0.5f, 1.5f);
  const Tensor weight(const_cast<float*>(w.data()), DType::kFloat32, {kH});
  testing_util::ScopedThreads two(2);
  std::vector<float> all(kT * kH), alone(kH);
  auto norm = [&](int64_t t, int64_t rows, float* out) {
    ops::rms_norm(ExecContext::cpu(), rows_view(x.data() + t * kH, rows, kH, kH), weight, 1e-6f,
                  Tensor(out, DType::kFloat32, {rows, kH}));
  };
  norm(0, kT, all.data());  // starts the worker threads in the default mode
  const unsigned int saved = _mm_getcsr();
  _mm_setcsr(saved | 0x8040u);  // DAZ | FTZ
  norm(0, kT, all.data());
  norm(kT - 1, 1, alone.data());
  _mm_setcsr(saved);
  EXPECT_EQ(0, std::memcmp(all.data() + (kT - 1) * kH, alone.data(), kH * sizeof(float)));
}
#endif

TEST(RopeTest, PositionZeroIsTheIdentity) {
  constexpr int32_t kHeadDim = 16;
  std::vector<float> x = random_floats(3 * 2 * kHeadDim, 3);
  const std::vector<float> before = x;
  std::vector<int32_t> positions = {0, 0, 0};
  std::vector<float> inv = inv_freq(kHeadDim);
  ops::rope(ExecContext::cpu(), Tensor(x.data(), DType::kFloat32, {3, 2 * kHeadDim}), kHeadDim,
            Tensor(positions.data(), DType::kInt32, {3}),
            Tensor(inv.data(), DType::kFloat32, {kHeadDim / 2}));
  for (size_t i = 0; i < x.size(); ++i) EXPECT_EQ(x[i], before[i]) << i;
}

// x [T, heads * head_dim] rotated in the rotate-half layout, with the angle taken in float32.
TEST(RopeTest, MatchesRotateHalfFormulaAndPreservesPairNorms) {
  constexpr int32_t kHeadDim = 12, kHalf = kHeadDim / 2, kHeads = 3, kT = 5;
  constexpr int64_t kWidth = kHeads * kHeadDim;
  std::vector<float> x = random_floats(kT * kWidth, 4);
  const std::vector<float> before = x;
  std::vector<int32_t> positions = {1, 7, 100, 4095, 3};
  std::vector<float> inv = inv_freq(kHeadDim);
  ops::rope(ExecContext::cpu(), Tensor(x.data(), DType::kFloat32, {kT, kWidth}), kHeadDim,
            Tensor(positions.data(), DType::kInt32, {kT}),
            Tensor(inv.data(), DType::kFloat32, {kHalf}));
  for (int64_t t = 0; t < kT; ++t) {
    for (int64_t h = 0; h < kHeads; ++h) {
      for (int32_t i = 0; i < kHalf; ++i) {
        const int64_t lo = t * kWidth + h * kHeadDim + i, hi = lo + kHalf;
        const double angle = static_cast<float>(positions[t]) * inv[i];
        const double c = std::cos(angle), s = std::sin(angle);
        EXPECT_NEAR(x[lo], before[lo] * c - before[hi] * s, 1e-6) << t << ", " << h << ", " << i;
        EXPECT_NEAR(x[hi], before[hi] * c + before[lo] * s, 1e-6) << t << ", " << h << ", " << i;
        const double norm_before =
            double{before[lo]} * before[lo] + double{before[hi]} * before[hi];
        const double norm_after = double{x[lo]} * x[lo] + double{x[hi]} * x[hi];
        EXPECT_NEAR(norm_after, norm_before, 1e-5 * norm_before);
      }
    }
  }
}

TEST(RopeTest, RotatesOnlyTheViewOfAWiderRow) {
  constexpr int32_t kHeadDim = 8, kT = 3;
  constexpr int64_t kWidth = 2 * kHeadDim, kStride = 3 * kWidth, kOffset = kWidth;
  std::vector<float> fused = random_floats(kT * kStride, 5);
  std::vector<float> alone(kT * kWidth);
  for (int64_t t = 0; t < kT; ++t) {
    std::copy_n(fused.begin() + t * kStride + kOffset, kWidth, alone.begin() + t * kWidth);
  }
  const std::vector<float> before = fused;
  std::vector<int32_t> positions = {5, 6, 9};
  std::vector<float> inv = inv_freq(kHeadDim);
  const Tensor pos(positions.data(), DType::kInt32, {kT});
  const Tensor freq(inv.data(), DType::kFloat32, {kHeadDim / 2});
  ops::rope(ExecContext::cpu(), rows_view(fused.data() + kOffset, kT, kWidth, kStride), kHeadDim,
            pos, freq);
  ops::rope(ExecContext::cpu(), Tensor(alone.data(), DType::kFloat32, {kT, kWidth}), kHeadDim, pos,
            freq);
  for (int64_t t = 0; t < kT; ++t) {
    for (int64_t col = 0; col < kStride; ++col) {
      const int64_t i = t * kStride + col;
      const bool inside = col >= kOffset && col < kOffset + kWidth;
      EXPECT_EQ(fused[i], inside ? alone[t * kWidth + col - kOffset] : before[i])
          << t << ", " << col;
    }
  }
}

TEST(SiluMulTest, MatchesDoubleReference) {
  constexpr int64_t kT = 3, kI = 10;
  std::vector<float> gate_up = random_floats(kT * 2 * kI, 6, -8.0f, 8.0f);
  gate_up[0] = -30.0f;
  gate_up[1] = 30.0f;
  std::vector<float> out(kT * kI);
  ops::silu_mul(ExecContext::cpu(), Tensor(gate_up.data(), DType::kFloat32, {kT, 2 * kI}),
                Tensor(out.data(), DType::kFloat32, {kT, kI}));
  for (int64_t t = 0; t < kT; ++t) {
    for (int64_t i = 0; i < kI; ++i) {
      const double g = gate_up[t * 2 * kI + i], u = gate_up[t * 2 * kI + kI + i];
      const double ref = g / (1.0 + std::exp(-g)) * u;
      EXPECT_NEAR(out[t * kI + i], ref, 1e-5 * std::max(1.0, std::abs(ref))) << t << ", " << i;
    }
  }
}

TEST(AddTest, AddsElementwiseAndBiasPerRow) {
  std::vector<float> y = random_floats(12, 7), x = random_floats(12, 8);
  const std::vector<float> y0 = y;
  ops::add(ExecContext::cpu(), Tensor(y.data(), DType::kFloat32, {3, 4}),
           Tensor(x.data(), DType::kFloat32, {12}));
  for (size_t i = 0; i < y.size(); ++i) EXPECT_EQ(y[i], y0[i] + x[i]) << i;

  // A bias on the middle 3 columns of 5-wide rows.
  std::vector<float> rows = random_floats(10, 9), bias = {1.5f, -2.0f, 0.25f};
  const std::vector<float> rows0 = rows;
  ops::add_bias(ExecContext::cpu(), rows_view(rows.data() + 1, 2, 3, 5),
                Tensor(bias.data(), DType::kFloat32, {3}));
  for (int64_t i = 0; i < 10; ++i) {
    const int64_t col = i % 5;
    EXPECT_EQ(rows[i], col >= 1 && col < 4 ? rows0[i] + bias[col - 1] : rows0[i]) << i;
  }
}

TEST(EmbeddingTest, CopiesTheRowOfEachId) {
  constexpr int64_t kV = 6, kH = 5;
  std::vector<float> table = random_floats(kV * kH, 10);
  std::vector<int32_t> ids = {3, 0, 5, 3};
  std::vector<float> out(ids.size() * kH);
  ops::embedding(ExecContext::cpu(), Tensor(table.data(), DType::kFloat32, {kV, kH}),
                 Tensor(ids.data(), DType::kInt32, {4}),
                 Tensor(out.data(), DType::kFloat32, {4, kH}));
  for (size_t t = 0; t < ids.size(); ++t) {
    for (int64_t i = 0; i < kH; ++i) EXPECT_EQ(out[t * kH + i], table[ids[t] * kH + i]) << t;
  }
}

TEST(ElementwiseArgumentsTest, ErrorsNameTheArgument) {
  std::vector<float> f(64);
  std::vector<int64_t> i64(8);
  auto floats = [&](std::initializer_list<int64_t> shape) {
    return Tensor(f.data(), DType::kFloat32, shape);
  };
  const Tensor pos(f.data(), DType::kInt32, {2});
  expect_error<InvalidArgument>(
      [&] { ops::rope(ExecContext::cpu(), floats({2, 6}), 3, pos, floats({1})); },
      "rope: head_dim must be even, <= 1024 and divide the row width, "
      "got [2, 6] float32 cpu");
  expect_error<InvalidArgument>(
      [&] { ops::rope(ExecContext::cpu(), floats({2, 6}), 4, pos, floats({2})); },
      "rope: head_dim must be even, <= 1024 and divide the row width");
  expect_error<InvalidArgument>(
      [&] {
        ops::rope(ExecContext::cpu(), floats({2, 8}), 4, Tensor(i64.data(), DType::kInt64, {2}),
                  floats({2}));
      },
      "rope: positions must be [T] int32, got [2] int64 cpu");
  expect_error<InvalidArgument>(
      [&] { ops::rope(ExecContext::cpu(), floats({2, 8}), 4, pos, floats({4})); },
      "rope: inv_freq must be float32 [head_dim / 2], got [4] float32");
  expect_error<InvalidArgument>(
      [&] {
        ops::embedding(ExecContext::cpu(), floats({4, 2}), Tensor(i64.data(), DType::kInt64, {3}),
                       floats({3, 2}));
      },
      "embedding: ids must be [T] int32, got [3] int64 cpu");
  expect_error<InvalidArgument>(
      [&] { ops::embedding(ExecContext::cpu(), floats({4, 2}), pos, floats({2, 3})); },
      "embedding: out must be contiguous float32 [T, H], got [2, 3] float32 cpu");
  expect_error<InvalidArgument>(
      [&] {
        ops::rms_norm(ExecContext::cpu(), floats({2, 4}), floats({3}), 1e-6f, floats({2, 4}));
      },
      "rms_norm: weight must have H float elements, got [3] float32 cpu");
  expect_error<InvalidArgument>(
      [&] { ops::rms_norm(ExecContext::cpu(), floats({8}), floats({8}), 1e-6f, floats({8})); },
      "rms_norm: x must be [T, H] float32 with unit column stride, got [8] float32 cpu");
  expect_error<InvalidArgument>(
      [&] { ops::silu_mul(ExecContext::cpu(), floats({2, 6}), floats({2, 4})); },
      "silu_mul: gate_up must be [T, 2I] and out [T, I], contiguous float32, "
      "got [2, 6] float32 cpu");
  expect_error<InvalidArgument>(
      [&] { ops::add(ExecContext::cpu(), floats({2, 4}), floats({7})); },
      "add: x and y must be contiguous float32 with the same size, got [7]");
  expect_error<InvalidArgument>(
      [&] { ops::add_bias(ExecContext::cpu(), floats({2, 4}), floats({3})); },
      "add_bias: bias must have N float elements, got [3] float32 cpu");
}

// Disabled until ops::rms_norm checks out against x (a bug): out [1, 8] for x [4, 8] passes the
// checks and the kernel writes 4 rows through it. The buffer here is large enough to survive that.
TEST(ElementwiseArgumentsTest, RmsNormOutMustMatchX) {
  std::vector<float> f(64);
  const Tensor x(f.data(), DType::kFloat32, {4, 8}), w(f.data(), DType::kFloat32, {8});
  expect_error<InvalidArgument>(
      [&] {
        ops::rms_norm(ExecContext::cpu(), x, w, 1e-6f,
                      Tensor(f.data() + 32, DType::kFloat32, {1, 8}));
      },
      "rms_norm: out must have the shape of x");
}

// A host weight with a device activation would reach the wrong kernel; refuse it up front.
TEST(ElementwiseArgumentsTest, MixedDevicesAreRejected) {
  std::vector<float> f(16);
  const Tensor cuda(f.data(), DType::kFloat32, {2, 8}, Device::cuda());
  const Tensor host(f.data(), DType::kFloat32, {2, 8});
  const Tensor host_weight(f.data(), DType::kFloat32, {8});
  expect_error<InvalidArgument>(
      [&] { ops::rms_norm(ExecContext::cpu(), host, host_weight, 1e-6f, cuda); },
      "rms_norm: every tensor must be on the context's device cpu, got one on cuda:0");
  ExecContext on_cuda;
  on_cuda.device = Device::cuda();
  expect_error<InvalidArgument>([&] { ops::add(on_cuda, cuda, host); },
                                "add: every tensor must be on the context's device cuda:0, got "
                                "one on cpu");
}

TEST(ElementwiseArgumentsTest, IndicesOutsideTheirTableAreRefused) {
  std::vector<float> table(4 * 3), out(2 * 3);
  std::vector<int32_t> ids = {1, 4};
  expect_error<InvalidArgument>(
      [&] {
        ops::embedding(ExecContext::cpu(), Tensor(table.data(), DType::kFloat32, {4, 3}),
                       Tensor(ids.data(), DType::kInt32, {2}),
                       Tensor(out.data(), DType::kFloat32, {2, 3}));
      },
      "embedding: ids[1] = 4 is out of range [0, 4)");
}

}  // namespace
}  // namespace lorart

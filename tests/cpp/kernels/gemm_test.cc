#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/errors.h"
#include "kernels/ops.h"
#include "kernels/params.h"
#include "test_util.h"

namespace lorart {
namespace {

using testing_util::expect_error;
using testing_util::random_floats;
using testing_util::rows_view;

void expect_close(float actual, double expected, int64_t row, int64_t col) {
  EXPECT_NEAR(actual, expected, 1e-5 * std::max(1.0, std::abs(expected)))
      << "row " << row << ", col " << col;
}

// x and y are views into wider rows, offset from the row start.
void check_linear(int64_t m, int64_t n, int64_t k, float beta) {
  SCOPED_TRACE(testing::Message() << m << "x" << n << "x" << k << ", beta " << beta);
  const int64_t x_stride = k + 7, x_offset = 3, y_stride = n + 5, y_offset = 2;
  const std::vector<float> x = random_floats(m * x_stride, 1);
  std::vector<float> w = random_floats(n * k, 2);
  std::vector<float> y = random_floats(m * y_stride, 3);
  // The model's workspace is uninitialised: beta 0 must overwrite, never read, what is there.
  if (beta == 0.0f) {
    for (int64_t r = 0; r < m; ++r) {
      std::fill_n(y.begin() + r * y_stride + y_offset, n, std::numeric_limits<float>::quiet_NaN());
    }
  }
  const std::vector<float> before = y;
  ops::linear(rows_view(const_cast<float*>(x.data()) + x_offset, m, k, x_stride),
              Tensor(w.data(), DType::kFloat32, {n, k}),
              rows_view(y.data() + y_offset, m, n, y_stride), beta);
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t col = 0; col < y_stride; ++col) {
      const int64_t i = r * y_stride + col, j = col - y_offset;
      if (j < 0 || j >= n) {
        ASSERT_EQ(y[i], before[i]) << "outside the view: row " << r << ", col " << col;
        continue;
      }
      double ref = beta == 0.0f ? 0.0 : double{beta} * before[i];
      for (int64_t c = 0; c < k; ++c) ref += double{x[r * x_stride + x_offset + c]} * w[j * k + c];
      ASSERT_NEAR(y[i], ref, 1e-5 * std::max(1.0, std::abs(ref))) << "row " << r << ", col " << j;
    }
  }
}

TEST(LinearTest, MatchesNaiveLoopOnStridedViews) {
  for (float beta : {0.0f, 1.0f, 0.5f}) {
    check_linear(5, 7, 33, beta);
    // Past 2^18 multiply-adds linear() splits the columns across threads; 200 is not a multiple
    // of the split's 64-column alignment.
    check_linear(24, 200, 300, beta);
    // Up to 16 rows the skinny kernel runs instead of the BLAS, threaded past 2^18.
    check_linear(16, 200, 300, beta);
    check_linear(1, 1000, 70, beta);
  }
}

TEST(LinearTest, RejectsMismatchedShapes) {
  std::vector<float> buf(64);
  const Tensor x(buf.data(), DType::kFloat32, {2, 4});
  const Tensor w(buf.data(), DType::kFloat32, {3, 4});
  const Tensor y(buf.data(), DType::kFloat32, {2, 3});
  expect_error<InvalidArgument>(
      [&] { ops::linear(x, Tensor(buf.data(), DType::kFloat32, {3, 5}), y); },
      "linear: w must be contiguous [N, K] matching x [M, K] and y [M, N], got [3, 5] float32 "
      "cpu");
  expect_error<InvalidArgument>(
      [&] { ops::linear(x, w, Tensor(buf.data(), DType::kFloat32, {2, 4})); },
      "linear: w must be contiguous [N, K] matching");
  expect_error<InvalidArgument>(
      [&] { ops::linear(x, w, Tensor(buf.data(), DType::kFloat32, {3, 3})); },
      "linear: y must have as many rows as x, got [3, 3] float32 cpu");
  expect_error<InvalidArgument>(
      [&] { ops::linear(Tensor(buf.data(), DType::kInt32, {2, 4}), w, y); },
      "linear: x must be [M, K] float32, got [2, 4] int32 cpu");
  const int64_t shape[2] = {2, 4}, strides[2] = {1, 2};
  expect_error<InvalidArgument>(
      [&] { ops::linear(Tensor(buf.data(), DType::kFloat32, 2, shape, strides), w, y); },
      "linear: x must be [M, K] float32, got [2, 4] float32 cpu");
}

TEST(LinearTest, CudaTensorsHaveNoImplementationYet) {
  std::vector<float> buf(16);
  const Tensor x(buf.data(), DType::kFloat32, {2, 2}, Device::cuda());
  const Tensor w(buf.data(), DType::kFloat32, {2, 2}, Device::cuda());
  expect_error<DeviceError>([&] { ops::linear(x, w, w); },
                            "linear: no cuda:0 implementation in this build yet");
}

// Values in `dtype` storage: the float32 values the kernels will see after widening, and the raw
// words (float32 bits, or 16-bit words) they read.
struct Stored {
  std::vector<float> values;
  std::vector<uint8_t> raw;
};

Stored store(const std::vector<float>& values, DType dtype) {
  Stored s{std::vector<float>(values.size()),
           std::vector<uint8_t>(values.size() * dtype_size(dtype))};
  convert_floats(values.data(), DType::kFloat32, s.raw.data(), dtype, values.size());
  convert_floats(s.raw.data(), dtype, s.values.data(), DType::kFloat32, values.size());
  return s;
}

// One adapter pair with its own storage.
struct Pair {
  int32_t rank;
  Stored a, b_t;  // [rank, in], [rank, out] (B transposed, as LoraAdapter lays it out)
};

class LoraGemmTest : public ::testing::TestWithParam<DType> {
 protected:
  static constexpr int64_t kTokens = 100, kIn = 24, kOut = 20;
  static constexpr int64_t kXStride = 29, kYStride = 50, kOutOffset = 13;

  void add_segment(int32_t begin, int32_t end, int32_t rank) {
    pairs_.push_back({rank, store(random_floats(rank * kIn, 100 + begin), GetParam()),
                      store(random_floats(rank * kOut, 200 + end), GetParam())});
    ranges_.push_back({begin, end});
  }

  // Runs lora_gemm over the segments with scratch sized as the model sizes it (one rank-wide row
  // per token) and checks y against a double-precision reference.
  void run_and_check() {
    std::vector<LoraSegment> segments;
    int64_t scratch_size = 0;
    for (size_t i = 0; i < pairs_.size(); ++i) {
      const Pair& p = pairs_[i];
      LoraPair pair;
      if (p.rank > 0) pair = {p.a.raw.data(), p.b_t.raw.data(), GetParam(), p.rank};
      segments.push_back({ranges_[i].first, ranges_[i].second, pair});
      scratch_size += (ranges_[i].second - ranges_[i].first) * p.rank;
    }
    const std::vector<float> x = random_floats(kTokens * kXStride, 1);
    std::vector<float> y = random_floats(kTokens * kYStride, 2);
    const std::vector<float> before = y;
    std::vector<float> scratch(scratch_size);

    LoraGemmParams params{};
    params.x = x.data();
    params.x_stride = kXStride;
    params.y = y.data() + kOutOffset;
    params.y_stride = kYStride;
    params.in = kIn;
    params.out = kOut;
    params.segments = segments.data();
    params.num_segments = static_cast<int32_t>(segments.size());
    params.scratch = scratch.data();
    ops::lora_gemm(params, Device::cpu());

    std::vector<const Pair*> owner(kTokens, nullptr);
    for (size_t i = 0; i < pairs_.size(); ++i) {
      for (int32_t t = ranges_[i].first; t < ranges_[i].second; ++t) owner[t] = &pairs_[i];
    }
    for (int64_t t = 0; t < kTokens; ++t) {
      const Pair* p = owner[t];
      std::vector<double> h(p != nullptr ? p->rank : 0);
      for (size_t j = 0; j < h.size(); ++j) {
        for (int64_t i = 0; i < kIn; ++i)
          h[j] += static_cast<double>(x[t * kXStride + i]) * p->a.values[j * kIn + i];
      }
      for (int64_t col = 0; col < kYStride; ++col) {
        const int64_t o = col - kOutOffset;
        const int64_t idx = t * kYStride + col;
        if (h.empty() || o < 0 || o >= kOut) {
          EXPECT_EQ(y[idx], before[idx]) << "untouched: token " << t << ", col " << col;
          continue;
        }
        double ref = before[idx];
        for (size_t j = 0; j < h.size(); ++j) ref += h[j] * p->b_t.values[j * kOut + o];
        expect_close(y[idx], ref, t, o);
      }
    }
  }

  std::vector<Pair> pairs_;
  std::vector<std::pair<int32_t, int32_t>> ranges_;
};

INSTANTIATE_TEST_SUITE_P(StorageDtypes, LoraGemmTest,
                         ::testing::Values(DType::kFloat32, DType::kFloat16, DType::kBFloat16),
                         [](const auto& info) { return std::string(dtype_name(info.param)); });

TEST_P(LoraGemmTest, MixedRanksAndSegmentLengthsMatchReference) {
  add_segment(0, 5, 2);     // short (decode-like) segment
  add_segment(5, 25, 8);    // prefill-like segment (BLAS, 16-bit weights widened first)
  add_segment(25, 30, 0);   // adapter without this module: skipped, null pointers never read
  add_segment(33, 40, 16);  // tokens 30..32 belong to no segment
  add_segment(40, 56, 2);
  add_segment(56, 57, 16);  // a single token (skinny kernels)
  add_segment(57, 73, 3);   // 16 tokens: the longest segment the skinny kernels take
  add_segment(75, 95, 16);  // 73..74 and 95..99 belong to no segment
  run_and_check();
}

TEST_P(LoraGemmTest, SingleTokenSegmentsAsInDecode) {
  for (int32_t t = 0; t < 12; ++t) add_segment(2 * t, 2 * t + 1, t % 3 == 0 ? 16 : 1 + t % 8);
  run_and_check();
}

// 100 tokens: two BLAS token blocks of one segment, which may share a thread's widened copy.
TEST_P(LoraGemmTest, LongSegmentSpansSeveralBlasBlocks) {
  add_segment(0, 100, 8);
  run_and_check();
}

TEST_P(LoraGemmTest, NoSegmentsLeavesOutputUntouched) { run_and_check(); }

TEST(LoraGemmDeviceTest, CudaHasNoImplementationYet) {
  LoraGemmParams params{};
  expect_error<DeviceError>([&] { ops::lora_gemm(params, Device::cuda()); },
                            "lora_gemm: no cuda:0 implementation in this build yet");
}

}  // namespace
}  // namespace lorart

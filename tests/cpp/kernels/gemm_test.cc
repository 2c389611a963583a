#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "core/dtype.h"
#include "core/errors.h"
#include "kernels/kernel_test_util.h"
#include "kernels/ops.h"
#include "kernels/params.h"
#include "test_util.h"

#if defined(__SSE__)
#include <xmmintrin.h>
#endif

namespace lorart {
namespace {

// ops::lora_gemm over `runs` of the slots of `table` (one (layer, module) entry per slot).
void lora_gemm(const std::vector<LoraRun>& runs, const std::vector<LoraPair>& table, const float* x,
               int64_t x_stride, int64_t in, float* y, int64_t y_stride, int64_t out,
               int64_t tokens, std::vector<float>& scratch) {
  const int64_t x_shape[2] = {tokens, in}, x_strides[2] = {x_stride, 1};
  const int64_t y_shape[2] = {tokens, out}, y_strides[2] = {y_stride, 1};
  const ops::LoraBatch lora{runs.data(), static_cast<int32_t>(runs.size()), table.data(),
                            static_cast<int32_t>(table.size()), 1};
  ops::lora_gemm(ExecContext::cpu(),
                 Tensor(const_cast<float*>(x), DType::kFloat32, 2, x_shape, x_strides),
                 Tensor(y, DType::kFloat32, 2, y_shape, y_strides), out, lora, 0,
                 Tensor(scratch.data(), DType::kFloat32, {static_cast<int64_t>(scratch.size())}));
}

using testing_util::expect_error;
using testing_util::kThreadCounts;
using testing_util::max_abs_diff;
using testing_util::random_floats;
using testing_util::rows_view;
using testing_util::ScopedGemmIsa;
using testing_util::ScopedThreads;
using testing_util::supported_gemm_isas;

void expect_close(float actual, double expected, int64_t row, int64_t col) {
  EXPECT_NEAR(actual, expected, 1e-5 * std::max(1.0, std::abs(expected)))
      << "row " << row << ", col " << col;
}

// x and y are views into wider rows, offset from the row start.
void check_linear(int64_t m, int64_t n, int64_t k, float beta) {
  SCOPED_TRACE(testing::Message() << m << "x" << n << "x" << k << ", beta " << beta << ", "
                                  << cpu::gemm_isa_name(cpu::gemm_isa()));
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
  ops::linear(ExecContext::cpu(),
              rows_view(const_cast<float*>(x.data()) + x_offset, m, k, x_stride),
              Tensor(w.data(), DType::kFloat32, {n, k}),
              rows_view(y.data() + y_offset, m, n, y_stride), beta);
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t col = 0; col < y_stride; ++col) {
      const int64_t i = r * y_stride + col, j = col - y_offset;
      if (j < 0 || j >= n) {
        ASSERT_EQ(y[i], before[i]) << "outside the view: row " << r << ", col " << col;
        continue;
      }
      double ref = beta == 0.0f ? 0.0 : double{beta} * before[i], magnitude = std::abs(ref);
      for (int64_t c = 0; c < k; ++c) {
        const double product = double{x[r * x_stride + x_offset + c]} * w[j * k + c];
        ref += product;
        magnitude += std::abs(product);
      }
      // float32 rounding grows with the sum of |terms|, which cancellation can leave far above
      // |ref| (K = 2048 sums of uniform products).
      ASSERT_NEAR(y[i], ref, 1e-5 * std::max(1.0, std::abs(ref)) + 1e-7 * magnitude)
          << "row " << r << ", col " << j;
    }
  }
}

TEST(LinearTest, MatchesNaiveLoopOnStridedViews) {
  for (cpu::GemmIsa isa : supported_gemm_isas()) {
    ScopedGemmIsa scoped(isa);
    for (float beta : {0.0f, 1.0f, 0.5f}) {
      check_linear(5, 7, 33, beta);
      // Past 2^18 multiply-adds linear() splits the columns across threads; 200 is not a
      // multiple of the split's 64-column alignment.
      check_linear(24, 200, 300, beta);
      check_linear(16, 200, 300, beta);
      check_linear(1, 1000, 70, beta);
      // K = 2048 makes the weight column blocks (sized for L2) smaller than N.
      check_linear(13, 600, 2048, beta);
    }
  }
}

// A row's output is bitwise the same whatever other rows share the call (1 row as in decode, up
// to a prefill's hundreds) and whatever the thread count, which moves the column split.
void check_rows_invariant(int64_t n, int64_t k, const std::vector<int64_t>& row_counts) {
  const int64_t max_m = *std::max_element(row_counts.begin(), row_counts.end());
  const int64_t x_stride = k + 4, y_stride = n + 3;
  const std::vector<float> x = random_floats(max_m * x_stride, 11);
  std::vector<float> w = random_floats(n * k, 12);
  const std::vector<float> y_init = random_floats(max_m * y_stride, 13);
  const Tensor wt(w.data(), DType::kFloat32, {n, k});
  for (cpu::GemmIsa isa : supported_gemm_isas()) {
    ScopedGemmIsa scoped_isa(isa);
    for (float beta : {0.0f, 1.0f}) {
      std::vector<float> ref = y_init;  // row r computed alone, single-threaded
      {
        ScopedThreads one(1);
        for (int64_t r = 0; r < max_m; ++r) {
          ops::linear(ExecContext::cpu(),
                      rows_view(const_cast<float*>(x.data()) + r * x_stride, 1, k, x_stride), wt,
                      rows_view(ref.data() + r * y_stride, 1, n, y_stride), beta);
        }
      }
      for (int threads : kThreadCounts) {
        ScopedThreads scoped(threads);
        for (int64_t m : row_counts) {
          std::vector<float> y = y_init;
          ops::linear(ExecContext::cpu(), rows_view(const_cast<float*>(x.data()), m, k, x_stride),
                      wt, rows_view(y.data(), m, n, y_stride), beta);
          for (int64_t r = 0; r < m; ++r) {
            const float* got = y.data() + r * y_stride;
            const float* want = ref.data() + r * y_stride;
            ASSERT_EQ(0, std::memcmp(got, want, n * sizeof(float)))
                << n << "x" << k << ": row " << r << " of " << m << ", " << threads
                << " thread(s), beta " << beta << ", " << cpu::gemm_isa_name(isa) << ": max |diff| "
                << max_abs_diff(got, want, n);
          }
        }
      }
    }
  }
}

TEST(LinearTest, EachRowIsBitwiseTheSameForEveryRowCountAndThreadCount) {
  // K = 300 has a tail in every lane count; N = 200 is no multiple of the 64-column thread split.
  check_rows_invariant(200, 300, {1, 2, 3, 5, 6, 7, 8, 12, 16, 17, 18, 24, 31, 33, 64, 65, 130});
  // K = 2100: the weight column blocks (sized for L2) are smaller than N.
  check_rows_invariant(200, 2100, {1, 7, 17, 40});
}

#if defined(__SSE__)
// With flush-to-zero and denormals-are-zero set on the calling thread only (as
// torch.set_flush_denormal does), the workers compute in the caller's mode too: a row whose
// products are subnormal gets the same bits alone (on the caller) and split across threads.
TEST(LinearTest, WorkersComputeInTheCallersFloatMode) {
  const int64_t n = 256, k = 64, m = 100;
  std::vector<float> x = random_floats(m * k, 41), w = random_floats(n * k, 42);
  for (float& v : x) v *= 1e-20f;  // products ~1e-40: float32 subnormals
  for (float& v : w) v *= 1e-20f;
  const Tensor wt(w.data(), DType::kFloat32, {n, k});
  ScopedThreads two(2);
  std::vector<float> warm(m * n);  // starts the worker threads in the default mode
  ops::linear(ExecContext::cpu(), rows_view(x.data(), m, k, k), wt,
              rows_view(warm.data(), m, n, n));
  const unsigned int saved = _mm_getcsr();
  _mm_setcsr(saved | 0x8040u);  // DAZ | FTZ, on this thread only
  std::vector<float> all(m * n), alone(n);
  ops::linear(ExecContext::cpu(), rows_view(x.data(), m, k, k), wt, rows_view(all.data(), m, n, n));
  ops::linear(ExecContext::cpu(), rows_view(x.data(), 1, k, k), wt,
              rows_view(alone.data(), 1, n, n));
  _mm_setcsr(saved);
  EXPECT_EQ(0, std::memcmp(all.data(), alone.data(), n * sizeof(float)))
      << "max |diff| " << max_abs_diff(all.data(), alone.data(), n);
  EXPECT_TRUE(std::all_of(alone.begin(), alone.end(), [](float v) { return v == 0.0f; }))
      << "flush-to-zero should have flushed every subnormal product";
}
#endif

TEST(LinearTest, RejectsMismatchedShapes) {
  std::vector<float> buf(64);
  const Tensor x(buf.data(), DType::kFloat32, {2, 4});
  const Tensor w(buf.data(), DType::kFloat32, {3, 4});
  const Tensor y(buf.data(), DType::kFloat32, {2, 3});
  expect_error<InvalidArgument>(
      [&] { ops::linear(ExecContext::cpu(), x, Tensor(buf.data(), DType::kFloat32, {3, 5}), y); },
      "linear: w must be float [N, K] matching x [M, K], y [M, N], got [3, 5] float32 cpu");
  expect_error<InvalidArgument>(
      [&] { ops::linear(ExecContext::cpu(), x, w, Tensor(buf.data(), DType::kFloat32, {2, 4})); },
      "linear: w must be float [N, K] matching");
  expect_error<InvalidArgument>(
      [&] { ops::linear(ExecContext::cpu(), x, w, Tensor(buf.data(), DType::kFloat32, {3, 3})); },
      "linear: y must have as many rows as x, got [3, 3] float32 cpu");
  expect_error<InvalidArgument>(
      [&] { ops::linear(ExecContext::cpu(), Tensor(buf.data(), DType::kInt32, {2, 4}), w, y); },
      "linear: x must be [M, K] float32, got [2, 4] int32 cpu");
  const int64_t shape[2] = {2, 4}, strides[2] = {1, 2};
  expect_error<InvalidArgument>(
      [&] {
        ops::linear(ExecContext::cpu(), Tensor(buf.data(), DType::kFloat32, 2, shape, strides), w,
                    y);
      },
      "linear: x must be [M, K] float32, got [2, 4] float32 cpu");
}

// The op in the layout the CPU prefers for bfloat16: relayout_weight then linear with that layout
// equals the row-major call bitwise (exact precision), threads splitting the columns.
TEST(LinearTest, PreferredBfloat16LayoutGivesTheRowMajorResult) {
  const ExecContext ctx = ExecContext::cpu();
  EXPECT_EQ(ops::preferred_layout(ctx, DType::kBFloat16), WeightLayout::kK32Interleaved);
  EXPECT_EQ(ops::preferred_layout(ctx, DType::kFloat32), WeightLayout::kRowMajor);
  EXPECT_EQ(ops::preferred_layout(ctx, DType::kFloat16), WeightLayout::kRowMajor);
  const int64_t n = 300, k = 2048, m = 3;
  const std::vector<float> values = random_floats(n * k, 51);
  std::vector<uint16_t> row_major(n * k);
  convert_floats(values.data(), DType::kFloat32, row_major.data(), DType::kBFloat16, n * k);
  std::vector<uint16_t> relaid = row_major;
  const Tensor w(relaid.data(), DType::kBFloat16, {n, k});
  ops::relayout_weight(ctx, w, WeightLayout::kK32Interleaved);
  std::vector<float> x = random_floats(m * k, 52), expected(m * n), got(m * n);
  ScopedThreads two(2);
  ops::linear(ctx, rows_view(x.data(), m, k, k), Tensor(row_major.data(), DType::kBFloat16, {n, k}),
              rows_view(expected.data(), m, n, n));
  ops::linear(ctx, rows_view(x.data(), m, k, k), w, rows_view(got.data(), m, n, n), 0.0f, Tensor(),
              WeightLayout::kK32Interleaved);
  EXPECT_EQ(0, std::memcmp(expected.data(), got.data(), got.size() * sizeof(float)));
}

TEST(LinearTest, InterleavedLayoutNeedsBfloat16) {
  std::vector<float> buf(64);
  const Tensor x(buf.data(), DType::kFloat32, {2, 4});
  const Tensor w(buf.data(), DType::kFloat32, {3, 4});
  const Tensor y(buf.data(), DType::kFloat32, {2, 3});
  const ExecContext ctx = ExecContext::cpu();
  expect_error<InvalidArgument>(
      [&] { ops::linear(ctx, x, w, y, 0.0f, Tensor(), WeightLayout::kK32Interleaved); },
      "linear: w in the k32-interleaved layout must be bfloat16, got [3, 4] float32 cpu");
  expect_error<InvalidArgument>(
      [&] { ops::relayout_weight(ctx, w, WeightLayout::kK32Interleaved); },
      "relayout_weight: w must be a bfloat16 [N, K] matrix with unit column stride");
  ops::relayout_weight(ctx, w, WeightLayout::kRowMajor);  // nothing to do, any dtype
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
  // per token) and checks y against a double-precision reference, on every instruction set.
  void run_and_check() {
    for (cpu::GemmIsa isa : supported_gemm_isas()) {
      SCOPED_TRACE(cpu::gemm_isa_name(isa));
      ScopedGemmIsa scoped(isa);
      run_and_check_once();
    }
  }

  void run_and_check_once() {
    // One LoRA table slot per segment, each with a single (layer, module) entry.
    std::vector<LoraRun> runs;
    std::vector<LoraPair> table;
    int64_t scratch_size = 0;
    for (size_t i = 0; i < pairs_.size(); ++i) {
      const Pair& p = pairs_[i];
      LoraPair pair;
      if (p.rank > 0) pair = {p.a.raw.data(), p.b_t.raw.data(), GetParam(), p.rank};
      runs.push_back({ranges_[i].first, ranges_[i].second, static_cast<int32_t>(i)});
      table.push_back(pair);
      scratch_size += (ranges_[i].second - ranges_[i].first) * p.rank;
    }
    const std::vector<float> x = random_floats(kTokens * kXStride, 1);
    std::vector<float> y = random_floats(kTokens * kYStride, 2);
    const std::vector<float> before = y;
    std::vector<float> scratch(scratch_size);

    lora_gemm(runs, table, x.data(), kXStride, kIn, y.data() + kOutOffset, kYStride, kOut, kTokens,
              scratch);

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
  add_segment(5, 25, 8);    // prefill-like segment (long: 16-bit weights widened once first)
  add_segment(25, 30, 0);   // adapter without this module: skipped, null pointers never read
  add_segment(33, 40, 16);  // tokens 30..32 belong to no segment
  add_segment(40, 56, 2);
  add_segment(56, 57, 16);  // a single token (short: widened in registers)
  add_segment(57, 73, 3);   // 16 tokens: the longest short segment
  add_segment(75, 95, 16);  // 73..74 and 95..99 belong to no segment
  run_and_check();
}

TEST_P(LoraGemmTest, SingleTokenSegmentsAsInDecode) {
  for (int32_t t = 0; t < 12; ++t) add_segment(2 * t, 2 * t + 1, t % 3 == 0 ? 16 : 1 + t % 8);
  run_and_check();
}

// 100 tokens: two token blocks of one long segment, which may share a thread's widened copy.
TEST_P(LoraGemmTest, LongSegmentSpansSeveralTokenBlocks) {
  add_segment(0, 100, 8);
  run_and_check();
}

TEST_P(LoraGemmTest, NoSegmentsLeavesOutputUntouched) { run_and_check(); }

// A token's LoRA delta is bitwise the same in a one-token segment (decode) and in a segment of
// any length (a prefill chunk), next to any other segments, at any thread count.
class LoraGemmInvarianceTest : public ::testing::TestWithParam<DType> {
 protected:
  // in = 200 (a 16-lane tail), out = 600 (several 256-column expand items and a tail).
  static constexpr int64_t kIn = 200, kOut = 600, kTokens = 140, kRank = 12;

  LoraGemmInvarianceTest()
      : x_(random_floats(kTokens * kIn, 21)),
        y_init_(random_floats(kTokens * kOut, 22)),
        a_(store(random_floats(kRank * kIn, 23), GetParam())),
        b_t_(store(random_floats(kRank * kOut, 24), GetParam())),
        other_a_(store(random_floats(5 * kIn, 25), GetParam())),
        other_b_t_(store(random_floats(5 * kOut, 26), GetParam())) {}

  // y after lora_gemm over `segments` ([begin, end) with the pair of rank kRank, or of rank 5
  // when `other`).
  std::vector<float> run(const std::vector<std::tuple<int32_t, int32_t, bool>>& ranges) {
    // Slot 0: this adapter; slot 1: the other one (rank 5).
    const std::vector<LoraPair> table = {
        LoraPair{a_.raw.data(), b_t_.raw.data(), GetParam(), kRank},
        LoraPair{other_a_.raw.data(), other_b_t_.raw.data(), GetParam(), 5}};
    std::vector<LoraRun> runs;
    int64_t scratch_size = 0;
    for (const auto& [begin, end, other] : ranges) {
      runs.push_back({begin, end, other ? 1 : 0});
      scratch_size += (end - begin) * table[other ? 1 : 0].rank;
    }
    std::vector<float> y = y_init_, scratch(scratch_size);
    lora_gemm(runs, table, x_.data(), kIn, kIn, y.data(), kOut, kOut, kTokens, scratch);
    return y;
  }

  void check();

  std::vector<float> x_, y_init_;
  Stored a_, b_t_, other_a_, other_b_t_;
};

INSTANTIATE_TEST_SUITE_P(StorageDtypes, LoraGemmInvarianceTest,
                         ::testing::Values(DType::kFloat32, DType::kFloat16, DType::kBFloat16),
                         [](const auto& info) { return std::string(dtype_name(info.param)); });

TEST_P(LoraGemmInvarianceTest, TokenDeltaDoesNotDependOnSegmentLengthNeighboursOrThreads) {
  for (cpu::GemmIsa isa : supported_gemm_isas()) {
    SCOPED_TRACE(cpu::gemm_isa_name(isa));
    ScopedGemmIsa scoped(isa);
    check();
  }
}

void LoraGemmInvarianceTest::check() {
  // Reference: every token in a one-token segment of its own, single-threaded.
  std::vector<float> ref(kTokens * kOut);
  {
    ScopedThreads one(1);
    for (int32_t t = 0; t < kTokens; ++t) {
      const std::vector<float> y = run({{t, t + 1, false}});
      std::copy_n(y.begin() + t * kOut, kOut, ref.begin() + t * kOut);
    }
  }
  for (int threads : kThreadCounts) {
    ScopedThreads scoped(threads);
    for (int32_t length : {2, 5, 16, 17, 33, 64, 65, 100, 130}) {
      // [0, 3) another adapter, [3, 3 + length) this one, then single-token segments of both.
      std::vector<std::tuple<int32_t, int32_t, bool>> ranges = {{0, 3, true},
                                                                {3, 3 + length, false}};
      for (int32_t t = 3 + length; t < kTokens; ++t) ranges.push_back({t, t + 1, t % 2 == 0});
      const std::vector<float> y = run(ranges);
      for (int32_t t = 3; t < kTokens; ++t) {
        if (t >= 3 + length && t % 2 == 0) continue;  // the other adapter's tokens
        const float* got = y.data() + t * kOut;
        const float* want = ref.data() + t * kOut;
        ASSERT_EQ(0, std::memcmp(got, want, kOut * sizeof(float)))
            << "token " << t << ", segment length " << length << ", " << threads
            << " thread(s): max |diff| " << max_abs_diff(got, want, kOut);
      }
    }
  }
}

TEST(LoraGemmDeviceTest, TensorsOffTheContextsDeviceAreRefused) {
  std::vector<float> buf(16);
  const Tensor t(buf.data(), DType::kFloat32, {1, 16});
  ExecContext ctx;
  ctx.device = Device::cuda();
  expect_error<InvalidArgument>([&] { ops::lora_gemm(ctx, t, t, 16, ops::LoraBatch{}, 0, t); },
                                "lora_gemm: every tensor must be on the context's device cuda:0");
}

TEST(LoraGemmOpTest, RunsOutsideTheBatchOrTableAreRefused) {
  std::vector<float> x(4 * 8), y(4 * 8), scratch(64);
  const Tensor xt(x.data(), DType::kFloat32, {4, 8}), yt(y.data(), DType::kFloat32, {4, 8});
  const Tensor st(scratch.data(), DType::kFloat32, {64});
  const std::vector<LoraPair> table(1);
  for (const LoraRun run : {LoraRun{0, 5, 0}, LoraRun{0, 2, 1}, LoraRun{3, 2, 0}}) {
    const ops::LoraBatch lora{&run, 1, table.data(), 1, 1};
    expect_error<InvalidArgument>(
        [&] { ops::lora_gemm(ExecContext::cpu(), xt, yt, 8, lora, 0, st); }, "lora_gemm: run 0");
  }
}

TEST(LoraGemmOpTest, OverlappingOrUnorderedRunsAreRefused) {
  std::vector<float> x(4 * 8), y(4 * 8), scratch(64);
  const Tensor xt(x.data(), DType::kFloat32, {4, 8}), yt(y.data(), DType::kFloat32, {4, 8});
  const Tensor st(scratch.data(), DType::kFloat32, {64});
  const std::vector<LoraPair> table(2);
  const LoraRun runs[] = {{2, 4, 0}, {0, 2, 1}};
  const ops::LoraBatch lora{runs, 2, table.data(), 2, 1};
  expect_error<InvalidArgument>([&] { ops::lora_gemm(ExecContext::cpu(), xt, yt, 8, lora, 0, st); },
                                "lora_gemm: run 1 [0, 2) starts before the previous run ends (4)");
}

// The fused form on the CPU is one lora_gemm per slice, in order, bitwise: slices with
// overlapping columns (fused qkv and q of one adapter) add in the slices' order.
TEST(LoraGemmOpTest, SlicesAreBitwiseOneLoraGemmPerSliceInOrder) {
  const int64_t tokens = 9, in = 40, width = 30;
  const std::vector<float> x = random_floats(tokens * in, 1);
  const std::vector<float> y0 = random_floats(tokens * width, 2);
  // Two slots x three slices: [0, 30) fused, [0, 12) q, [17, 30) v; slot 1 skips the fused one.
  const LoraSlice slices[] = {{0, 0, 30}, {1, 0, 12}, {2, 17, 13}};
  const int32_t ranks[2][3] = {{4, 3, 5}, {0, 6, 2}};
  std::vector<std::vector<float>> storage;
  std::vector<LoraPair> table;
  for (int s = 0; s < 2; ++s) {
    for (int i = 0; i < 3; ++i) {
      const int32_t r = ranks[s][i];
      storage.push_back(random_floats(std::max<int64_t>(1, r * in), 10 + 3 * s + i));
      storage.push_back(random_floats(std::max<int64_t>(1, r * slices[i].out), 20 + 3 * s + i));
      table.push_back(
          {storage[storage.size() - 2].data(), storage.back().data(), DType::kFloat32, r, nullptr});
    }
  }
  const LoraRun runs[] = {{0, 4, 0}, {5, 9, 1}};  // token 4 is a base token
  const ops::LoraBatch lora{runs, 2, table.data(), 2, 3};
  const ExecContext ctx = ExecContext::cpu();
  std::vector<float> scratch(ops::lora_scratch_floats(ctx, tokens, 6, in, 3));
  const Tensor st(scratch.data(), DType::kFloat32, {static_cast<int64_t>(scratch.size())});
  const Tensor xt(const_cast<float*>(x.data()), DType::kFloat32, {tokens, in});
  std::vector<float> fused = y0, one_by_one = y0;
  ops::lora_gemm_slices(ctx, xt, Tensor(fused.data(), DType::kFloat32, {tokens, width}), slices, 3,
                        lora, st);
  for (const LoraSlice& sl : slices) {
    const int64_t shape[2] = {tokens, sl.out}, strides[2] = {width, 1};
    ops::lora_gemm(ctx, xt,
                   Tensor(one_by_one.data() + sl.out_offset, DType::kFloat32, 2, shape, strides),
                   sl.out, lora, sl.pair_index, st);
  }
  EXPECT_EQ(std::memcmp(fused.data(), one_by_one.data(), fused.size() * sizeof(float)), 0);
  EXPECT_NE(std::memcmp(fused.data(), y0.data(), fused.size() * sizeof(float)), 0);
  for (int64_t c = 0; c < width; ++c) {  // the base token's row is untouched
    EXPECT_EQ(fused[4 * width + c], y0[4 * width + c]);
  }
  // Slices past y's columns, too many slices and an unknown pair are refused by name.
  const LoraSlice wide[] = {{0, 20, 11}};
  expect_error<InvalidArgument>(
      [&] {
        ops::lora_gemm_slices(ctx, xt, Tensor(fused.data(), DType::kFloat32, {tokens, width}), wide,
                              1, lora, st);
      },
      "lora_gemm: each slice's columns [out_offset, out_offset + out) must lie within y");
  expect_error<InvalidArgument>(
      [&] {
        ops::lora_gemm_slices(ctx, xt, Tensor(fused.data(), DType::kFloat32, {tokens, width}),
                              slices, 5, lora, st);
      },
      "lora_gemm: num_slices must be in [1, 4], got 5");
  const LoraSlice unknown[] = {{3, 0, 4}};
  expect_error<InvalidArgument>(
      [&] {
        ops::lora_gemm_slices(ctx, xt, Tensor(fused.data(), DType::kFloat32, {tokens, width}),
                              unknown, 1, lora, st);
      },
      "lora_gemm: pair_index must index");
}

TEST(LoraGemmOpTest, ScratchFloatsPerDevice) {
  EXPECT_EQ(ops::lora_scratch_floats(ExecContext::cpu(), 10, 16, 4096, 4), 160);
  ExecContext cuda;
  cuda.device = Device::cuda();
  // Split-K partials: ceil(4097 / 256) = 17 chunks per slice.
  EXPECT_EQ(ops::lora_scratch_floats(cuda, 10, 16, 4097, 3), 3 * 17 * 10 * 16);
  expect_error<InvalidArgument>([] { ops::lora_scratch_floats(ExecContext::cpu(), 1, 1, 1, 0); },
                                "num_slices (0) in [1, 4]");
  expect_error<InvalidArgument>(
      [] {
        ops::lora_scratch_floats(ExecContext::cpu(), int64_t{1} << 40, int64_t{1} << 40, 1, 1);
      },
      "LoRA scratch floats");
}

}  // namespace
}  // namespace lorart

namespace lorart {
namespace {

// 16-bit weights give the bits of their float32 copy through ops::linear at every row count and
// thread count (the kernels widen them in registers, exactly).
TEST(LinearTest, SixteenBitWeightsMatchTheirFloat32CopyBitwise) {
  constexpr int64_t kN = 300, kK = 200;
  const std::vector<float> x = testing_util::random_floats(320 * kK, 31);
  for (DType dtype : {DType::kBFloat16, DType::kFloat16}) {
    std::vector<uint16_t> w16(kN * kK);
    const std::vector<float> w0 = testing_util::random_floats(kN * kK, 32);
    convert_floats(w0.data(), DType::kFloat32, w16.data(), dtype, w16.size());
    std::vector<float> w32(kN * kK);
    convert_floats(w16.data(), dtype, w32.data(), DType::kFloat32, w32.size());
    for (int threads : {1, 2, 3}) {
      ScopedThreads scoped(threads);
      for (int64_t m : {1, 17, 63, 64, 100, 320}) {
        std::vector<float> want(m * kN), got(m * kN);
        const Tensor xt(const_cast<float*>(x.data()), DType::kFloat32, {m, kK});
        ops::linear(ExecContext::cpu(), xt, Tensor(w32.data(), DType::kFloat32, {kN, kK}),
                    Tensor(want.data(), DType::kFloat32, {m, kN}));
        ops::linear(ExecContext::cpu(), xt, Tensor(w16.data(), dtype, {kN, kK}),
                    Tensor(got.data(), DType::kFloat32, {m, kN}));
        ASSERT_EQ(0, std::memcmp(want.data(), got.data(), want.size() * sizeof(float)))
            << dtype_name(dtype) << ", M = " << m << ", " << threads << " thread(s)";
      }
    }
  }
}

}  // namespace
}  // namespace lorart

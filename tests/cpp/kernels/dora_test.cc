// DoRA's kernels: ops::dora_scales (magnitude / ||W + B A|| per row, float64 norms, any weight
// dtype and layout), ops::read_weight_row (the k32 interleave undone) and ops::lora_dora_apply.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "core/errors.h"
#include "kernels/ops.h"
#include "test_util.h"

namespace lorart {
namespace {

using testing_util::expect_error;
using testing_util::random_floats;

// Values in `dtype` (16-bit dtypes as words) and the same values widened back to float32.
struct Stored {
  DType dtype;
  std::vector<float> f32;        // the stored values, exactly
  std::vector<uint16_t> halves;  // the storage of a 16-bit dtype
  Tensor tensor(std::initializer_list<int64_t> shape) {
    void* data = dtype == DType::kFloat32 ? static_cast<void*>(f32.data()) : halves.data();
    return Tensor(data, dtype, shape);
  }
};
Stored stored(std::vector<float> values, DType dtype) {
  Stored s{dtype, std::move(values), {}};
  if (dtype != DType::kFloat32) {
    s.halves.resize(s.f32.size());
    convert_floats(s.f32.data(), DType::kFloat32, s.halves.data(), dtype, s.f32.size());
    convert_floats(s.halves.data(), dtype, s.f32.data(), DType::kFloat32, s.f32.size());
  }
  return s;
}

// m[o] / ||w[offset + o, :] + b[o, :] @ a|| in float64, from the stored values.
std::vector<double> reference_scales(const std::vector<float>& w, int64_t k, int64_t offset,
                                     const std::vector<float>& a, const std::vector<float>& b,
                                     const std::vector<float>& m, int64_t rank) {
  const int64_t out = static_cast<int64_t>(m.size());
  std::vector<double> scales(out);
  for (int64_t o = 0; o < out; ++o) {
    double sum = 0.0;
    for (int64_t c = 0; c < k; ++c) {
      double v = w[(offset + o) * k + c];
      for (int64_t r = 0; r < rank; ++r) v += double{b[o * rank + r]} * a[r * k + c];
      sum += v * v;
    }
    scales[o] = m[o] / std::sqrt(sum);
  }
  return scales;
}

struct DoraCase {
  DType w_dtype, lora_dtype;
  int64_t k;
};

class DoraScalesTest : public ::testing::TestWithParam<DoraCase> {};

INSTANTIATE_TEST_SUITE_P(Dtypes, DoraScalesTest,
                         ::testing::Values(DoraCase{DType::kFloat32, DType::kFloat32, 40},
                                           DoraCase{DType::kFloat16, DType::kFloat32, 40},
                                           DoraCase{DType::kBFloat16, DType::kFloat32, 80},
                                           DoraCase{DType::kBFloat16, DType::kBFloat16, 45},
                                           DoraCase{DType::kFloat32, DType::kFloat16, 64}),
                         [](const auto& info) {
                           return std::string(dtype_name(info.param.w_dtype)) + "_" +
                                  dtype_name(info.param.lora_dtype) + "_k" +
                                  std::to_string(info.param.k);
                         });

// Rows [3, 9) of a [12, K] matrix; K with a tail past the last 32-block for bfloat16.
TEST_P(DoraScalesTest, MatchesAFloat64ReferenceInEveryLayout) {
  const DoraCase p = GetParam();
  const int64_t n = 12, k = p.k, offset = 3, out = 6, rank = 3;
  Stored w = stored(random_floats(n * k, 1, -0.5f, 0.5f), p.w_dtype);
  Stored a = stored(random_floats(rank * k, 2, -0.3f, 0.3f), p.lora_dtype);
  Stored b = stored(random_floats(out * rank, 3, -0.3f, 0.3f), p.lora_dtype);
  Stored m = stored(random_floats(out, 4, 0.5f, 2.0f), p.lora_dtype);
  const std::vector<double> want = reference_scales(w.f32, k, offset, a.f32, b.f32, m.f32, rank);

  std::vector<WeightLayout> layouts = {WeightLayout::kRowMajor};
  if (p.w_dtype == DType::kBFloat16) layouts.push_back(WeightLayout::kK32Interleaved);
  std::vector<float> row_major;
  for (WeightLayout layout : layouts) {
    SCOPED_TRACE(static_cast<int>(layout));
    Stored laid_out = w;
    const Tensor wt = laid_out.tensor({n, k});
    ops::relayout_weight(ExecContext::cpu(), wt, layout);
    if (layout == WeightLayout::kK32Interleaved) {
      ASSERT_NE(0, std::memcmp(laid_out.halves.data(), w.halves.data(), w.halves.size() * 2));
    }
    std::vector<float> scales(out, -1.0f);
    ops::dora_scales(ExecContext::cpu(), wt, layout, offset, a.tensor({rank, k}),
                     b.tensor({out, rank}), m.tensor({out}),
                     Tensor(scales.data(), DType::kFloat32, {out}));
    for (int64_t o = 0; o < out; ++o) {
      EXPECT_NEAR(scales[o], want[o], 2.5e-7 * std::abs(want[o])) << "row " << o;
    }
    // The layout is how the values are stored, not what they are.
    if (row_major.empty()) {
      row_major = scales;
    } else {
      EXPECT_EQ(0, std::memcmp(scales.data(), row_major.data(), out * sizeof(float)));
    }
  }
  // Another row offset reads other rows of w.
  std::vector<float> shifted(out);
  ops::dora_scales(ExecContext::cpu(), w.tensor({n, k}), WeightLayout::kRowMajor, offset + 1,
                   a.tensor({rank, k}), b.tensor({out, rank}), m.tensor({out}),
                   Tensor(shifted.data(), DType::kFloat32, {out}));
  const std::vector<double> want_shifted =
      reference_scales(w.f32, k, offset + 1, a.f32, b.f32, m.f32, rank);
  for (int64_t o = 0; o < out; ++o) {
    EXPECT_NEAR(shifted[o], want_shifted[o], 2.5e-7 * std::abs(want_shifted[o])) << o;
    EXPECT_NE(shifted[o], row_major[o]) << o;
  }
}

// The norms are float64: rows whose float32 sum of squares would lose the small terms.
TEST(DoraScalesOpTest, NormsAccumulateInFloat64) {
  const int64_t k = 4097, out = 1, rank = 1;
  std::vector<float> w(k, 1e-4f), a(k, 0.0f), b(1, 0.0f), m(1, 1.0f);
  w[0] = 1.0f;  // 1 + 4096 * 1e-8: float32 would drop every small square against 1
  std::vector<float> scale(1);
  ops::dora_scales(
      ExecContext::cpu(), Tensor(w.data(), DType::kFloat32, {1, k}), WeightLayout::kRowMajor, 0,
      Tensor(a.data(), DType::kFloat32, {rank, k}), Tensor(b.data(), DType::kFloat32, {out, rank}),
      Tensor(m.data(), DType::kFloat32, {out}), Tensor(scale.data(), DType::kFloat32, {out}));
  double sum = 1.0;
  for (int64_t c = 1; c < k; ++c) sum += double{w[c]} * w[c];
  EXPECT_EQ(scale[0], static_cast<float>(1.0 / std::sqrt(sum)));
  EXPECT_NE(scale[0], 1.0f);
}

TEST(DoraScalesOpTest, AZeroNormGivesInfinity) {
  const int64_t k = 8, out = 2, rank = 1;
  std::vector<float> w = random_floats(out * k, 1);
  std::vector<float> a(w.begin(), w.begin() + k);  // B A cancels row 0 of w exactly
  std::vector<float> b = {-1.0f, 0.0f}, m = {0.5f, 0.5f}, scales(out);
  ops::dora_scales(
      ExecContext::cpu(), Tensor(w.data(), DType::kFloat32, {out, k}), WeightLayout::kRowMajor, 0,
      Tensor(a.data(), DType::kFloat32, {rank, k}), Tensor(b.data(), DType::kFloat32, {out, rank}),
      Tensor(m.data(), DType::kFloat32, {out}), Tensor(scales.data(), DType::kFloat32, {out}));
  EXPECT_EQ(scales[0], std::numeric_limits<float>::infinity());
  EXPECT_TRUE(std::isfinite(scales[1]));
}

TEST(DoraScalesOpTest, ArgumentsAreChecked) {
  std::vector<float> w(12 * 8), a(2 * 8), b(4 * 2), m(4), s(4);
  std::vector<uint16_t> s16(4);
  const ExecContext ctx = ExecContext::cpu();
  const Tensor wt(w.data(), DType::kFloat32, {12, 8}), at(a.data(), DType::kFloat32, {2, 8}),
      bt(b.data(), DType::kFloat32, {4, 2}), mt(m.data(), DType::kFloat32, {4}),
      st(s.data(), DType::kFloat32, {4});
  expect_error<InvalidArgument>(
      [&] { ops::dora_scales(ctx, wt, WeightLayout::kK32Interleaved, 0, at, bt, mt, st); },
      "dora_scales: w in the k32-interleaved layout must be bfloat16");
  expect_error<InvalidArgument>(
      [&] { ops::dora_scales(ctx, wt, WeightLayout::kRowMajor, 9, at, bt, mt, st); },
      "dora_scales: w must be float [N, K] with rows [row_offset, row_offset + out)");
  expect_error<InvalidArgument>(
      [&] {
        ops::dora_scales(ctx, Tensor(w.data(), DType::kFloat32, {12, 7}), WeightLayout::kRowMajor,
                         0, at, bt, mt, st);
      },
      "dora_scales: w must be float [N, K]");
  expect_error<InvalidArgument>(
      [&] {
        ops::dora_scales(ctx, wt, WeightLayout::kRowMajor, 0, at,
                         Tensor(b.data(), DType::kFloat32, {2, 4}), mt, st);
      },
      "dora_scales: b must be contiguous float [out, r]");
  expect_error<InvalidArgument>(
      [&] {
        ops::dora_scales(ctx, wt, WeightLayout::kRowMajor, 0, at, bt, mt,
                         Tensor(s16.data(), DType::kFloat16, {4}));
      },
      "dora_scales: scales must be contiguous float32 [out]");
  expect_error<InvalidArgument>(
      [&] {
        ops::dora_scales(ctx, wt, WeightLayout::kRowMajor, 0, at, bt, mt,
                         Tensor(s.data(), DType::kFloat32, {3}));
      },
      "dora_scales: scales must be contiguous float32 [out]");
}

// read_weight_row gives each row in column order whatever the layout, K with and without a tail.
TEST(ReadWeightRowTest, UndoesTheInterleaveExactly) {
  for (const int64_t k : {16, 32, 45, 64, 80, 100}) {
    SCOPED_TRACE(k);
    const int64_t n = 5;
    Stored w = stored(random_floats(n * k, static_cast<uint32_t>(k)), DType::kBFloat16);
    std::vector<uint16_t> interleaved = w.halves;
    const Tensor it(interleaved.data(), DType::kBFloat16, {n, k});
    ops::relayout_weight(ExecContext::cpu(), it, WeightLayout::kK32Interleaved);
    if (k >= 32) ASSERT_NE(interleaved, w.halves);
    for (int64_t row = 0; row < n; ++row) {
      std::vector<float> got(k, -7.0f), plain(k, -7.0f);
      ops::read_weight_row(ExecContext::cpu(), it, WeightLayout::kK32Interleaved, row,
                           Tensor(got.data(), DType::kFloat32, {k}));
      ops::read_weight_row(ExecContext::cpu(), w.tensor({n, k}), WeightLayout::kRowMajor, row,
                           Tensor(plain.data(), DType::kFloat32, {k}));
      for (int64_t c = 0; c < k; ++c) {
        ASSERT_EQ(got[c], w.f32[row * k + c]) << "row " << row << " col " << c;
        ASSERT_EQ(plain[c], w.f32[row * k + c]) << "row " << row << " col " << c;
      }
    }
  }
}

TEST(ReadWeightRowTest, ReadsFloat32AndFloat16RowsOfAStridedMatrix) {
  const int64_t n = 4, k = 6, stride = 10;
  for (DType dtype : {DType::kFloat32, DType::kFloat16}) {
    Stored w = stored(random_floats(n * stride, 9), dtype);
    void* data = dtype == DType::kFloat32 ? static_cast<void*>(w.f32.data()) : w.halves.data();
    const int64_t shape[2] = {n, k}, strides[2] = {stride, 1};
    const Tensor view(data, dtype, 2, shape, strides);
    std::vector<float> row(k);
    ops::read_weight_row(ExecContext::cpu(), view, WeightLayout::kRowMajor, 2,
                         Tensor(row.data(), DType::kFloat32, {k}));
    for (int64_t c = 0; c < k; ++c) EXPECT_EQ(row[c], w.f32[2 * stride + c]) << c;
  }
  std::vector<float> w(n * k), out(k);
  const Tensor wt(w.data(), DType::kFloat32, {n, k});
  expect_error<InvalidArgument>(
      [&] {
        ops::read_weight_row(ExecContext::cpu(), wt, WeightLayout::kRowMajor, n,
                             Tensor(out.data(), DType::kFloat32, {k}));
      },
      "read_weight_row: w must be float [N, K] and row in [0, N)");
  expect_error<InvalidArgument>(
      [&] {
        ops::read_weight_row(ExecContext::cpu(), wt, WeightLayout::kK32Interleaved, 0,
                             Tensor(out.data(), DType::kFloat32, {k}));
      },
      "read_weight_row: w in the k32-interleaved layout must be bfloat16");
  expect_error<InvalidArgument>(
      [&] {
        ops::read_weight_row(ExecContext::cpu(), wt, WeightLayout::kRowMajor, 0,
                             Tensor(out.data(), DType::kFloat32, {k - 1}));
      },
      "read_weight_row: out must be contiguous float32 [K]");
}

// Slots 0 (DoRA), 1 (plain LoRA) and 2 (rank 0) at pair index 1 of 3 per slot; runs of tokens
// in each. Only DoRA rows' first `out` columns change.
class LoraDoraApplyTest : public ::testing::Test {
 protected:
  static constexpr int64_t kTokens = 9, kWidth = 12, kOffset = 2, kOut = 7;
  LoraDoraApplyTest() : pairs_(9), scale_(random_floats(kOut, 5, 0.5f, 1.5f)) {
    pairs_[0 * 3 + 1].rank = 2;
    pairs_[0 * 3 + 1].dora_scale = scale_.data();
    pairs_[0 * 3 + 0].dora_scale = scale_.data();  // another module's pair: not this call's
    pairs_[1 * 3 + 1].rank = 2;
    runs_ = {{0, 2, 0}, {2, 4, 1}, {4, 5, 0}, {5, 7, 2}, {7, 9, 1}};
  }
  ops::LoraBatch batch(int32_t num_runs = -1) const {
    ops::LoraBatch b;
    b.runs = runs_.data();
    b.num_runs = num_runs < 0 ? static_cast<int32_t>(runs_.size()) : num_runs;
    b.pairs = pairs_.data();
    b.num_slots = 3;
    b.pairs_per_slot = 3;
    return b;
  }
  // Columns [kOffset, kOffset + kOut) of y [kTokens, kWidth].
  Tensor y_view(std::vector<float>& y) const {
    return testing_util::rows_view(y.data() + kOffset, kTokens, kOut, kWidth);
  }
  static bool dora_token(int64_t t) { return t < 2 || t == 4; }

  std::vector<LoraPair> pairs_;
  std::vector<float> scale_;
  std::vector<LoraRun> runs_;
};

TEST_F(LoraDoraApplyTest, ScalesDoraRowsWithoutBias) {
  const std::vector<float> before = random_floats(kTokens * kWidth, 6);
  std::vector<float> y = before;
  ops::lora_dora_apply(ExecContext::cpu(), y_view(y), kOut, Tensor(), batch(), 1);
  for (int64_t t = 0; t < kTokens; ++t) {
    for (int64_t c = 0; c < kWidth; ++c) {
      const int64_t o = c - kOffset;
      const float want = dora_token(t) && o >= 0 && o < kOut ? before[t * kWidth + c] * scale_[o]
                                                             : before[t * kWidth + c];
      ASSERT_EQ(y[t * kWidth + c], want) << "token " << t << " col " << c;
    }
  }
}

TEST_F(LoraDoraApplyTest, KeepsTheBiasOutOfTheScale) {
  for (DType dtype : {DType::kFloat32, DType::kBFloat16}) {
    SCOPED_TRACE(dtype_name(dtype));
    Stored bias = stored(random_floats(kOut, 7), dtype);
    const std::vector<float> before = random_floats(kTokens * kWidth, 8);
    std::vector<float> y = before;
    ops::lora_dora_apply(ExecContext::cpu(), y_view(y), kOut, bias.tensor({kOut}), batch(), 1);
    for (int64_t t = 0; t < kTokens; ++t) {
      for (int64_t c = 0; c < kWidth; ++c) {
        const int64_t o = c - kOffset;
        float want = before[t * kWidth + c];
        if (dora_token(t) && o >= 0 && o < kOut) {
          const float without_bias = want - bias.f32[o];
          const float scaled = scale_[o] * without_bias;
          want = scaled + bias.f32[o];
        }
        ASSERT_EQ(y[t * kWidth + c], want) << "token " << t << " col " << c;
      }
    }
  }
}

TEST_F(LoraDoraApplyTest, NoRunsOrNoDoraPairsLeaveYUntouched) {
  const std::vector<float> before = random_floats(kTokens * kWidth, 9);
  std::vector<float> y = before;
  ops::lora_dora_apply(ExecContext::cpu(), y_view(y), kOut, Tensor(), batch(0), 1);
  EXPECT_EQ(y, before);
  ops::lora_dora_apply(ExecContext::cpu(), y_view(y), kOut, Tensor(), batch(), 2);  // no scale
  EXPECT_EQ(y, before);
}

TEST_F(LoraDoraApplyTest, ArgumentsAreChecked) {
  std::vector<float> y(kTokens * kWidth), bias(kOut + 1);
  const ExecContext ctx = ExecContext::cpu();
  expect_error<InvalidArgument>(
      [&] { ops::lora_dora_apply(ctx, y_view(y), kOut, Tensor(), batch(), 3); },
      "lora_dora_apply: pair_index must index the LoRA table's (layer, module) entries");
  expect_error<InvalidArgument>(
      [&] { ops::lora_dora_apply(ctx, y_view(y), kOut + 1, Tensor(), batch(), 1); },
      "lora_dora_apply: y must have at least `out` columns");
  expect_error<InvalidArgument>(
      [&] {
        ops::lora_dora_apply(ctx, y_view(y), kOut, Tensor(bias.data(), DType::kFloat32, {kOut + 1}),
                             batch(), 1);
      },
      "lora_dora_apply: bias must have `out` float elements");
  runs_[4] = {7, 10, 1};
  expect_error<InvalidArgument>(
      [&] { ops::lora_dora_apply(ctx, y_view(y), kOut, Tensor(), batch(), 1); },
      "lora_dora_apply: run 4 [7, 10) of slot 1 is outside the 9 tokens or the 3 slot(s)");
  runs_[4] = {7, 9, 3};
  expect_error<InvalidArgument>(
      [&] { ops::lora_dora_apply(ctx, y_view(y), kOut, Tensor(), batch(), 1); },
      "run 4 [7, 9) of slot 3 is outside");
  EXPECT_EQ(y, std::vector<float>(kTokens * kWidth, 0.0f));  // refused before any write
}

}  // namespace
}  // namespace lorart

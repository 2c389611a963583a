// GPU tests of csrc/kernels/cuda/elementwise/: every op on a CUDA context against the CPU op (the
// reference) on the same random inputs, with odd sizes (the scalar paths), multiples of 8 (the
// 16-byte paths), strided rows, every weight dtype, and outputs poisoned with NaN first. Ops whose
// GPU arithmetic is the CPU's rounding for rounding (copies, adds, products with explicit _rn
// intrinsics) must match bitwise; the rest state their bound where they check it. Each test skips
// without a GPU.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/errors.h"
#include "kernels/cuda/cuda_test_util.h"
#include "kernels/ops.h"
#include "test_util.h"

namespace lorart {
namespace {

using testing_util::DeviceArray;
using testing_util::expect_error;
using testing_util::random_floats;

constexpr DType kWeightDtypes[] = {DType::kFloat32, DType::kFloat16, DType::kBFloat16};

ExecContext gpu() {
  ExecContext ctx;
  ctx.device = Device::cuda();
  return ctx;
}

// Host bytes of `values` stored as `dtype` (rounded to nearest even for the 16-bit types).
std::vector<unsigned char> as_dtype(const std::vector<float>& values, DType dtype) {
  std::vector<unsigned char> bytes(values.size() * dtype_size(dtype));
  convert_floats(values.data(), DType::kFloat32, bytes.data(), dtype, values.size());
  return bytes;
}

Tensor host_rows(void* data, DType dtype, int64_t rows, int64_t cols, int64_t stride) {
  const int64_t shape[2] = {rows, cols}, strides[2] = {stride, 1};
  return Tensor(data, dtype, 2, shape, strides);
}
template <class T>
Tensor dev_rows(const DeviceArray<T>& a, DType dtype, int64_t rows, int64_t cols, int64_t stride,
                int64_t offset = 0) {
  const int64_t shape[2] = {rows, cols}, strides[2] = {stride, 1};
  return Tensor(a.data() + offset, dtype, 2, shape, strides, Device::cuda());
}
template <class T>
Tensor dev_vec(const DeviceArray<T>& a, DType dtype, int64_t n, int64_t offset = 0) {
  return Tensor(a.data() + offset, dtype, {n}, Device::cuda());
}

void expect_bitwise(const std::vector<float>& got, const std::vector<float>& want,
                    const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  for (size_t i = 0; i < got.size(); ++i) {
    uint32_t a, b;
    std::memcpy(&a, &got[i], 4);
    std::memcpy(&b, &want[i], 4);
    ASSERT_EQ(a, b) << what << " [" << i << "]: " << got[i] << " vs " << want[i];
  }
}

// |got - want| <= rel * scale[i] (+ the smallest normal, for exact zeros), no NaN.
void expect_close(const std::vector<float>& got, const std::vector<float>& want,
                  const std::vector<float>& scale, double rel, const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  for (size_t i = 0; i < got.size(); ++i) {
    ASSERT_FALSE(std::isnan(got[i])) << what << " [" << i << "] never written";
    ASSERT_LE(std::abs(double{got[i]} - want[i]), rel * scale[i] + 1.2e-38)
        << what << " [" << i << "]: " << got[i] << " vs " << want[i];
  }
}

std::vector<float> abs_of(const std::vector<float>& v) {
  std::vector<float> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = std::abs(v[i]);
  return out;
}

TEST(CudaElementwiseTest, EmbeddingCopiesRowsBitwise) {
  LORART_REQUIRE_GPU();
  for (int64_t hidden : {1031, 1024}) {
    for (DType dtype : kWeightDtypes) {
      constexpr int64_t kVocab = 37;
      const std::vector<unsigned char> table =
          as_dtype(random_floats(kVocab * hidden, 1, -2.0f, 2.0f), dtype);
      const std::vector<int32_t> ids = {36, 0, 5, 5, 17, 2, 30};
      const int64_t t = static_cast<int64_t>(ids.size());
      std::vector<float> want(t * hidden);
      std::vector<unsigned char> table_host = table;
      std::vector<int32_t> ids_host = ids;
      ops::embedding(ExecContext::cpu(),
                     host_rows(table_host.data(), dtype, kVocab, hidden, hidden),
                     Tensor(ids_host.data(), DType::kInt32, {t}),
                     Tensor(want.data(), DType::kFloat32, {t, hidden}));
      const DeviceArray<unsigned char> d_table(table);
      const DeviceArray<int32_t> d_ids(ids);
      auto d_out = DeviceArray<float>::poisoned(t * hidden);
      ops::embedding(gpu(), Tensor(d_table.data(), dtype, {kVocab, hidden}, Device::cuda()),
                     dev_vec(d_ids, DType::kInt32, t),
                     dev_rows(d_out, DType::kFloat32, t, hidden, hidden));
      expect_bitwise(d_out.to_host(), want, std::string("embedding ") + dtype_name(dtype));
    }
  }
}

// The GPU sums the float64 squares in another (fixed) order than the CPU's sequential loop. Each
// product is exact in float64 and the two sums differ by at most ~H * 2^-53 relative, so the
// float32 mean, hence 1 / sqrt(mean + eps), can differ by one rounding (1 ulp) at most; the two
// products after it round alike: |gpu - cpu| <= 2 ulp = 2^-22 |cpu|.
constexpr double kNormRel = 2.4e-7;

TEST(CudaElementwiseTest, RmsNormMatchesTheCpuWithinAnUlpAndIsBatchInvariant) {
  LORART_REQUIRE_GPU();
  struct Shape {
    int64_t t, h, stride;
  };
  for (const Shape s : {Shape{3, 1031, 1037}, Shape{17, 4096, 4096}, Shape{2, 7, 8}}) {
    for (DType dtype : kWeightDtypes) {
      std::vector<float> x = random_floats(s.t * s.stride, 3, -3.0f, 3.0f);
      std::fill_n(x.begin(), s.h, 0.0f);  // a zero row: eps keeps it finite
      const std::vector<unsigned char> w = as_dtype(random_floats(s.h, 4, 0.5f, 1.5f), dtype);
      std::vector<unsigned char> w_host = w;
      std::vector<float> want(s.t * s.h);
      ops::rms_norm(ExecContext::cpu(), host_rows(x.data(), DType::kFloat32, s.t, s.h, s.stride),
                    Tensor(w_host.data(), dtype, {s.h}), 1e-5f,
                    Tensor(want.data(), DType::kFloat32, {s.t, s.h}));
      const DeviceArray<float> d_x(x);
      const DeviceArray<unsigned char> d_w(w);
      auto d_out = DeviceArray<float>::poisoned(s.t * s.h);
      ops::rms_norm(gpu(), dev_rows(d_x, DType::kFloat32, s.t, s.h, s.stride),
                    dev_vec(d_w, dtype, s.h), 1e-5f,
                    dev_rows(d_out, DType::kFloat32, s.t, s.h, s.h));
      const std::vector<float> got = d_out.to_host();
      const std::string what =
          std::string("rms_norm ") + dtype_name(dtype) + " H " + std::to_string(s.h);
      expect_close(got, want, abs_of(want), kNormRel, what);
      // The last row alone gives the same bits as within the batch.
      auto d_one = DeviceArray<float>::poisoned(s.h);
      ops::rms_norm(gpu(), dev_rows(d_x, DType::kFloat32, 1, s.h, s.stride, (s.t - 1) * s.stride),
                    dev_vec(d_w, dtype, s.h), 1e-5f, dev_rows(d_one, DType::kFloat32, 1, s.h, s.h));
      expect_bitwise(d_one.to_host(), std::vector<float>(got.end() - s.h, got.end()),
                     what + " alone");
      // In place (out aliasing x) gives the same bits.
      ops::rms_norm(gpu(), dev_rows(d_x, DType::kFloat32, s.t, s.h, s.stride),
                    dev_vec(d_w, dtype, s.h), 1e-5f,
                    dev_rows(d_x, DType::kFloat32, s.t, s.h, s.stride));
      const std::vector<float> in_place = d_x.to_host();
      for (int64_t t = 0; t < s.t; ++t) {
        for (int64_t i = 0; i < s.h; ++i) {
          ASSERT_EQ(in_place[t * s.stride + i], got[t * s.h + i]) << what << " in place";
        }
      }
    }
  }
}

TEST(CudaElementwiseTest, AddRmsNormIsTheGpuAddThenRmsNormBitwise) {
  LORART_REQUIRE_GPU();
  struct Shape {
    int64_t t, h, stride;
  };
  for (const Shape s : {Shape{5, 1031, 1031}, Shape{9, 2048, 2056}}) {
    for (DType dtype : kWeightDtypes) {
      const std::vector<float> res = random_floats(s.t * s.stride, 5, -3.0f, 3.0f);
      const std::vector<float> x = random_floats(s.t * s.h, 6, -3.0f, 3.0f);
      const std::vector<unsigned char> w = as_dtype(random_floats(s.h, 7, 0.5f, 1.5f), dtype);
      std::vector<float> cpu_res = res, cpu_x = x, cpu_out(s.t * s.h);
      std::vector<unsigned char> w_host = w;
      ops::add_rms_norm(
          ExecContext::cpu(), host_rows(cpu_res.data(), DType::kFloat32, s.t, s.h, s.stride),
          Tensor(cpu_x.data(), DType::kFloat32, {s.t, s.h}), Tensor(w_host.data(), dtype, {s.h}),
          1e-6f, Tensor(cpu_out.data(), DType::kFloat32, {s.t, s.h}));
      const DeviceArray<float> d_res(res), d_x(x), d_res2(res);
      const DeviceArray<unsigned char> d_w(w);
      auto d_out = DeviceArray<float>::poisoned(s.t * s.h);
      auto d_out2 = DeviceArray<float>::poisoned(s.t * s.h);
      ops::add_rms_norm(gpu(), dev_rows(d_res, DType::kFloat32, s.t, s.h, s.stride),
                        dev_rows(d_x, DType::kFloat32, s.t, s.h, s.h), dev_vec(d_w, dtype, s.h),
                        1e-6f, dev_rows(d_out, DType::kFloat32, s.t, s.h, s.h));
      const std::string what = std::string("add_rms_norm ") + dtype_name(dtype);
      expect_bitwise(d_res.to_host(), cpu_res, what + " residual");
      const std::vector<float> got = d_out.to_host();
      expect_close(got, cpu_out, abs_of(cpu_out), kNormRel, what + " out");
      // Unfused on the GPU: add row by row (add takes contiguous tensors), then rms_norm.
      for (int64_t t = 0; t < s.t; ++t) {
        ops::add(gpu(), dev_vec(d_res2, DType::kFloat32, s.h, t * s.stride),
                 dev_vec(d_x, DType::kFloat32, s.h, t * s.h));
      }
      ops::rms_norm(gpu(), dev_rows(d_res2, DType::kFloat32, s.t, s.h, s.stride),
                    dev_vec(d_w, dtype, s.h), 1e-6f,
                    dev_rows(d_out2, DType::kFloat32, s.t, s.h, s.h));
      expect_bitwise(got, d_out2.to_host(), what + " vs add + rms_norm");
    }
  }
}

// cos/sin come from CUDA's float64 library (<= 2 ulp of float64) rounded to float32: they may
// differ from the host's by 1 float32 ulp (2^-24 relative for |c|, |s| <= 1, so at most 2^-24
// absolute); each output a c - b s then moves by <= 2^-24 (|a| + |b|) plus one output rounding.
TEST(CudaElementwiseTest, RopeMatchesTheCpuWithinTheTrigRounding) {
  LORART_REQUIRE_GPU();
  struct Shape {
    int64_t t;
    int32_t heads, head_dim;
    int64_t stride;
  };
  for (const Shape s : {Shape{6, 3, 6, 23}, Shape{11, 4, 128, 600}, Shape{2, 2, 1024, 2048}}) {
    const int64_t width = int64_t{s.heads} * s.head_dim;
    const std::vector<float> x = random_floats(s.t * s.stride, 8, -2.0f, 2.0f);
    std::vector<int32_t> pos(s.t);
    for (int64_t t = 0; t < s.t; ++t) pos[t] = static_cast<int32_t>(t * 977 % 8191);
    std::vector<float> inv(s.head_dim / 2);
    for (int32_t i = 0; i < s.head_dim / 2; ++i) {
      inv[i] = std::pow(10000.0f, -2.0f * i / s.head_dim);
    }
    std::vector<float> want = x;
    std::vector<int32_t> pos_host = pos;
    std::vector<float> inv_host = inv;
    ops::rope(ExecContext::cpu(), host_rows(want.data(), DType::kFloat32, s.t, width, s.stride),
              s.head_dim, Tensor(pos_host.data(), DType::kInt32, {s.t}),
              Tensor(inv_host.data(), DType::kFloat32, {s.head_dim / 2}));
    DeviceArray<float> d_x(x);
    const DeviceArray<int32_t> d_pos(pos);
    const DeviceArray<float> d_inv(inv);
    ops::rope(gpu(), dev_rows(d_x, DType::kFloat32, s.t, width, s.stride), s.head_dim,
              dev_vec(d_pos, DType::kInt32, s.t), dev_vec(d_inv, DType::kFloat32, s.head_dim / 2));
    // The bound's scale: |a| + |b| of each element's pair, plus |out| for its own rounding.
    std::vector<float> scale(x.size());
    const int32_t half = s.head_dim / 2;
    for (int64_t t = 0; t < s.t; ++t) {
      for (int64_t j = 0; j < s.stride; ++j) {
        const int64_t e = t * s.stride + j;
        if (j >= width) {
          scale[e] = 0.0f;  // past the heads: untouched, bitwise
          continue;
        }
        const int64_t base = j - j % s.head_dim, i = j % s.head_dim % half;
        scale[e] = std::abs(x[t * s.stride + base + i]) +
                   std::abs(x[t * s.stride + base + i + half]) + std::abs(want[e]);
      }
    }
    expect_close(d_x.to_host(), want, scale, 1.2e-7, "rope head_dim " + std::to_string(s.head_dim));
  }
}

// expf on the GPU is within 2 ulp (CUDA's documented bound without fast math), the host's within
// 1: 1 + e^-g then differs by <= 3 ulp relative, and the division and product add one rounding
// each: |gpu - cpu| <= 5 ulp = 6e-7 |cpu|.
TEST(CudaElementwiseTest, SiluMulMatchesTheCpuWithinTheExpRounding) {
  LORART_REQUIRE_GPU();
  for (int64_t inter : {1027, 1024, 3}) {
    constexpr int64_t kT = 5;
    const std::vector<float> gu = random_floats(kT * 2 * inter, 9, -8.0f, 8.0f);
    std::vector<float> gu_host = gu, want(kT * inter);
    ops::silu_mul(ExecContext::cpu(), Tensor(gu_host.data(), DType::kFloat32, {kT, 2 * inter}),
                  Tensor(want.data(), DType::kFloat32, {kT, inter}));
    const DeviceArray<float> d_gu(gu);
    auto d_out = DeviceArray<float>::poisoned(kT * inter);
    ops::silu_mul(gpu(), dev_rows(d_gu, DType::kFloat32, kT, 2 * inter, 2 * inter),
                  dev_rows(d_out, DType::kFloat32, kT, inter, inter));
    expect_close(d_out.to_host(), want, abs_of(want), 6e-7, "silu_mul " + std::to_string(inter));
  }
}

TEST(CudaElementwiseTest, AddBiasAddAndGatherRowsAreBitwise) {
  LORART_REQUIRE_GPU();
  for (int64_t cols : {37, 64}) {
    for (DType dtype : kWeightDtypes) {
      constexpr int64_t kT = 6;
      const int64_t stride = cols + 4;
      const std::vector<float> y = random_floats(kT * stride, 10);
      const std::vector<unsigned char> bias = as_dtype(random_floats(cols, 11), dtype);
      std::vector<float> want = y;
      std::vector<unsigned char> bias_host = bias;
      ops::add_bias(ExecContext::cpu(), host_rows(want.data(), DType::kFloat32, kT, cols, stride),
                    Tensor(bias_host.data(), dtype, {cols}));
      DeviceArray<float> d_y(y);
      const DeviceArray<unsigned char> d_bias(bias);
      ops::add_bias(gpu(), dev_rows(d_y, DType::kFloat32, kT, cols, stride),
                    dev_vec(d_bias, dtype, cols));
      expect_bitwise(d_y.to_host(), want, std::string("add_bias ") + dtype_name(dtype));
    }
  }
  // add: a 16-byte-aligned pair and an offset one (the scalar path), with a ragged tail.
  for (int64_t offset : {0, 1}) {
    constexpr int64_t kN = 4099;
    const std::vector<float> y = random_floats(kN + 1, 12), x = random_floats(kN + 1, 13);
    std::vector<float> want = y, x_host = x;
    ops::add(ExecContext::cpu(), Tensor(want.data() + offset, DType::kFloat32, {kN}),
             Tensor(x_host.data() + offset, DType::kFloat32, {kN}));
    DeviceArray<float> d_y(y);
    const DeviceArray<float> d_x(x);
    ops::add(gpu(), dev_vec(d_y, DType::kFloat32, kN, offset),
             dev_vec(d_x, DType::kFloat32, kN, offset));
    expect_bitwise(d_y.to_host(), want, "add offset " + std::to_string(offset));
  }
  for (int64_t width : {37, 64}) {
    constexpr int64_t kT = 9;
    const std::vector<float> x = random_floats(kT * width, 14);
    const std::vector<int32_t> rows = {8, 0, 3, 3};
    const int64_t n = static_cast<int64_t>(rows.size());
    std::vector<float> x_host = x, want(n * width);
    std::vector<int32_t> rows_host = rows;
    ops::gather_rows(ExecContext::cpu(), Tensor(x_host.data(), DType::kFloat32, {kT, width}),
                     Tensor(rows_host.data(), DType::kInt32, {n}),
                     Tensor(want.data(), DType::kFloat32, {n, width}));
    const DeviceArray<float> d_x(x);
    const DeviceArray<int32_t> d_rows(rows);
    auto d_out = DeviceArray<float>::poisoned(n * width);
    ops::gather_rows(gpu(), dev_rows(d_x, DType::kFloat32, kT, width, width),
                     dev_vec(d_rows, DType::kInt32, n),
                     dev_rows(d_out, DType::kFloat32, n, width, width));
    expect_bitwise(d_out.to_host(), want, "gather_rows " + std::to_string(width));
  }
}

TEST(CudaElementwiseTest, ReadWeightRowIsBitwiseAndRowMajorOnly) {
  LORART_REQUIRE_GPU();
  for (int64_t cols : {1031, 1024}) {
    for (DType dtype : kWeightDtypes) {
      constexpr int64_t kRows = 5;
      const std::vector<unsigned char> w = as_dtype(random_floats(kRows * cols, 15), dtype);
      std::vector<unsigned char> w_host = w;
      std::vector<float> want(cols);
      ops::read_weight_row(ExecContext::cpu(), host_rows(w_host.data(), dtype, kRows, cols, cols),
                           WeightLayout::kRowMajor, 3,
                           Tensor(want.data(), DType::kFloat32, {cols}));
      const DeviceArray<unsigned char> d_w(w);
      auto d_out = DeviceArray<float>::poisoned(cols);
      ops::read_weight_row(gpu(), dev_rows(d_w, dtype, kRows, cols, cols), WeightLayout::kRowMajor,
                           3, dev_vec(d_out, DType::kFloat32, cols));
      expect_bitwise(d_out.to_host(), want, std::string("read_weight_row ") + dtype_name(dtype));
      if (dtype == DType::kBFloat16) {
        expect_error<InvalidArgument>(
            [&] {
              ops::read_weight_row(gpu(), dev_rows(d_w, dtype, kRows, cols, cols),
                                   WeightLayout::kK32Interleaved, 3,
                                   dev_vec(d_out, DType::kFloat32, cols));
            },
            "read_weight_row: w must be row-major on CUDA");
      }
    }
  }
}

// W + B A is formed with the CPU's roundings (bitwise the same row); only the float64 sum of its
// squares adds in another order (<= ~K * 2^-53 relative), so magnitude / sqrt(sum) rounded to
// float32 differs by at most 1 ulp: 1.2e-7 relative.
TEST(CudaElementwiseTest, DoraScalesMatchTheCpuWithinAnUlp) {
  LORART_REQUIRE_GPU();
  for (DType dtype : kWeightDtypes) {
    constexpr int64_t kN = 45, kOffset = 3, kOut = 37, kK = 1031, kRank = 5;
    const std::vector<unsigned char> w = as_dtype(random_floats(kN * kK, 16), dtype);
    const std::vector<unsigned char> a = as_dtype(random_floats(kRank * kK, 17), dtype);
    const std::vector<unsigned char> b = as_dtype(random_floats(kOut * kRank, 18), dtype);
    const std::vector<unsigned char> m = as_dtype(random_floats(kOut, 19, 0.5f, 2.0f), dtype);
    std::vector<unsigned char> w_h = w, a_h = a, b_h = b, m_h = m;
    std::vector<float> want(kOut);
    ops::dora_scales(ExecContext::cpu(), host_rows(w_h.data(), dtype, kN, kK, kK),
                     WeightLayout::kRowMajor, kOffset, Tensor(a_h.data(), dtype, {kRank, kK}),
                     Tensor(b_h.data(), dtype, {kOut, kRank}), Tensor(m_h.data(), dtype, {kOut}),
                     Tensor(want.data(), DType::kFloat32, {kOut}));
    const DeviceArray<unsigned char> d_w(w), d_a(a), d_b(b), d_m(m);
    auto d_scales = DeviceArray<float>::poisoned(kOut);
    ops::dora_scales(gpu(), dev_rows(d_w, dtype, kN, kK, kK), WeightLayout::kRowMajor, kOffset,
                     dev_rows(d_a, dtype, kRank, kK, kK), dev_rows(d_b, dtype, kOut, kRank, kRank),
                     dev_vec(d_m, dtype, kOut), dev_vec(d_scales, DType::kFloat32, kOut));
    expect_close(d_scales.to_host(), want, abs_of(want), 1.2e-7,
                 std::string("dora_scales ") + dtype_name(dtype));
  }
}

// Runs over the batch with slots whose pair has a DoRA scale and one without, tokens outside every
// run, a bias in each dtype and none: the GPU reads the device runs and pairs and matches bitwise.
TEST(CudaElementwiseTest, LoraDoraApplyReadsTheDeviceTableAndIsBitwise) {
  LORART_REQUIRE_GPU();
  constexpr int64_t kT = 11, kOut = 37, kStride = 45, kPairsPerSlot = 2, kPairIndex = 1;
  const std::vector<float> scale0 = random_floats(kOut, 20, 0.5f, 1.5f);
  const std::vector<float> scale2 = random_floats(kOut, 21, 0.5f, 1.5f);
  const DeviceArray<float> d_scale0(scale0), d_scale2(scale2);
  std::vector<LoraPair> host_pairs(3 * kPairsPerSlot), dev_pairs(3 * kPairsPerSlot);
  for (int s = 0; s < 3; ++s) host_pairs[s * kPairsPerSlot + kPairIndex].rank = 4;
  dev_pairs = host_pairs;
  std::vector<LoraPair> cpu_pairs = host_pairs;  // the CPU's table: host scales
  cpu_pairs[0 * kPairsPerSlot + kPairIndex].dora_scale = scale0.data();
  cpu_pairs[2 * kPairsPerSlot + kPairIndex].dora_scale = scale2.data();
  dev_pairs[0 * kPairsPerSlot + kPairIndex].dora_scale = d_scale0.data();
  dev_pairs[2 * kPairsPerSlot + kPairIndex].dora_scale = d_scale2.data();
  host_pairs = dev_pairs;  // on CUDA the host table holds device pointers
  const std::vector<LoraRun> runs = {{0, 3, 2}, {4, 7, 1}, {7, 10, 0}};  // token 3 and 10: none
  const DeviceArray<LoraRun> d_runs(runs);
  const DeviceArray<LoraPair> d_pairs(dev_pairs);
  for (int bias_kind = 0; bias_kind < 4; ++bias_kind) {
    const bool has_bias = bias_kind < 3;
    const DType dtype = has_bias ? kWeightDtypes[bias_kind] : DType::kFloat32;
    const std::vector<unsigned char> bias = as_dtype(random_floats(kOut, 22), dtype);
    std::vector<unsigned char> bias_h = bias;
    const std::vector<float> y = random_floats(kT * kStride, 23, -3.0f, 3.0f);
    std::vector<float> want = y;
    ops::LoraBatch cpu_batch;
    cpu_batch.runs = runs.data();
    cpu_batch.num_runs = static_cast<int32_t>(runs.size());
    cpu_batch.pairs = cpu_pairs.data();
    cpu_batch.num_slots = 3;
    cpu_batch.pairs_per_slot = kPairsPerSlot;
    ops::lora_dora_apply(
        ExecContext::cpu(), host_rows(want.data(), DType::kFloat32, kT, kOut, kStride), kOut,
        has_bias ? Tensor(bias_h.data(), dtype, {kOut}) : Tensor(), cpu_batch, kPairIndex);
    DeviceArray<float> d_y(y);
    const DeviceArray<unsigned char> d_bias(bias);
    ops::LoraBatch gpu_batch = cpu_batch;
    gpu_batch.pairs = host_pairs.data();
    gpu_batch.device_runs = d_runs.data();
    gpu_batch.device_pairs = d_pairs.data();
    ops::lora_dora_apply(gpu(), dev_rows(d_y, DType::kFloat32, kT, kOut, kStride), kOut,
                         has_bias ? dev_vec(d_bias, dtype, kOut) : Tensor(), gpu_batch, kPairIndex);
    expect_bitwise(d_y.to_host(), want, "lora_dora_apply bias kind " + std::to_string(bias_kind));
    ops::LoraBatch no_device = gpu_batch;
    no_device.device_runs = nullptr;
    expect_error<InvalidArgument>(
        [&] {
          ops::lora_dora_apply(gpu(), dev_rows(d_y, DType::kFloat32, kT, kOut, kStride), kOut,
                               Tensor(), no_device, kPairIndex);
        },
        "lora_dora_apply: a CUDA LoRA batch needs device_runs and device_pairs");
  }
}

}  // namespace
}  // namespace lorart

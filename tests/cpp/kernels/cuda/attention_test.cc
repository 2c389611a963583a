// GPU tests of the CUDA paged attention (kernels/cuda/attention/) against the CPU kernel, the
// reference, on random inputs: decode, prefill and mixed steps, GQA / MQA / MHA, sliding windows,
// float32 / float16 / bfloat16 caches, several block sizes, contexts up to a few thousand keys.
// Outputs are poisoned (NaN) before each run. Skipped without a GPU.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "core/buffer.h"
#include "core/errors.h"
#include "kernels/cuda/cuda_test_util.h"
#include "kernels/ops.h"
#include "test_util.h"

namespace lorart {
namespace {

using testing_util::DeviceArray;

struct Case {
  int32_t num_heads, num_kv_heads, head_dim, block_size, window;
  DType dtype;
  // Per sequence: tokens already cached, and the chunk's length.
  std::vector<std::pair<int32_t, int32_t>> seqs;
};

struct Result {
  std::vector<float> out;
  std::vector<uint16_t> cache;  // K then V, raw bytes as 16-bit words
};

// A random step and cache: the context positions of every sequence hold random values already
// (in the cache dtype), the chunk's K / V are new. Same inputs on both devices.
struct Step {
  explicit Step(const Case& c, uint32_t seed) : c(c) {
    std::mt19937 rng(seed);
    std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
    const int64_t kv_width = int64_t{c.num_kv_heads} * c.head_dim;
    int32_t max_blocks = 1;
    for (auto [ctx, n] : c.seqs) {
      max_blocks = std::max(max_blocks, (ctx + n + c.block_size - 1) / c.block_size);
      max_query_len = std::max(max_query_len, n);
      max_kv_len = std::max(max_kv_len, ctx + n);
      tokens += n;
    }
    num_blocks = int64_t{max_blocks} * static_cast<int64_t>(c.seqs.size()) + 3;
    // Shuffled block ids, so no table is contiguous or in order.
    std::vector<int32_t> pool(num_blocks);
    std::iota(pool.begin(), pool.end(), 0);
    std::shuffle(pool.begin(), pool.end(), rng);
    starts = {0};
    size_t next = 0;
    for (auto [ctx, n] : c.seqs) {
      starts.push_back(starts.back() + n);
      context_lens.push_back(ctx);
      for (int32_t b = 0; b < max_blocks; ++b) {
        tables.push_back(b * c.block_size < ctx + n ? pool.at(next++) : -1);
      }
    }
    width = max_blocks;
    const int64_t row = int64_t{c.num_heads} * c.head_dim + 2 * kv_width;
    qkv.resize(tokens * row);
    for (float& x : qkv) x = dist(rng);
    cache_bytes = static_cast<size_t>(num_blocks) * c.block_size * kv_width * dtype_size(c.dtype);
    cache.resize(2 * cache_bytes);
    std::vector<float> values(cache.size() / dtype_size(c.dtype));
    for (float& x : values) x = dist(rng);
    for (size_t i = 0; i < values.size(); ++i) {
      if (c.dtype == DType::kFloat32) {
        std::memcpy(cache.data() + 4 * i, &values[i], 4);
      } else {
        const uint16_t w =
            c.dtype == DType::kBFloat16 ? float_to_bfloat16(values[i]) : float_to_half(values[i]);
        std::memcpy(cache.data() + 2 * i, &w, 2);
      }
    }
  }

  Result run(bool on_gpu) const {
    const int64_t kv_width = int64_t{c.num_kv_heads} * c.head_dim;
    const int64_t q_width = int64_t{c.num_heads} * c.head_dim;
    const int64_t row = q_width + 2 * kv_width;
    const Device dev = on_gpu ? Device::cuda(0) : Device::cpu();
    auto upload = [&](const void* src, size_t bytes) {
      Buffer b = Buffer::allocate(std::max<size_t>(bytes, 1), dev, "test");
      if (bytes > 0) copy_bytes(b.data(), dev, src, Device::cpu(), bytes);
      return b;
    };
    Buffer qkv_b = upload(qkv.data(), qkv.size() * sizeof(float));
    Buffer cache_b = upload(cache.data(), cache.size());
    Buffer starts_b = upload(starts.data(), starts.size() * 4);
    Buffer ctx_b = upload(context_lens.data(), context_lens.size() * 4);
    Buffer tables_b = upload(tables.data(), tables.size() * 4);
    std::vector<float> poison(tokens * q_width, NAN);
    Buffer out_b = upload(poison.data(), poison.size() * sizeof(float));
    const ops::AttentionShape shape{c.num_heads, c.num_kv_heads, c.head_dim, c.window,
                                    1.0f / std::sqrt(static_cast<float>(c.head_dim))};
    const ExecContext ctx =
        on_gpu ? ExecContext{Device::cuda(0), nullptr, 0, Precision::kFloat32} : ExecContext::cpu();
    const auto num_seqs = static_cast<int64_t>(c.seqs.size());
    const size_t ws_bytes = ops::paged_attention_workspace_bytes(ctx, num_seqs, max_kv_len, shape);
    std::vector<float> ws_poison(ws_bytes / 4 + 1, NAN);
    Buffer ws_b = upload(ws_poison.data(), ws_poison.size() * 4);
    float* base = static_cast<float*>(qkv_b.data());
    const int64_t strides[2] = {row, 1};
    const int64_t q_shape[2] = {tokens, q_width}, kv_shape[2] = {tokens, kv_width};
    const Tensor q(base, DType::kFloat32, 2, q_shape, strides, dev);
    const Tensor k(base + q_width, DType::kFloat32, 2, kv_shape, strides, dev);
    const Tensor v(base + q_width + kv_width, DType::kFloat32, 2, kv_shape, strides, dev);
    const int64_t cache_shape[4] = {num_blocks, c.block_size, c.num_kv_heads, c.head_dim};
    const int64_t cache_strides[4] = {c.block_size * kv_width, kv_width, c.head_dim, 1};
    char* cache_base = static_cast<char*>(cache_b.data());
    const Tensor k_cache(cache_base, c.dtype, 4, cache_shape, cache_strides, dev);
    const Tensor v_cache(cache_base + cache_bytes, c.dtype, 4, cache_shape, cache_strides, dev);
    ops::AttentionBatch batch;
    const int64_t s1[1] = {num_seqs + 1}, s0[1] = {num_seqs}, st[2] = {num_seqs, width};
    const int64_t u1[1] = {1}, u2[2] = {width, 1};
    batch.seq_starts = Tensor(starts_b.data(), DType::kInt32, 1, s1, u1, dev);
    batch.context_lens = Tensor(ctx_b.data(), DType::kInt32, 1, s0, u1, dev);
    batch.block_tables = Tensor(tables_b.data(), DType::kInt32, 2, st, u2, dev);
    batch.max_query_len = max_query_len;
    batch.max_kv_len = max_kv_len;
    const int64_t ws_shape[1] = {static_cast<int64_t>(ws_poison.size())};
    batch.workspace = Tensor(ws_b.data(), DType::kFloat32, 1, ws_shape, u1, dev);
    const int64_t o_shape[2] = {tokens, q_width}, o_strides[2] = {q_width, 1};
    ops::paged_attention(ctx, q, k, v, k_cache, v_cache, batch, shape,
                         Tensor(out_b.data(), DType::kFloat32, 2, o_shape, o_strides, dev));
    Result r;
    r.out.resize(poison.size());
    copy_bytes(r.out.data(), Device::cpu(), out_b.data(), dev, r.out.size() * sizeof(float));
    r.cache.resize(cache.size() / 2);
    copy_bytes(r.cache.data(), Device::cpu(), cache_b.data(), dev, cache.size());
    return r;
  }

  Case c;
  int32_t max_query_len = 0, max_kv_len = 0, width = 1;
  int64_t tokens = 0, num_blocks = 0;
  size_t cache_bytes = 0;
  std::vector<int32_t> starts, context_lens, tables;
  std::vector<float> qkv;
  std::vector<char> cache;
};

// Outputs are convex combinations of V values in [-1, 1]. Decode and float32 caches compute in
// float32 on both sides, in different orders (online softmax, split-KV, __expf): differences
// stay near 1e-6, and 1e-4 still catches a wrong key, head, block or mask (errors of order 0.1).
// Prefill on a 16-bit cache runs on tensor cores with the query and the probabilities rounded
// once to the cache dtype (unit roundoff u = 2^-8 bf16, 2^-11 fp16): each element within 5u, and
// the mean error within u, which a systematic mistake (a wrong tile, a missed rescale) exceeds.
float tolerance(DType dtype) {
  return dtype == DType::kFloat32 ? 1e-4f : dtype == DType::kFloat16 ? 5 * 0x1p-11f : 5 * 0x1p-8f;
}
double mean_tolerance(DType dtype) {
  return dtype == DType::kFloat32 ? 1e-5 : dtype == DType::kFloat16 ? 0x1p-11 : 0x1p-8;
}

void expect_close(const Case& c, uint32_t seed) {
  const Step step(c, seed);
  const Result cpu = step.run(false);
  const Result gpu = step.run(true);
  // The append writes exactly what the CPU writes (same rounding), and nothing else.
  ASSERT_EQ(cpu.cache, gpu.cache) << "KV cache contents differ";
  ASSERT_EQ(cpu.out.size(), gpu.out.size());
  double total = 0.0;
  for (size_t i = 0; i < cpu.out.size(); ++i) {
    ASSERT_TRUE(std::isfinite(gpu.out[i])) << "element " << i << " not written";
    ASSERT_NEAR(cpu.out[i], gpu.out[i], tolerance(c.dtype)) << "element " << i;
    total += std::fabs(double{cpu.out[i]} - gpu.out[i]);
  }
  EXPECT_LE(total / static_cast<double>(cpu.out.size()), mean_tolerance(c.dtype));
}

const DType kDtypes[] = {DType::kFloat32, DType::kFloat16, DType::kBFloat16};

TEST(CudaPagedAttentionTest, DecodeMatchesCpuAcrossDtypesHeadsAndLengths) {
  LORART_REQUIRE_GPU();
  for (DType dtype : kDtypes) {
    SCOPED_TRACE(dtype_name(dtype));
    // GQA (4 per KV head), MQA, MHA; contexts below, at and across split boundaries.
    expect_close({32, 8, 128, 16, 0, dtype, {{0, 1}, {255, 1}, {256, 1}, {3000, 1}, {17, 1}}}, 1);
    expect_close({16, 1, 64, 32, 0, dtype, {{511, 1}, {1, 1}, {1200, 1}}}, 2);
    expect_close({4, 4, 128, 8, 0, dtype, {{700, 1}, {2047, 1}}}, 3);
    // group 12 > the 8 heads a decode block scores at once; odd head_dim multiple of 2.
    expect_close({24, 2, 80, 16, 0, dtype, {{900, 1}, {5, 1}}}, 4);
    expect_close({8, 2, 256, 16, 0, dtype, {{600, 1}}}, 5);
    expect_close({4, 2, 66, 7, 0, dtype, {{300, 1}, {40, 1}}}, 6);  // scalar-load path
  }
}

TEST(CudaPagedAttentionTest, PrefillAndMixedStepsMatchCpu) {
  LORART_REQUIRE_GPU();
  for (DType dtype : kDtypes) {
    SCOPED_TRACE(dtype_name(dtype));
    expect_close({32, 8, 128, 16, 0, dtype, {{0, 200}, {0, 3}}}, 11);
    // Chunked prefill on top of cached context, next to decode tokens.
    expect_close({32, 8, 128, 16, 0, dtype, {{1000, 1}, {500, 77}, {0, 1}, {2500, 33}}}, 12);
    expect_close({16, 1, 64, 32, 0, dtype, {{64, 130}, {300, 1}}}, 13);
    expect_close({6, 6, 96, 1, 0, dtype, {{10, 45}, {3, 2}}}, 14);  // block size 1
    expect_close({24, 2, 80, 64, 0, dtype, {{0, 50}, {333, 1}}}, 15);
  }
}

TEST(CudaPagedAttentionTest, SlidingWindowMatchesCpu) {
  LORART_REQUIRE_GPU();
  for (DType dtype : kDtypes) {
    SCOPED_TRACE(dtype_name(dtype));
    expect_close({32, 8, 128, 16, 100, dtype, {{1500, 1}, {300, 60}, {0, 120}}}, 21);
    expect_close({8, 2, 64, 16, 300, dtype, {{2000, 1}, {255, 1}, {700, 40}}}, 22);
    expect_close({4, 1, 64, 16, 1, dtype, {{50, 1}, {10, 20}}}, 23);  // each token sees itself
  }
}

// A sequence's output is bitwise the same alone and in a batch whose bounds (and so grids) are
// larger: the split and tile choices depend on its own lengths only.
TEST(CudaPagedAttentionTest, SequenceOutputDoesNotDependOnTheBatch) {
  LORART_REQUIRE_GPU();
  for (DType dtype : {DType::kFloat32, DType::kBFloat16}) {
    SCOPED_TRACE(dtype_name(dtype));
    const int32_t heads = 32, kv_heads = 8, hd = 128;
    Case alone{heads, kv_heads, hd, 16, 0, dtype, {{1000, 1}, {300, 40}}};
    Case packed{heads, kv_heads, hd, 16, 0, dtype, {{4000, 1}, {1000, 1}, {0, 150}, {300, 40}}};
    Step a(alone, 31), b(packed, 32);
    // Give the packed step the same inputs for the two shared sequences: their q / k / v rows and
    // their cached context, copied block by block.
    const int64_t q_width = int64_t{heads} * hd, kv_width = int64_t{kv_heads} * hd;
    const int64_t row = q_width + 2 * kv_width;
    const int64_t elt = static_cast<int64_t>(dtype_size(dtype));
    const int64_t block_bytes = int64_t{16} * kv_width * elt;
    const std::pair<int, int> same[] = {{0, 1}, {1, 3}};  // (index in a, index in b)
    for (auto [ia, ib] : same) {
      std::copy(a.qkv.begin() + a.starts[ia] * row, a.qkv.begin() + a.starts[ia + 1] * row,
                b.qkv.begin() + b.starts[ib] * row);
      for (int32_t blk = 0; blk < a.width; ++blk) {
        const int32_t src = a.tables[ia * a.width + blk], dst = b.tables[ib * b.width + blk];
        if (src < 0) continue;
        for (int kv = 0; kv < 2; ++kv) {
          std::memcpy(b.cache.data() + kv * b.cache_bytes + dst * block_bytes,
                      a.cache.data() + kv * a.cache_bytes + src * block_bytes, block_bytes);
        }
      }
    }
    const Result ra = a.run(true), rb = b.run(true);
    for (auto [ia, ib] : same) {
      const int64_t n = (a.starts[ia + 1] - a.starts[ia]) * q_width;
      ASSERT_EQ(0, std::memcmp(ra.out.data() + a.starts[ia] * q_width,
                               rb.out.data() + b.starts[ib] * q_width, n * sizeof(float)))
          << "sequence " << ia;
    }
  }
}

TEST(CudaPagedAttentionTest, UnknownBoundsAreRefused) {
  LORART_REQUIRE_GPU();
  Case c{4, 2, 64, 16, 0, DType::kFloat32, {{10, 1}}};
  Step step(c, 41);
  step.max_query_len = 0;
  testing_util::expect_error<InvalidArgument>([&] { step.run(true); },
                                              "paged_attention: on CUDA max_query_len (0)");
}

}  // namespace
}  // namespace lorart

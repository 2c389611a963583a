#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "core/errors.h"
#include "kernels/kernel_test_util.h"
#include "kernels/ops.h"
#include "kernels/params.h"
#include "test_util.h"

namespace lorart {
namespace {

constexpr int32_t kBlockSize = 4;
constexpr int32_t kNumBlocks = 40;
constexpr int32_t kHeadDim = 8;

struct Shape {
  int32_t num_heads, num_kv_heads, sliding_window;
  int64_t q_width() const { return int64_t{num_heads} * kHeadDim; }
  int64_t kv_width() const { return int64_t{num_kv_heads} * kHeadDim; }
  // A packed row as the model lays it out: q, then k, then v.
  int64_t row_width() const { return q_width() + 2 * kv_width(); }
};

// One sequence's full q/k/v, in the packed row layout, and the cache blocks it owns.
struct Sequence {
  int32_t length;
  std::vector<float> rows;  // [length, row_width]
  std::vector<int32_t> blocks;
};

// A chunk of a sequence in one call: positions [begin, end); begin is its context length.
struct Chunk {
  const Sequence* seq;
  int32_t begin, end;
};

// The pool in float32 (k, v) or a 16-bit dtype (k16, v16, raw words).
struct Cache {
  explicit Cache(const Shape& shape, DType dtype = DType::kFloat32)
      : dtype(dtype),
        k(dtype == DType::kFloat32 ? size_t{kNumBlocks} * kBlockSize * shape.kv_width() : 0),
        v(k.size()),
        k16(dtype == DType::kFloat32 ? 0 : size_t{kNumBlocks} * kBlockSize * shape.kv_width()),
        v16(k16.size()) {}
  DType dtype;
  std::vector<float> k, v;
  std::vector<uint16_t> k16, v16;
  void* k_data() { return dtype == DType::kFloat32 ? static_cast<void*>(k.data()) : k16.data(); }
  void* v_data() { return dtype == DType::kFloat32 ? static_cast<void*>(v.data()) : v16.data(); }
  int64_t elements() const { return static_cast<int64_t>(k.size() + k16.size()); }
};

// `x` as the cache stores it: rounded to nearest even for a 16-bit dtype, widened back.
double stored(float x, DType dtype) {
  if (dtype == DType::kBFloat16) return bfloat16_to_float(float_to_bfloat16(x));
  if (dtype == DType::kFloat16) return half_to_float(float_to_half(x));
  return x;
}

// Sequences of the given lengths with random rows and blocks drawn from a shuffled pool, so no
// block table is contiguous or in order.
std::vector<Sequence> make_sequences(const Shape& shape, const std::vector<int32_t>& lengths) {
  std::mt19937 rng(42);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  std::vector<int32_t> pool(kNumBlocks);
  std::iota(pool.begin(), pool.end(), 0);
  std::shuffle(pool.begin(), pool.end(), rng);
  std::vector<Sequence> seqs;
  size_t next_block = 0;
  for (int32_t length : lengths) {
    Sequence s{length, std::vector<float>(length * shape.row_width()), {}};
    for (float& x : s.rows) x = dist(rng);
    for (int32_t b = 0; b * kBlockSize < length; ++b) s.blocks.push_back(pool.at(next_block++));
    seqs.push_back(std::move(s));
  }
  return seqs;
}

// Runs one paged_attention call over the packed chunks; returns out [tokens, heads * head_dim].
std::vector<float> run(const Shape& shape, const std::vector<Chunk>& chunks, Cache& cache) {
  const int64_t width = shape.row_width();
  std::vector<float> rows;
  std::vector<int32_t> starts = {0}, context_lens, tables;
  size_t max_blocks = 1;
  for (const Chunk& c : chunks) max_blocks = std::max(max_blocks, c.seq->blocks.size());
  for (const Chunk& c : chunks) {
    rows.insert(rows.end(), c.seq->rows.begin() + c.begin * width,
                c.seq->rows.begin() + c.end * width);
    starts.push_back(starts.back() + c.end - c.begin);
    context_lens.push_back(c.begin);
    std::vector<int32_t> table = c.seq->blocks;
    table.resize(max_blocks, -1);
    tables.insert(tables.end(), table.begin(), table.end());
  }
  const int64_t tokens = starts.back();
  std::vector<float> out(tokens * shape.q_width());
  const int64_t kv_shape[2] = {tokens, shape.kv_width()};
  const int64_t strides[2] = {width, 1};
  const Tensor k(rows.data() + shape.q_width(), DType::kFloat32, 2, kv_shape, strides);
  const Tensor v(rows.data() + shape.q_width() + shape.kv_width(), DType::kFloat32, 2, kv_shape,
                 strides);
  const int64_t q_shape[2] = {tokens, shape.q_width()};
  const Tensor q(rows.data(), DType::kFloat32, 2, q_shape, strides);
  const int64_t num_blocks = cache.elements() / (int64_t{kBlockSize} * shape.kv_width());
  const Tensor k_cache(cache.k_data(), cache.dtype,
                       {num_blocks, kBlockSize, shape.num_kv_heads, kHeadDim});
  const Tensor v_cache(cache.v_data(), cache.dtype,
                       {num_blocks, kBlockSize, shape.num_kv_heads, kHeadDim});
  const auto num_seqs = static_cast<int64_t>(chunks.size());
  const ops::AttentionBatch batch{
      Tensor(starts.data(), DType::kInt32, {num_seqs + 1}),
      Tensor(context_lens.data(), DType::kInt32, {num_seqs}),
      Tensor(tables.data(), DType::kInt32, {num_seqs, static_cast<int64_t>(max_blocks)})};
  const ops::AttentionShape attn{shape.num_heads, shape.num_kv_heads, kHeadDim,
                                 shape.sliding_window,
                                 1.0f / std::sqrt(static_cast<float>(kHeadDim))};
  ops::paged_attention(ExecContext::cpu(), q, k, v, k_cache, v_cache, batch, attn,
                       Tensor(out.data(), DType::kFloat32, {tokens, shape.q_width()}));
  return out;
}

// Plain causal attention over the contiguous sequence, in double, with K and V as a cache of
// `dtype` holds them: [length, heads * head_dim].
std::vector<double> reference(const Shape& shape, const Sequence& s,
                              DType dtype = DType::kFloat32) {
  const int64_t width = shape.row_width();
  const int32_t group = shape.num_heads / shape.num_kv_heads;
  const double scale = 1.0 / std::sqrt(static_cast<double>(kHeadDim));
  std::vector<double> out(s.length * shape.q_width(), 0.0);
  for (int32_t pos = 0; pos < s.length; ++pos) {
    const int32_t first =
        shape.sliding_window > 0 ? std::max(0, pos - shape.sliding_window + 1) : 0;
    for (int32_t h = 0; h < shape.num_heads; ++h) {
      const float* q = &s.rows[pos * width + h * kHeadDim];
      const int64_t k_off = shape.q_width() + (h / group) * kHeadDim;
      const int64_t v_off = k_off + shape.kv_width();
      std::vector<double> w;
      for (int32_t j = first; j <= pos; ++j) {
        double dot = 0.0;
        for (int32_t d = 0; d < kHeadDim; ++d) {
          dot += double{q[d]} * stored(s.rows[j * width + k_off + d], dtype);
        }
        w.push_back(dot * scale);
      }
      const double max_w = *std::max_element(w.begin(), w.end());
      double total = 0.0;
      for (double& x : w) total += (x = std::exp(x - max_w));
      double* o = &out[(pos * shape.num_heads + h) * kHeadDim];
      for (int32_t j = first; j <= pos; ++j) {
        for (int32_t d = 0; d < kHeadDim; ++d) {
          o[d] += w[j - first] / total * stored(s.rows[j * width + v_off + d], dtype);
        }
      }
    }
  }
  return out;
}

// Checks the rows of `out` that belong to `chunks` against each sequence's reference.
void expect_matches_reference(const Shape& shape, const std::vector<Chunk>& chunks,
                              const std::vector<float>& out, DType dtype = DType::kFloat32) {
  const int64_t q_width = shape.q_width();
  int64_t row = 0;
  for (size_t c = 0; c < chunks.size(); ++c) {
    const std::vector<double> ref = reference(shape, *chunks[c].seq, dtype);
    for (int32_t pos = chunks[c].begin; pos < chunks[c].end; ++pos, ++row) {
      for (int64_t i = 0; i < q_width; ++i) {
        ASSERT_NEAR(out[row * q_width + i], ref[pos * q_width + i], 1e-5)
            << "chunk " << c << ", position " << pos << ", element " << i;
      }
    }
  }
}

// A first call prefills some sequences; a second call packs decode tokens, a chunked-prefill
// continuation and a fresh prefill, each reading the context the first call cached.
void check_prefill_then_mixed_step(const Shape& shape, DType dtype = DType::kFloat32) {
  const std::vector<Sequence> seqs = make_sequences(shape, {10, 13, 13, 15, 1});
  Cache cache(shape, dtype);
  const std::vector<Chunk> prefill = {{&seqs[0], 0, 9}, {&seqs[2], 0, 6}, {&seqs[3], 0, 14}};
  expect_matches_reference(shape, prefill, run(shape, prefill, cache), dtype);
  const std::vector<Chunk> step = {{&seqs[0], 9, 10},
                                   {&seqs[1], 0, 13},
                                   {&seqs[2], 6, 13},
                                   {&seqs[3], 14, 15},
                                   {&seqs[4], 0, 1}};
  expect_matches_reference(shape, step, run(shape, step, cache), dtype);
}

TEST(PagedAttentionTest, GroupedQueryAttentionMatchesContiguousReference) {
  check_prefill_then_mixed_step({4, 2, 0});
}

TEST(PagedAttentionTest, MultiQueryAttentionMatchesContiguousReference) {
  check_prefill_then_mixed_step({4, 1, 0});
}

TEST(PagedAttentionTest, MultiHeadAttentionMatchesContiguousReference) {
  check_prefill_then_mixed_step({2, 2, 0});
}

TEST(PagedAttentionTest, SlidingWindowAttendsToTheLastWindowPositions) {
  check_prefill_then_mixed_step({4, 2, 5});
  check_prefill_then_mixed_step({4, 1, 1});  // a window of 1: each token sees only itself
}

// 16-bit caches: the values the reference reads are the rounded ones, so a kernel that rounded
// differently (truncation) or read the words as anything but widened floats fails the 1e-5 bound.
TEST(PagedAttentionTest, SixteenBitCachesMatchTheReferenceOnTheirRoundedValues) {
  for (DType dtype : {DType::kBFloat16, DType::kFloat16}) {
    SCOPED_TRACE(dtype_name(dtype));
    check_prefill_then_mixed_step({4, 2, 0}, dtype);
    check_prefill_then_mixed_step({4, 1, 5}, dtype);
  }
}

TEST(PagedAttentionTest, SixteenBitCachesStoreRowsRoundedToNearestEven) {
  const Shape shape{2, 1, 0};
  for (DType dtype : {DType::kBFloat16, DType::kFloat16}) {
    SCOPED_TRACE(dtype_name(dtype));
    std::vector<Sequence> seqs = make_sequences(shape, {5});
    // A tie (exactly half an ulp above 1) and an infinity: nearest-even keeps 1.0, not 1 + ulp.
    const int64_t k0 = shape.q_width();
    seqs[0].rows[k0] = dtype == DType::kBFloat16 ? 1.0f + 0x1p-8f : 1.0f + 0x1p-11f;
    seqs[0].rows[k0 + 1] = INFINITY;
    Cache cache(shape, dtype);
    run(shape, {{&seqs[0], 0, 5}}, cache);
    const int64_t kv = shape.kv_width();
    for (int32_t pos = 0; pos < 5; ++pos) {
      const int64_t slot =
          int64_t{seqs[0].blocks[pos / kBlockSize]} * kBlockSize + pos % kBlockSize;
      const float* row = &seqs[0].rows[pos * shape.row_width() + shape.q_width()];
      for (int64_t i = 0; i < kv; ++i) {
        const uint16_t want_k =
            dtype == DType::kBFloat16 ? float_to_bfloat16(row[i]) : float_to_half(row[i]);
        const uint16_t want_v =
            dtype == DType::kBFloat16 ? float_to_bfloat16(row[kv + i]) : float_to_half(row[kv + i]);
        EXPECT_EQ(cache.k16[slot * kv + i], want_k) << pos << " " << i;
        EXPECT_EQ(cache.v16[slot * kv + i], want_v) << pos << " " << i;
      }
    }
    const int64_t slot0 = int64_t{seqs[0].blocks[0]} * kBlockSize;
    EXPECT_EQ(stored(seqs[0].rows[k0], dtype), 1.0);
    EXPECT_EQ(cache.k16[slot0 * kv], dtype == DType::kBFloat16 ? 0x3F80 : 0x3C00);
  }
}

TEST(PagedAttentionTest, CpuNeedsNoWorkspace) {
  const ops::AttentionShape attn{32, 8, 128, 0, 0.1f};
  EXPECT_EQ(ops::paged_attention_workspace_bytes(ExecContext::cpu(), 64, 16384, attn), 0u);
  testing_util::expect_error<InvalidArgument>(
      [&] { ops::paged_attention_workspace_bytes(ExecContext::cpu(), -1, 16, attn); },
      "paged_attention_workspace_bytes: max_seqs (-1)");
}

TEST(PagedAttentionTest, SequenceResultDoesNotDependOnItsBatchNeighbours) {
  const Shape shape{4, 2, 0};
  const std::vector<Sequence> seqs = make_sequences(shape, {12, 7, 9});
  Cache cache(shape);
  run(shape, {{&seqs[0], 0, 10}, {&seqs[2], 0, 8}}, cache);
  const std::vector<float> alone = run(shape, {{&seqs[0], 10, 12}}, cache);
  // Re-running the same chunk rewrites identical K/V into the same slots.
  const std::vector<float> packed =
      run(shape, {{&seqs[1], 0, 7}, {&seqs[0], 10, 12}, {&seqs[2], 8, 9}}, cache);
  const int64_t offset = 7 * shape.q_width();
  ASSERT_EQ(alone.size(), 2 * shape.q_width());
  for (size_t i = 0; i < alone.size(); ++i) EXPECT_EQ(alone[i], packed[offset + i]) << i;
}

// A token's output is bitwise the same computed as a decode token, inside one prefill of the
// whole sequence, or inside chunks of any length next to other sequences, at any thread count:
// what recompute after preemption relies on.
void check_token_output_invariance(const Shape& shape) {
  const std::vector<Sequence> seqs = make_sequences(shape, {37, 20});
  const Sequence& s = seqs[0];
  const int64_t q_width = shape.q_width();
  Cache cache(shape);
  const std::vector<float> whole = run(shape, {{&s, 0, s.length}}, cache);
  for (int threads : testing_util::kThreadCounts) {
    testing_util::ScopedThreads scoped(threads);
    for (const std::vector<int32_t>& cuts :
         {std::vector<int32_t>{}, {1, 2, 3, 4, 5, 6, 7, 8, 9, 10}, {3, 20, 21, 33}, {16, 17}}) {
      std::vector<int32_t> bounds = {0};
      bounds.insert(bounds.end(), cuts.begin(), cuts.end());
      if (cuts.size() == 10) {  // decode from position 10 on
        for (int32_t p = 11; p < s.length; ++p) bounds.push_back(p);
      }
      bounds.push_back(s.length);
      for (size_t c = 0; c + 1 < bounds.size(); ++c) {
        // The other sequence's prefill of a varying length sits before this chunk.
        const int32_t other = 1 + static_cast<int32_t>(c % 19);
        const std::vector<float> out =
            run(shape, {{&seqs[1], 0, other}, {&s, bounds[c], bounds[c + 1]}}, cache);
        const int64_t rows = bounds[c + 1] - bounds[c];
        ASSERT_EQ(0, std::memcmp(out.data() + other * q_width, whole.data() + bounds[c] * q_width,
                                 rows * q_width * sizeof(float)))
            << "positions [" << bounds[c] << ", " << bounds[c + 1] << "), " << threads
            << " thread(s), window " << shape.sliding_window;
      }
    }
  }
}

// A token's output is bitwise the same computed as a decode token, inside one prefill of the
// whole sequence, or inside chunks of any length next to other sequences, at any thread count:
// what recompute after preemption relies on.
TEST(PagedAttentionTest, TokenOutputIsTheSameAsDecodeOrInAnyChunkAndThreadCount) {
  for (cpu::GemmIsa isa : testing_util::supported_gemm_isas()) {
    SCOPED_TRACE(cpu::gemm_isa_name(isa));
    testing_util::ScopedGemmIsa scoped(isa);
    check_token_output_invariance({4, 2, 0});
    check_token_output_invariance({4, 1, 6});
  }
}

TEST(PagedAttentionTest, WritesChunkKeysAndValuesToTheirSlots) {
  const Shape shape{4, 2, 0};
  const std::vector<Sequence> seqs = make_sequences(shape, {7});
  Cache cache(shape);
  run(shape, {{&seqs[0], 0, 3}}, cache);
  run(shape, {{&seqs[0], 3, 7}}, cache);
  const int64_t kv = shape.kv_width();
  for (int32_t pos = 0; pos < 7; ++pos) {
    const int64_t slot = int64_t{seqs[0].blocks[pos / kBlockSize]} * kBlockSize + pos % kBlockSize;
    const float* row = &seqs[0].rows[pos * shape.row_width() + shape.q_width()];
    for (int64_t i = 0; i < kv; ++i) {
      EXPECT_EQ(cache.k[slot * kv + i], row[i]) << pos;
      EXPECT_EQ(cache.v[slot * kv + i], row[kv + i]) << pos;
    }
  }
}

// The op checks the layout's contents, not just its shapes: a block id past the cache or a
// sequence longer than its row of blocks would make the kernel write outside the cache.
TEST(PagedAttentionTest, LayoutsReachingOutsideTheCacheAreRefused) {
  std::vector<float> rows(2 * 32), cache(2 * 4 * 16), out(2 * 16);
  const int64_t shape[2] = {2, 16}, strides[2] = {32, 1};
  const Tensor q(rows.data(), DType::kFloat32, 2, shape, strides);
  const Tensor kv(rows.data() + 16, DType::kFloat32, 2, shape, strides);
  const Tensor k_cache(cache.data(), DType::kFloat32, {1, 4, 1, 16});
  const Tensor v_cache(cache.data() + 64, DType::kFloat32, {1, 4, 1, 16});
  std::vector<int32_t> starts = {0, 2}, ctx = {0}, table = {1};
  const ops::AttentionBatch batch{Tensor(starts.data(), DType::kInt32, {2}),
                                  Tensor(ctx.data(), DType::kInt32, {1}),
                                  Tensor(table.data(), DType::kInt32, {1, 1})};
  const ops::AttentionShape attn{1, 1, 16, 0, 0.25f};
  const Tensor out_t(out.data(), DType::kFloat32, {2, 16});
  auto run = [&] {
    ops::paged_attention(ExecContext::cpu(), q, kv, kv, k_cache, v_cache, batch, attn, out_t);
  };
  testing_util::expect_error<InvalidArgument>(
      run, "paged_attention: block_tables[0, 0] = 1 is out of range [0, 1)");
  table[0] = 0;
  ctx[0] = 3;  // positions 3..4 need a second block
  testing_util::expect_error<InvalidArgument>(
      run, "paged_attention: sequence 0 reaches position 5 beyond its 1 block(s) of 4");
  ctx[0] = 0;
  EXPECT_NO_THROW(run());
}

}  // namespace
}  // namespace lorart

// Paged causal attention (GQA/MQA) and the KV-cache write that precedes it.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "kernels/cpu/cpu_kernels.h"
#include "kernels/cpu/fixed_order_gemm.h"
#include "kernels/cpu/float_mode.h"

namespace lorart::cpu {

namespace {

// Row (pos, kv_head) of a cache in p.cache_dtype.
inline const void* cache_row(const void* cache, const PagedAttentionParams& p, const int32_t* table,
                             int32_t pos, int32_t kv_head) {
  const int64_t block = table[pos / p.block_size];
  const int64_t slot = block * p.block_size + pos % p.block_size;
  return static_cast<const char*>(cache) +
         (slot * p.num_kv_heads + kv_head) * p.head_dim * int64_t(dtype_size(p.cache_dtype));
}

// Stores `n` float32 values in the cache's dtype (16-bit: round to nearest even).
void store_row(void* dst, const float* src, int64_t n, DType dtype) {
  if (dtype == DType::kFloat32) {
    std::memcpy(dst, src, n * sizeof(float));
    return;
  }
  auto* out = static_cast<uint16_t*>(dst);
  if (dtype == DType::kBFloat16) {
    for (int64_t i = 0; i < n; ++i) out[i] = float_to_bfloat16(src[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = float_to_half(src[i]);
  }
}

// Positions j..(the end of j's block, or pos) sit in consecutive cache rows.
inline int32_t block_run(int32_t j, int32_t pos, int32_t block_size) {
  return std::min(pos + 1, (j / block_size + 1) * block_size) - j;
}

// Sequence index of every token, so one flat parallel loop covers the packed batch.
void token_sequences(const PagedAttentionParams& p, std::vector<int32_t>& seq_of) {
  seq_of.resize(p.seq_starts[p.num_seqs]);
  for (int32_t s = 0; s < p.num_seqs; ++s) {
    std::fill(seq_of.begin() + p.seq_starts[s], seq_of.begin() + p.seq_starts[s + 1], s);
  }
}

}  // namespace

namespace {

// Copies the chunk's K and V rows to their cache slots (layout of PagedAttentionParams::k_cache).
void paged_kv_write(const PagedAttentionParams& p) {
  const int64_t width = static_cast<int64_t>(p.num_kv_heads) * p.head_dim;
  const int64_t row_bytes = width * int64_t(dtype_size(p.cache_dtype));
  for (int32_t s = 0; s < p.num_seqs; ++s) {
    const int32_t* table = p.block_tables + static_cast<int64_t>(s) * p.max_blocks_per_seq;
    for (int32_t t = p.seq_starts[s]; t < p.seq_starts[s + 1]; ++t) {
      const int32_t pos = p.context_lens[s] + (t - p.seq_starts[s]);
      const int64_t slot =
          static_cast<int64_t>(table[pos / p.block_size]) * p.block_size + pos % p.block_size;
      store_row(static_cast<char*>(p.k_cache) + slot * row_bytes, p.k + t * p.kv_stride, width,
                p.cache_dtype);
      store_row(static_cast<char*>(p.v_cache) + slot * row_bytes, p.v + t * p.kv_stride, width,
                p.cache_dtype);
    }
  }
}

}  // namespace

void paged_attention(const PagedAttentionParams& p) {
  paged_kv_write(p);
  // Filled by the calling thread; the OpenMP workers read it through a plain pointer (a
  // thread_local would give each worker its own, empty, copy).
  thread_local std::vector<int32_t> seq_storage;
  token_sequences(p, seq_storage);
  const int32_t* seq_of = seq_storage.data();
  const int64_t num_tokens = p.seq_starts[p.num_seqs];
  const int32_t group = p.num_heads / p.num_kv_heads;
  const int64_t kv_width = static_cast<int64_t>(p.num_kv_heads) * p.head_dim;
  // One item per (token, kv head): the `group` query heads that share a KV head read each K and
  // V row once, as the rows of one small GEMM. An item reads only its token's query and the
  // cache, so a token's output is bitwise the same as a decode token or inside any prefill chunk.
  // 16-bit caches are widened exactly as gemm_nt / gemm_nn read them: the float32 math is the
  // same, on the rounded values.
  const int64_t work = num_tokens * p.num_kv_heads;
  // Multiply-adds of the whole call; below ~1M, waking the thread team costs more than it saves.
  int64_t flops = 0;
  for (int32_t s = 0; s < p.num_seqs; ++s) {
    const int64_t n = p.seq_starts[s + 1] - p.seq_starts[s];
    flops += n * (p.context_lens[s] + n) * p.num_heads * p.head_dim * 2;
  }
  const FloatMode mode;
#pragma omp parallel if (flops > (int64_t{1} << 20))
  {
    const FloatMode::Scope same(mode);
    thread_local std::vector<float> scores;  // [group, keys]
#pragma omp for schedule(dynamic, 4)
    for (int64_t item = 0; item < work; ++item) {
      const int64_t t = item / p.num_kv_heads;
      const int32_t kv_head = static_cast<int32_t>(item % p.num_kv_heads);
      const int32_t s = seq_of[t];
      const int32_t pos = p.context_lens[s] + static_cast<int32_t>(t - p.seq_starts[s]);
      const int32_t first = p.sliding_window > 0 ? std::max(0, pos - p.sliding_window + 1) : 0;
      const int64_t keys = pos - first + 1;
      const int32_t* table = p.block_tables + static_cast<int64_t>(s) * p.max_blocks_per_seq;
      const int32_t h0 = kv_head * group;
      const float* q = p.q + t * p.q_stride + static_cast<int64_t>(h0) * p.head_dim;
      float* out = p.out + (t * p.num_heads + h0) * p.head_dim;
      scores.resize(group * keys);
      // Scores, one block (a run of contiguous cache rows) at a time.
      for (int32_t j = first; j <= pos;) {
        const int32_t run = block_run(j, pos, p.block_size);
        const void* k = cache_row(p.k_cache, p, table, j, kv_head);
        gemm_nt(p.cache_dtype, group, 0, run, p.head_dim, q, p.head_dim, k, kv_width, 0.0f,
                scores.data() + (j - first), keys);
        j += run;
      }
      for (int32_t g = 0; g < group; ++g) {
        float* row = scores.data() + g * keys;
        float max_score = -INFINITY;
        for (int64_t j = 0; j < keys; ++j) {
          row[j] *= p.scale;
          max_score = std::max(max_score, row[j]);
        }
        float total = 0.0f;
        for (int64_t j = 0; j < keys; ++j) {
          row[j] = std::exp(row[j] - max_score);
          total += row[j];
        }
        const float inv_total = 1.0f / total;
        for (int64_t j = 0; j < keys; ++j) row[j] *= inv_total;
      }
      std::fill(out, out + static_cast<int64_t>(group) * p.head_dim, 0.0f);
      for (int32_t j = first; j <= pos;) {
        const int32_t run = block_run(j, pos, p.block_size);
        const void* v = cache_row(p.v_cache, p, table, j, kv_head);
        gemm_nn(p.cache_dtype, group, 0, p.head_dim, run, scores.data() + (j - first), keys, v,
                kv_width, out, p.head_dim);
        j += run;
      }
    }
  }
}

}  // namespace lorart::cpu

// Paged causal attention (GQA/MQA) and the KV-cache write that precedes it.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "kernels/cpu/cpu_kernels.h"

namespace lorart::cpu {

namespace {

inline const float* cache_row(const float* cache, const PagedAttentionParams& p,
                              const int32_t* table, int32_t pos, int32_t kv_head) {
  const int64_t block = table[pos / p.block_size];
  const int64_t slot = block * p.block_size + pos % p.block_size;
  return cache + (slot * p.num_kv_heads + kv_head) * p.head_dim;
}

// Sequence index of every token, so one flat parallel loop covers the packed batch.
void token_sequences(const PagedAttentionParams& p, std::vector<int32_t>& seq_of) {
  seq_of.resize(p.seq_starts[p.num_seqs]);
  for (int32_t s = 0; s < p.num_seqs; ++s) {
    std::fill(seq_of.begin() + p.seq_starts[s], seq_of.begin() + p.seq_starts[s + 1], s);
  }
}

}  // namespace

void paged_kv_write(const float* k, const float* v, int64_t stride, const PagedAttentionParams& p,
                    float* k_cache, float* v_cache) {
  const int64_t width = static_cast<int64_t>(p.num_kv_heads) * p.head_dim;
  for (int32_t s = 0; s < p.num_seqs; ++s) {
    const int32_t* table = p.block_tables + static_cast<int64_t>(s) * p.max_blocks_per_seq;
    for (int32_t t = p.seq_starts[s]; t < p.seq_starts[s + 1]; ++t) {
      const int32_t pos = p.context_lens[s] + (t - p.seq_starts[s]);
      const int64_t slot =
          static_cast<int64_t>(table[pos / p.block_size]) * p.block_size + pos % p.block_size;
      std::memcpy(k_cache + slot * width, k + t * stride, width * sizeof(float));
      std::memcpy(v_cache + slot * width, v + t * stride, width * sizeof(float));
    }
  }
}

void paged_attention(const PagedAttentionParams& p) {
  // Filled by the calling thread; the OpenMP workers read it through a plain pointer (a
  // thread_local would give each worker its own, empty, copy).
  thread_local std::vector<int32_t> seq_storage;
  token_sequences(p, seq_storage);
  const int32_t* seq_of = seq_storage.data();
  const int64_t num_tokens = p.seq_starts[p.num_seqs];
  const int32_t group = p.num_heads / p.num_kv_heads;
  const int64_t work = num_tokens * p.num_heads;
  // Multiply-adds of the whole call; below ~1M, waking the thread team costs more than it saves.
  int64_t flops = 0;
  for (int32_t s = 0; s < p.num_seqs; ++s) {
    const int64_t n = p.seq_starts[s + 1] - p.seq_starts[s];
    flops += n * (p.context_lens[s] + n) * p.num_heads * p.head_dim * 2;
  }
#pragma omp parallel if (flops > (int64_t{1} << 20))
  {
    thread_local std::vector<float> scores;
#pragma omp for schedule(dynamic, 4)
    for (int64_t item = 0; item < work; ++item) {
      const int64_t t = item / p.num_heads;
      const int32_t h = static_cast<int32_t>(item % p.num_heads);
      const int32_t s = seq_of[t];
      const int32_t pos = p.context_lens[s] + static_cast<int32_t>(t - p.seq_starts[s]);
      const int32_t first = p.sliding_window > 0 ? std::max(0, pos - p.sliding_window + 1) : 0;
      const int32_t* table = p.block_tables + static_cast<int64_t>(s) * p.max_blocks_per_seq;
      const float* q = p.q + t * p.q_stride + static_cast<int64_t>(h) * p.head_dim;
      const int32_t kv_head = h / group;
      scores.resize(pos - first + 1);
      float max_score = -INFINITY;
      for (int32_t j = first; j <= pos; ++j) {
        const float* k = cache_row(p.k_cache, p, table, j, kv_head);
        float dot = 0.0f;
        for (int32_t d = 0; d < p.head_dim; ++d) dot += q[d] * k[d];
        scores[j - first] = dot * p.scale;
        max_score = std::max(max_score, scores[j - first]);
      }
      float total = 0.0f;
      for (float& score : scores) {
        score = std::exp(score - max_score);
        total += score;
      }
      float* out = p.out + (t * p.num_heads + h) * p.head_dim;
      std::fill(out, out + p.head_dim, 0.0f);
      for (int32_t j = first; j <= pos; ++j) {
        const float weight = scores[j - first] / total;
        const float* v = cache_row(p.v_cache, p, table, j, kv_head);
        for (int32_t d = 0; d < p.head_dim; ++d) out[d] += weight * v[d];
      }
    }
  }
}

}  // namespace lorart::cpu

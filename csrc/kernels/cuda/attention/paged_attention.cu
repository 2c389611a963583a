// CUDA paged attention: KV append, split-KV decode with its combine, tiled causal prefill. See
// attention.h for the work split; every reduction runs in a fixed order (no atomics), and a
// sequence's blocks depend only on its own lengths, so its output does not move with the batch.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <cfloat>
#include <cstdint>
#include <type_traits>

#include "core/cuda/cuda_check.h"
#include "core/errors.h"
#include "kernels/cuda/attention/attention.h"

namespace lorart::cuda {

namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
// Query heads a decode block scores at once (group > kDecodeHeads: the block loops over tiles of
// heads, re-reading its K / V rows from L1 / L2 for each tile).
constexpr int kDecodeHeads = 8;
// Prefill tile: rows (token, query head) x keys.
constexpr int kPrefillRows = 32;
constexpr int kPrefillKeys = 32;

__device__ __forceinline__ float widen(float x) { return x; }
__device__ __forceinline__ float widen(__half x) { return __half2float(x); }
__device__ __forceinline__ float widen(__nv_bfloat16 x) { return __bfloat162float(x); }

template <class T>
__device__ __forceinline__ T narrow(float x);
template <>
__device__ __forceinline__ float narrow<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half narrow<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 narrow<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// VEC consecutive elements of a cache row widened to float; VEC * sizeof(T) == 16 is one 16-byte
// load (the launcher checked alignment), otherwise element loads.
template <class T, int VEC>
__device__ __forceinline__ void load_chunk(const T* src, float (&dst)[VEC]) {
  if constexpr (VEC * sizeof(T) == 16) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(src));
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < VEC; ++i) dst[i] = widen(e[i]);
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) dst[i] = widen(src[i]);
  }
}

// The cache row of (sequence table, position, kv head), int64 offsets.
template <class T>
__device__ __forceinline__ const T* cache_row(const T* cache, const int32_t* table, int32_t pos,
                                              int32_t kv_head, int32_t block_size,
                                              int32_t num_kv_heads, int32_t head_dim) {
  const int64_t slot = int64_t{table[pos / block_size]} * block_size + pos % block_size;
  return cache + (slot * num_kv_heads + kv_head) * head_dim;
}

// ---- append --------------------------------------------------------------------------------

template <class T>
__global__ void append_kernel(PagedAttentionParams p) {
  const int64_t width = int64_t{p.num_kv_heads} * p.head_dim;
  const int64_t total = int64_t{p.num_tokens} * width;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int32_t t = static_cast<int32_t>(i / width);
    const int64_t e = i % width;
    // The token's sequence: the last s with seq_starts[s] <= t.
    int32_t lo = 0, hi = p.num_seqs - 1;
    while (lo < hi) {
      const int32_t mid = (lo + hi + 1) / 2;
      if (p.seq_starts[mid] <= t) {
        lo = mid;
      } else {
        hi = mid - 1;
      }
    }
    const int32_t pos = p.context_lens[lo] + (t - p.seq_starts[lo]);
    const int32_t* table = p.block_tables + int64_t{lo} * p.max_blocks_per_seq;
    const int64_t slot = int64_t{table[pos / p.block_size]} * p.block_size + pos % p.block_size;
    static_cast<T*>(p.k_cache)[slot * width + e] = narrow<T>(p.k[t * p.kv_stride + e]);
    static_cast<T*>(p.v_cache)[slot * width + e] = narrow<T>(p.v[t * p.kv_stride + e]);
  }
}

// ---- decode --------------------------------------------------------------------------------

struct DecodeLayout {
  int chunks;     // head_dim / VEC
  int tpk;        // threads per key in the score phase (power of two <= 32)
  int key_lanes;  // threads per chunk column in the value phase
  size_t smem;    // bytes
};

template <int VEC>
DecodeLayout decode_layout(int head_dim) {
  DecodeLayout l{};
  l.chunks = head_dim / VEC;
  l.tpk = 1;
  while (l.tpk < l.chunks && l.tpk < 32) l.tpk *= 2;
  l.key_lanes = std::max(1, kThreads / l.chunks);
  l.smem = sizeof(float) *
           (size_t{kDecodeHeads} * head_dim                               // q
            + size_t{kDecodeHeads} * kAttentionSplitKeys                  // scores
            + static_cast<size_t>(l.key_lanes) * kDecodeHeads * head_dim  // value partials
            + 2 * kDecodeHeads);                                          // max, sum
  return l;
}

// One block per (sequence, kv head, split). Sequences whose chunk is not one token return (the
// prefill kernel covers them), as do splits past the sequence's length.
template <class T, int VEC>
__global__ void __launch_bounds__(kThreads)
    decode_kernel(PagedAttentionParams p, DecodeLayout lay, float* ws_acc, float* ws_ml) {
  const int32_t s = blockIdx.x, kv_head = blockIdx.y, split = blockIdx.z;
  const int32_t t = p.seq_starts[s];
  if (p.seq_starts[s + 1] - t != 1) return;
  const int32_t pos = p.context_lens[s];
  const int32_t kv_len = pos + 1;
  const int32_t num_splits = (kv_len + kAttentionSplitKeys - 1) / kAttentionSplitKeys;
  if (split >= num_splits) return;
  const int32_t first = p.sliding_window > 0 ? max(0, pos - p.sliding_window + 1) : 0;
  const int32_t begin = max(split * kAttentionSplitKeys, first);
  const int32_t end = min((split + 1) * kAttentionSplitKeys, kv_len);
  const int32_t n = max(0, end - begin);
  const int32_t group = p.num_heads / p.num_kv_heads;
  const int32_t hd = p.head_dim;
  const int32_t* table = p.block_tables + int64_t{s} * p.max_blocks_per_seq;
  const T* k_cache = static_cast<const T*>(p.k_cache);
  const T* v_cache = static_cast<const T*>(p.v_cache);

  extern __shared__ float smem[];
  float* q_s = smem;                                          // [kDecodeHeads][hd]
  float* score = q_s + kDecodeHeads * hd;                     // [kDecodeHeads][split keys]
  float* part = score + kDecodeHeads * kAttentionSplitKeys;   // [key_lanes][kDecodeHeads][hd]
  float* row_max = part + lay.key_lanes * kDecodeHeads * hd;  // [kDecodeHeads]
  float* row_sum = row_max + kDecodeHeads;                    // [kDecodeHeads]
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;

  for (int32_t g0 = 0; g0 < group; g0 += kDecodeHeads) {
    const int gc = min(kDecodeHeads, group - g0);
    const int32_t h0 = kv_head * group + g0;
    __syncthreads();  // the previous head tile is done with the shared arrays
    for (int i = tid; i < gc * hd; i += kThreads) {
      q_s[i] = p.q[int64_t{t} * p.q_stride + int64_t{h0} * hd + i];
    }
    __syncthreads();
    // Scores: `tpk` threads per key, each summing its chunks, then a fixed shuffle tree.
    {
      const int sub = tid % lay.tpk, keys_per_pass = kThreads / lay.tpk;
      for (int32_t j0 = 0; j0 < n; j0 += keys_per_pass) {
        const int32_t j = j0 + tid / lay.tpk;
        float acc[kDecodeHeads];
#pragma unroll
        for (int g = 0; g < kDecodeHeads; ++g) acc[g] = 0.0f;
        if (j < n) {
          const T* krow =
              cache_row(k_cache, table, begin + j, kv_head, p.block_size, p.num_kv_heads, hd);
          for (int c = sub; c < lay.chunks; c += lay.tpk) {
            float kv[VEC];
            load_chunk<T, VEC>(krow + c * VEC, kv);
#pragma unroll
            for (int g = 0; g < kDecodeHeads; ++g) {
              if (g < gc) {
#pragma unroll
                for (int e = 0; e < VEC; ++e)
                  acc[g] = fmaf(q_s[g * hd + c * VEC + e], kv[e], acc[g]);
              }
            }
          }
        }
#pragma unroll
        for (int g = 0; g < kDecodeHeads; ++g) {
          for (int off = lay.tpk / 2; off > 0; off /= 2) {
            acc[g] += __shfl_xor_sync(0xffffffffu, acc[g], off);
          }
        }
        if (j < n && sub == 0) {
#pragma unroll
          for (int g = 0; g < kDecodeHeads; ++g) {
            if (g < gc) score[g * kAttentionSplitKeys + j] = acc[g] * p.scale;
          }
        }
      }
    }
    __syncthreads();
    // Softmax pieces of the split: a warp per head, lane-strided then a shuffle tree.
    for (int g = warp; g < gc; g += kWarps) {
      float* row = score + g * kAttentionSplitKeys;
      float m = -INFINITY;
      for (int j = lane; j < n; j += 32) m = fmaxf(m, row[j]);
      for (int off = 16; off > 0; off /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
      float sum = 0.0f;
      for (int j = lane; j < n; j += 32) {
        const float e = __expf(row[j] - m);
        row[j] = e;
        sum += e;
      }
      for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
      if (lane == 0) {
        row_max[g] = m;
        row_sum[g] = sum;
      }
    }
    __syncthreads();
    // Values: thread (kl, c) sums keys kl, kl + key_lanes, ... of chunk column c.
    const int active = lay.chunks <= kThreads ? lay.key_lanes * lay.chunks : kThreads;
    if (tid < active) {
      const int kl = lay.chunks <= kThreads ? tid / lay.chunks : 0;
      const int c0 = lay.chunks <= kThreads ? tid % lay.chunks : tid;
      const int cstep = lay.chunks <= kThreads ? lay.chunks : kThreads;
      for (int c = c0; c < lay.chunks; c += cstep) {
        float acc[kDecodeHeads][VEC];
#pragma unroll
        for (int g = 0; g < kDecodeHeads; ++g) {
#pragma unroll
          for (int e = 0; e < VEC; ++e) acc[g][e] = 0.0f;
        }
        for (int32_t j = kl; j < n; j += lay.key_lanes) {
          const T* vrow =
              cache_row(v_cache, table, begin + j, kv_head, p.block_size, p.num_kv_heads, hd);
          float vv[VEC];
          load_chunk<T, VEC>(vrow + c * VEC, vv);
#pragma unroll
          for (int g = 0; g < kDecodeHeads; ++g) {
            if (g < gc) {
              const float w = score[g * kAttentionSplitKeys + j];
#pragma unroll
              for (int e = 0; e < VEC; ++e) acc[g][e] = fmaf(w, vv[e], acc[g][e]);
            }
          }
        }
#pragma unroll
        for (int g = 0; g < kDecodeHeads; ++g) {
          if (g < gc) {
#pragma unroll
            for (int e = 0; e < VEC; ++e) {
              part[(kl * kDecodeHeads + g) * hd + c * VEC + e] = acc[g][e];
            }
          }
        }
      }
    }
    __syncthreads();
    // Fold the key lanes in order; normalise (one split) or keep the partial (several).
    for (int i = tid; i < gc * hd; i += kThreads) {
      const int g = i / hd, d = i % hd;
      float sum = 0.0f;
      for (int kl = 0; kl < lay.key_lanes; ++kl) sum += part[(kl * kDecodeHeads + g) * hd + d];
      const int32_t head = h0 + g;
      if (num_splits == 1) {
        p.out[(int64_t{t} * p.num_heads + head) * hd + d] = sum / row_sum[g];
      } else {
        const int64_t rec = (int64_t{s} * p.num_heads + head) * gridDim.z + split;
        ws_acc[rec * hd + d] = sum;
        if (d == 0) {
          ws_ml[rec * 2] = n > 0 ? row_max[g] : -INFINITY;
          ws_ml[rec * 2 + 1] = n > 0 ? row_sum[g] : 0.0f;
        }
      }
    }
  }
}

// One block per (sequence, query head): folds the splits' partials in split order.
__global__ void __launch_bounds__(kThreads)
    combine_kernel(PagedAttentionParams p, int32_t max_splits, const float* ws_acc,
                   const float* ws_ml) {
  const int32_t s = blockIdx.x, head = blockIdx.y;
  const int32_t t = p.seq_starts[s];
  if (p.seq_starts[s + 1] - t != 1) return;
  const int32_t kv_len = p.context_lens[s] + 1;
  const int32_t num_splits = (kv_len + kAttentionSplitKeys - 1) / kAttentionSplitKeys;
  if (num_splits <= 1) return;
  const int64_t rec0 = (int64_t{s} * p.num_heads + head) * max_splits;
  float m = -INFINITY;
  for (int32_t i = 0; i < num_splits; ++i) m = fmaxf(m, ws_ml[(rec0 + i) * 2]);
  float total = 0.0f;
  for (int32_t i = 0; i < num_splits; ++i) {
    const float mi = ws_ml[(rec0 + i) * 2];
    if (mi != -INFINITY) total += __expf(mi - m) * ws_ml[(rec0 + i) * 2 + 1];
  }
  const float inv = 1.0f / total;
  for (int d = threadIdx.x; d < p.head_dim; d += blockDim.x) {
    float acc = 0.0f;
    for (int32_t i = 0; i < num_splits; ++i) {
      const float mi = ws_ml[(rec0 + i) * 2];
      if (mi != -INFINITY) acc += __expf(mi - m) * ws_acc[(rec0 + i) * p.head_dim + d];
    }
    p.out[(int64_t{t} * p.num_heads + head) * p.head_dim + d] = acc * inv;
  }
}

// ---- prefill -------------------------------------------------------------------------------

size_t prefill_smem(int head_dim) {
  return sizeof(float) * (size_t{kPrefillRows} * head_dim * 2      // q, o
                          + size_t{kPrefillKeys} * (head_dim + 1)  // k, padded rows
                          + size_t{kPrefillKeys} * head_dim        // v
                          + size_t{kPrefillRows} * kPrefillKeys    // scores / probabilities
                          + 3 * kPrefillRows);                     // max, sum, rescale
}

// One block per (sequence, row tile, kv head); row r of the sequence is (token r / group, query
// head kv_head * group + r % group). Keys in tiles of kPrefillKeys, increasing; online softmax.
template <class T, int VEC>
__global__ void __launch_bounds__(kThreads)
    prefill_kernel(PagedAttentionParams p, int32_t tiles_per_seq) {
  const int32_t s = blockIdx.x / tiles_per_seq, tile = blockIdx.x % tiles_per_seq;
  const int32_t kv_head = blockIdx.y;
  const int32_t t0 = p.seq_starts[s];
  const int32_t qlen = p.seq_starts[s + 1] - t0;
  if (qlen <= 1) return;  // decode covers single-token chunks
  const int32_t group = p.num_heads / p.num_kv_heads;
  const int32_t rows = qlen * group;
  const int32_t row0 = tile * kPrefillRows;
  if (row0 >= rows) return;
  const int32_t nrows = min(kPrefillRows, rows - row0);
  const int32_t hd = p.head_dim;
  const int32_t ctx = p.context_lens[s];
  const int32_t* table = p.block_tables + int64_t{s} * p.max_blocks_per_seq;
  const T* k_cache = static_cast<const T*>(p.k_cache);
  const T* v_cache = static_cast<const T*>(p.v_cache);
  // Keys the tile can see: from the first row's window start to the last row's position.
  const int32_t first_pos = ctx + row0 / group;
  const int32_t last_pos = ctx + (row0 + nrows - 1) / group;
  const int32_t key_begin = p.sliding_window > 0 ? max(0, first_pos - p.sliding_window + 1) : 0;

  extern __shared__ float smem[];
  float* q_s = smem;                     // [rows][hd]
  float* o_s = q_s + kPrefillRows * hd;  // [rows][hd]
  // K rows padded by one float: a warp scores one query row against 32 keys, reading k_s down a
  // column, which a stride of hd (a multiple of 32) would send to one bank.
  const int ks = hd + 1;
  float* k_s = o_s + kPrefillRows * hd;            // [keys][hd + 1]
  float* v_s = k_s + kPrefillKeys * ks;            // [keys][hd]
  float* p_s = v_s + kPrefillKeys * hd;            // [rows][keys]
  float* m_s = p_s + kPrefillRows * kPrefillKeys;  // [rows]
  float* l_s = m_s + kPrefillRows;                 // [rows]
  float* a_s = l_s + kPrefillRows;                 // [rows]
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;

  for (int i = tid; i < kPrefillRows * hd; i += kThreads) {
    const int r = i / hd, d = i % hd;
    float qv = 0.0f;
    if (r < nrows) {
      const int32_t row = row0 + r;
      const int32_t token = t0 + row / group;
      const int32_t head = kv_head * group + row % group;
      qv = p.q[int64_t{token} * p.q_stride + int64_t{head} * hd + d];
    }
    q_s[i] = qv;
    o_s[i] = 0.0f;
  }
  if (tid < kPrefillRows) {
    m_s[tid] = -INFINITY;
    l_s[tid] = 0.0f;
  }
  const int chunks = hd / VEC;
  for (int32_t kb = key_begin; kb <= last_pos; kb += kPrefillKeys) {
    const int32_t nk = min(kPrefillKeys, last_pos - kb + 1);
    __syncthreads();  // the previous tile's k / v / p are consumed
    for (int i = tid; i < kPrefillKeys * chunks; i += kThreads) {
      const int j = i / chunks, c = i % chunks;
      float kv[VEC], vv[VEC];
      if (j < nk) {
        load_chunk<T, VEC>(
            cache_row(k_cache, table, kb + j, kv_head, p.block_size, p.num_kv_heads, hd) + c * VEC,
            kv);
        load_chunk<T, VEC>(
            cache_row(v_cache, table, kb + j, kv_head, p.block_size, p.num_kv_heads, hd) + c * VEC,
            vv);
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e) kv[e] = vv[e] = 0.0f;
      }
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        k_s[j * ks + c * VEC + e] = kv[e];
        v_s[j * hd + c * VEC + e] = vv[e];
      }
    }
    __syncthreads();
    // Scores with the causal and window masks.
    for (int i = tid; i < kPrefillRows * kPrefillKeys; i += kThreads) {
      const int r = i / kPrefillKeys, j = i % kPrefillKeys;
      float sc = -INFINITY;
      if (r < nrows && j < nk) {
        const int32_t pos = ctx + (row0 + r) / group;
        const int32_t key = kb + j;
        const bool visible = key <= pos && (p.sliding_window <= 0 || key > pos - p.sliding_window);
        if (visible) {
          float acc = 0.0f;
          for (int d = 0; d < hd; ++d) acc = fmaf(q_s[r * hd + d], k_s[j * ks + d], acc);
          sc = acc * p.scale;
        }
      }
      p_s[i] = sc;
    }
    __syncthreads();
    // Online softmax: a warp per row, a lane per key (kPrefillKeys == 32).
    for (int r = warp; r < kPrefillRows; r += kWarps) {
      const float sc = p_s[r * kPrefillKeys + lane];
      float mt = sc;
      for (int off = 16; off > 0; off /= 2) mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, off));
      const float m_old = m_s[r];
      const float m_new = fmaxf(m_old, mt);
      const float e = m_new == -INFINITY ? 0.0f : __expf(sc - m_new);
      float sum = e;
      for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
      p_s[r * kPrefillKeys + lane] = e;
      if (lane == 0) {
        const float alpha = m_new == -INFINITY ? 1.0f : __expf(m_old - m_new);
        a_s[r] = alpha;
        l_s[r] = l_s[r] * alpha + sum;
        m_s[r] = m_new;
      }
    }
    __syncthreads();
    for (int i = tid; i < kPrefillRows * hd; i += kThreads) {
      const int r = i / hd, d = i % hd;
      float acc = o_s[i] * a_s[r];
      for (int j = 0; j < nk; ++j) acc = fmaf(p_s[r * kPrefillKeys + j], v_s[j * hd + d], acc);
      o_s[i] = acc;
    }
  }
  __syncthreads();
  for (int i = tid; i < nrows * hd; i += kThreads) {
    const int r = i / hd, d = i % hd;
    const int32_t row = row0 + r;
    const int32_t token = t0 + row / group;
    const int32_t head = kv_head * group + row % group;
    p.out[(int64_t{token} * p.num_heads + head) * hd + d] = o_s[i] / l_s[r];
  }
}

// ---- prefill on tensor cores (16-bit caches) -----------------------------------------------

// Shared memory of prefill_tc_kernel: q, k, v, p in T; scores and o in float; row state.
size_t prefill_tc_smem(int head_dim, size_t elt) {
  return elt * (size_t{kPrefillRows} * head_dim + 2 * size_t{kPrefillKeys} * head_dim +
                size_t{kPrefillRows} * kPrefillKeys) +
         sizeof(float) * (size_t{kPrefillRows} * kPrefillKeys + size_t{kPrefillRows} * head_dim +
                          3 * kPrefillRows);
}

// prefill_kernel's work split and masks, with S = Q K^T and O += P V on tensor cores (wmma
// 16x16x16, float32 accumulation): the query rounded to T (the cache's dtype), the
// probabilities rounded to T for the P V product, the softmax statistics in float32. head_dim is
// a multiple of 16. Each warp owns fixed output tiles, each accumulated over k in order.
template <class T>
__global__ void __launch_bounds__(kThreads)
    prefill_tc_kernel(PagedAttentionParams p, int32_t tiles_per_seq) {
  using namespace nvcuda;
  constexpr int VEC = 16 / sizeof(T);
  const int32_t s = blockIdx.x / tiles_per_seq, tile = blockIdx.x % tiles_per_seq;
  const int32_t kv_head = blockIdx.y;
  const int32_t t0 = p.seq_starts[s];
  const int32_t qlen = p.seq_starts[s + 1] - t0;
  if (qlen <= 1) return;
  const int32_t group = p.num_heads / p.num_kv_heads;
  const int32_t rows = qlen * group;
  const int32_t row0 = tile * kPrefillRows;
  if (row0 >= rows) return;
  const int32_t nrows = min(kPrefillRows, rows - row0);
  const int32_t hd = p.head_dim;
  const int32_t ctx = p.context_lens[s];
  const int32_t* table = p.block_tables + int64_t{s} * p.max_blocks_per_seq;
  const T* k_cache = static_cast<const T*>(p.k_cache);
  const T* v_cache = static_cast<const T*>(p.v_cache);
  const int32_t first_pos = ctx + row0 / group;
  const int32_t last_pos = ctx + (row0 + nrows - 1) / group;
  const int32_t key_begin = p.sliding_window > 0 ? max(0, first_pos - p.sliding_window + 1) : 0;

  // Every array starts at a multiple of 32 bytes (wmma's alignment): the sizes are multiples of
  // 16 elements.
  extern __shared__ __align__(32) unsigned char tc_smem[];
  T* q_h = reinterpret_cast<T*>(tc_smem);                                    // [rows][hd]
  T* k_h = q_h + kPrefillRows * hd;                                          // [keys][hd]
  T* v_h = k_h + kPrefillKeys * hd;                                          // [keys][hd]
  T* p_h = v_h + kPrefillKeys * hd;                                          // [rows][keys]
  float* s_f = reinterpret_cast<float*>(p_h + kPrefillRows * kPrefillKeys);  // [rows][keys]
  float* o_f = s_f + kPrefillRows * kPrefillKeys;                            // [rows][hd]
  float* m_s = o_f + kPrefillRows * hd;
  float* l_s = m_s + kPrefillRows;
  float* a_s = l_s + kPrefillRows;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;

  for (int i = tid; i < kPrefillRows * hd; i += kThreads) {
    const int r = i / hd, d = i % hd;
    float qv = 0.0f;
    if (r < nrows) {
      const int32_t row = row0 + r;
      qv = p.q[int64_t{t0 + row / group} * p.q_stride +
               int64_t{kv_head * group + row % group} * hd + d];
    }
    q_h[i] = narrow<T>(qv);
    o_f[i] = 0.0f;
  }
  if (tid < kPrefillRows) {
    m_s[tid] = -INFINITY;
    l_s[tid] = 0.0f;
  }
  const int chunks = hd / VEC;
  const int n_tiles = hd / 16;
  for (int32_t kb = key_begin; kb <= last_pos; kb += kPrefillKeys) {
    const int32_t nk = min(kPrefillKeys, last_pos - kb + 1);
    __syncthreads();
    // Raw 16-byte copies of the K / V rows (zeros past the tile's last key).
    for (int i = tid; i < kPrefillKeys * chunks; i += kThreads) {
      const int j = i / chunks, c = i % chunks;
      uint4 kraw = make_uint4(0, 0, 0, 0), vraw = kraw;
      if (j < nk) {
        kraw = __ldg(reinterpret_cast<const uint4*>(
            cache_row(k_cache, table, kb + j, kv_head, p.block_size, p.num_kv_heads, hd) +
            c * VEC));
        vraw = __ldg(reinterpret_cast<const uint4*>(
            cache_row(v_cache, table, kb + j, kv_head, p.block_size, p.num_kv_heads, hd) +
            c * VEC));
      }
      *reinterpret_cast<uint4*>(k_h + j * hd + c * VEC) = kraw;
      *reinterpret_cast<uint4*>(v_h + j * hd + c * VEC) = vraw;
    }
    __syncthreads();
    {  // S = Q K^T: warp w owns the 16x16 tile (w / 2, w % 2) of the 32x32 scores.
      const int mi = warp / 2, ni = warp % 2;
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.0f);
      for (int kk = 0; kk < n_tiles; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
        wmma::load_matrix_sync(a, q_h + mi * 16 * hd + kk * 16, hd);
        wmma::load_matrix_sync(b, k_h + ni * 16 * hd + kk * 16, hd);
        wmma::mma_sync(acc, a, b, acc);
      }
      wmma::store_matrix_sync(s_f + mi * 16 * kPrefillKeys + ni * 16, acc, kPrefillKeys,
                              wmma::mem_row_major);
    }
    __syncthreads();
    // Masks and the online softmax: a warp per row, a lane per key.
    for (int r = warp; r < kPrefillRows; r += kWarps) {
      const int32_t pos = ctx + (row0 + r) / group;
      const int32_t key = kb + lane;
      const bool visible = r < nrows && lane < nk && key <= pos &&
                           (p.sliding_window <= 0 || key > pos - p.sliding_window);
      const float sc = visible ? s_f[r * kPrefillKeys + lane] * p.scale : -INFINITY;
      float mt = sc;
      for (int off = 16; off > 0; off /= 2) mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, off));
      const float m_old = m_s[r];
      const float m_new = fmaxf(m_old, mt);
      const float e = m_new == -INFINITY ? 0.0f : __expf(sc - m_new);
      float sum = e;
      for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
      p_h[r * kPrefillKeys + lane] = narrow<T>(e);
      __syncwarp();
      if (lane == 0) {
        const float alpha = m_new == -INFINITY ? 1.0f : __expf(m_old - m_new);
        a_s[r] = alpha;
        l_s[r] = l_s[r] * alpha + sum;
        m_s[r] = m_new;
      }
    }
    __syncthreads();
    for (int i = tid; i < kPrefillRows * hd; i += kThreads) o_f[i] *= a_s[i / hd];
    __syncthreads();
    // O += P V: warp w owns output tiles (mi, nj) with (mi * n_tiles + nj) % kWarps == w.
    for (int t = warp; t < 2 * n_tiles; t += kWarps) {
      const int mi = t / n_tiles, nj = t % n_tiles;
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      float* o_tile = o_f + mi * 16 * hd + nj * 16;
      wmma::load_matrix_sync(acc, o_tile, hd, wmma::mem_row_major);
      for (int kk = 0; kk < kPrefillKeys / 16; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
        wmma::load_matrix_sync(a, p_h + mi * 16 * kPrefillKeys + kk * 16, kPrefillKeys);
        wmma::load_matrix_sync(b, v_h + kk * 16 * hd + nj * 16, hd);
        wmma::mma_sync(acc, a, b, acc);
      }
      wmma::store_matrix_sync(o_tile, acc, hd, wmma::mem_row_major);
    }
  }
  __syncthreads();
  for (int i = tid; i < nrows * hd; i += kThreads) {
    const int r = i / hd, d = i % hd;
    const int32_t row = row0 + r;
    p.out[(int64_t{t0 + row / group} * p.num_heads + kv_head * group + row % group) * hd + d] =
        o_f[i] / l_s[r];
  }
}

// ---- launch --------------------------------------------------------------------------------

void set_smem(const void* kernel, size_t bytes, const char* name) {
  int device = 0, limit = 0;
  LORART_CUDA_CHECK(cudaGetDevice(&device));
  LORART_CUDA_CHECK(
      cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  if (bytes > static_cast<size_t>(limit)) {
    raise<InvalidArgument>("paged_attention: ", name, " needs ", bytes,
                           " bytes of shared memory, more than this device's ", limit);
  }
  if (bytes > 48 * 1024) {
    LORART_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(bytes)));
  }
}

template <class T, int VEC>
void launch(const PagedAttentionParams& p, cudaStream_t stream) {
  {
    const int64_t total = int64_t{p.num_tokens} * p.num_kv_heads * p.head_dim;
    const int64_t blocks = std::min<int64_t>((total + 255) / 256, 65535);
    append_kernel<T><<<static_cast<unsigned>(std::max<int64_t>(1, blocks)), 256, 0, stream>>>(p);
    check_launch("paged_attention append_kernel");
  }
  if (p.num_kv_heads > 65535) {
    raise<InvalidArgument>("paged_attention: num_kv_heads (", p.num_kv_heads,
                           ") must be <= 65535 on CUDA");
  }
  const int32_t max_splits = (p.max_kv_len + kAttentionSplitKeys - 1) / kAttentionSplitKeys;
  if (max_splits > 65535) {
    raise<InvalidArgument>("paged_attention: max_kv_len (", p.max_kv_len,
                           ") must be <= ", int64_t{65535} * kAttentionSplitKeys, " on CUDA");
  }
  // Decode: every sequence gets its blocks; those with longer chunks return at once.
  {
    const DecodeLayout lay = decode_layout<VEC>(p.head_dim);
    set_smem(reinterpret_cast<const void*>(&decode_kernel<T, VEC>), lay.smem, "decode_kernel");
    float* ws_acc = static_cast<float*>(p.workspace);
    float* ws_ml = ws_acc == nullptr
                       ? nullptr
                       : ws_acc + int64_t{p.num_seqs} * p.num_heads * max_splits * p.head_dim;
    const dim3 grid(p.num_seqs, p.num_kv_heads, max_splits);
    decode_kernel<T, VEC><<<grid, kThreads, lay.smem, stream>>>(p, lay, ws_acc, ws_ml);
    check_launch("paged_attention decode_kernel");
    if (max_splits > 1) {
      if (p.num_heads > 65535) {
        raise<InvalidArgument>("paged_attention: num_heads (", p.num_heads,
                               ") must be <= 65535 on CUDA");
      }
      combine_kernel<<<dim3(p.num_seqs, p.num_heads), kThreads, 0, stream>>>(p, max_splits, ws_acc,
                                                                             ws_ml);
      check_launch("paged_attention combine_kernel");
    }
  }
  if (p.max_query_len > 1) {
    const int32_t group = p.num_heads / p.num_kv_heads;
    const int64_t tiles = (int64_t{p.max_query_len} * group + kPrefillRows - 1) / kPrefillRows;
    const int64_t blocks = tiles * p.num_seqs;
    if (blocks > 2147483647) {
      raise<InvalidArgument>("paged_attention: num_seqs x query tiles (", blocks,
                             ") exceeds the CUDA grid");
    }
    const dim3 grid(static_cast<unsigned>(blocks), p.num_kv_heads);
    if constexpr (!std::is_same_v<T, float> && VEC * sizeof(T) == 16) {
      if (p.head_dim % 16 == 0) {  // tensor cores: whole 16-wide k steps and output tiles
        const size_t smem = prefill_tc_smem(p.head_dim, sizeof(T));
        set_smem(reinterpret_cast<const void*>(&prefill_tc_kernel<T>), smem, "prefill_tc_kernel");
        prefill_tc_kernel<T><<<grid, kThreads, smem, stream>>>(p, static_cast<int32_t>(tiles));
        check_launch("paged_attention prefill_tc_kernel");
        return;
      }
    }
    const size_t smem = prefill_smem(p.head_dim);
    set_smem(reinterpret_cast<const void*>(&prefill_kernel<T, VEC>), smem, "prefill_kernel");
    prefill_kernel<T, VEC><<<grid, kThreads, smem, stream>>>(p, static_cast<int32_t>(tiles));
    check_launch("paged_attention prefill_kernel");
  }
}

template <class T>
void launch_dtype(const PagedAttentionParams& p, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool aligned = p.head_dim % kVec == 0 && reinterpret_cast<uintptr_t>(p.k_cache) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(p.v_cache) % 16 == 0;
  if (aligned) {
    launch<T, kVec>(p, stream);
  } else {
    launch<T, 2>(p, stream);  // head_dim is even (checked by the op)
  }
}

}  // namespace

void paged_attention(const PagedAttentionParams& p, void* stream) {
  if (p.num_seqs == 0 || p.num_tokens == 0) return;
  const auto s = static_cast<cudaStream_t>(stream);
  switch (p.cache_dtype) {
    case DType::kFloat32:
      return launch_dtype<float>(p, s);
    case DType::kFloat16:
      return launch_dtype<__half>(p, s);
    case DType::kBFloat16:
      return launch_dtype<__nv_bfloat16>(p, s);
    default:
      raise<InvalidArgument>("paged_attention: unsupported KV cache dtype ",
                             dtype_name(p.cache_dtype));
  }
}

}  // namespace lorart::cuda

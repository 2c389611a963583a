// One block per sampled row, the CPU sampler's steps in the same arithmetic (double sums in the
// same order, the same splitmix64 draw), so a row's token and RNG state match the CPU's:
//  1. one pass: NaN/+inf anywhere (token -1, RNG untouched), the row's max and its lowest argmax;
//  2. greedy (temperature 0 or top_k 1): the argmax;
//  3. otherwise every token's weight w = float(exp((logit - top) / T)) in double, as the CPU's;
//     the tokens whose w is not 0 (an underflowed weight adds exactly 0 to every sum and is never
//     drawn, so dropping it changes nothing) are sorted by (logit desc, id asc) -- a total order,
//     so the sort's result does not depend on the order they were gathered in;
//  4. one thread runs the CPU's two sequential double sums over the first min(top_k, kept)
//     sorted tokens (total, then the nucleus mass) and draws u exactly as the CPU does.
// The only place the two backends can differ is exp(): CUDA's double exp is within 1 ulp,
// glibc's within ~0.5 ulp, so a weight can differ by one float ulp when the double lands within an
// ulp of a float rounding midpoint (about 2^-29 per token); a token can then differ only if u
// falls within that ulp of a boundary. log p(token) is summed as a fixed tree (deterministic,
// independent of the batch), not in the CPU's sequential order: it can differ in the last bits.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "core/cuda/cuda_check.h"
#include "core/errors.h"
#include "kernels/cuda/sampling/sampling.h"

namespace lorart::cuda {

namespace {

constexpr int kThreads = 512;

__host__ __device__ int64_t next_pow2(int64_t n) {
  int64_t p = 1;
  while (p < n) p <<= 1;
  return p;
}

__host__ __device__ int64_t align256(int64_t n) { return (n + 255) / 256 * 256; }

// Per block: sort keys (later the prefix sums, as double), the sorted ids and their weights.
int64_t block_workspace_bytes(int64_t vocab) {
  return align256(next_pow2(vocab) * 8) + 2 * align256(vocab * 4);
}

__device__ uint64_t next_random(uint64_t* state) {
  uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// The CPU's float(exp((logit - top) * inv_t)), every operation rounded on its own (no FMA).
__device__ float token_weight(float logit, double top, double inv_t) {
  return __double2float_rn(exp(__dmul_rn(__dsub_rn(static_cast<double>(logit), top), inv_t)));
}

// Ascending order of the key = the CPU's order: higher logit first, equal logits by lower id.
// -0 and +0 compare equal on the CPU, so both map to +0's key.
__device__ uint64_t sort_key(float logit, int32_t id) {
  const uint32_t bits = __float_as_uint(logit == 0.0f ? 0.0f : logit);
  const uint32_t ascending = (bits & 0x80000000u) != 0 ? ~bits : (bits | 0x80000000u);
  return (static_cast<uint64_t>(~ascending) << 32) | static_cast<uint32_t>(id);
}

constexpr int kChunk = 32;
constexpr int64_t kSharedSortKeys = 4096;  // 32 KB

// Ascending bitonic sort of keys[0, padded) (padded a power of two) by the whole block.
__device__ void bitonic_sort(uint64_t* keys, int64_t padded) {
  for (int64_t size = 2; size <= padded; size <<= 1) {
    for (int64_t stride = size >> 1; stride > 0; stride >>= 1) {
      for (int64_t t = threadIdx.x; t < padded / 2; t += kThreads) {
        const int64_t a = 2 * stride * (t / stride) + (t % stride);
        const int64_t b = a + stride;
        const uint64_t ka = keys[a], kb = keys[b];
        if ((ka > kb) == ((a & size) == 0)) {
          keys[a] = kb;
          keys[b] = ka;
        }
      }
      __syncthreads();
    }
  }
}

struct Shared {
  double sums[kThreads];
  float best_value[kThreads];
  int32_t best_index[kThreads];
  int32_t bad[kThreads];
  unsigned int count;
  int32_t token;
};

// Whether (v, i) ranks above (best_v, best_i) for the argmax: the CPU's `>` keeps the lowest id.
__device__ bool better(float v, int32_t i, float best_v, int32_t best_i) {
  return v > best_v || (v == best_v && i < best_i);
}

// Fixed-shape tree over the block (the same additions whatever the batch).
__device__ double block_sum(Shared& sh, double v) {
  sh.sums[threadIdx.x] = v;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s)
      sh.sums[threadIdx.x] = __dadd_rn(sh.sums[threadIdx.x], sh.sums[threadIdx.x + s]);
    __syncthreads();
  }
  const double total = sh.sums[0];
  __syncthreads();
  return total;
}

__global__ void __launch_bounds__(kThreads) sample_kernel(SampleParams p, int64_t block_bytes) {
  __shared__ Shared sh;
  __shared__ uint64_t small_keys[kSharedSortKeys];
  char* base = static_cast<char*>(p.workspace) + static_cast<int64_t>(blockIdx.x) * block_bytes;
  const int64_t max_sort = next_pow2(p.vocab);
  uint64_t* keys = reinterpret_cast<uint64_t*>(base);
  double* prefix = reinterpret_cast<double*>(base);  // reuses the keys once they are read
  int32_t* ids = reinterpret_cast<int32_t*>(base + align256(max_sort * 8));
  float* weights = reinterpret_cast<float*>(base + align256(max_sort * 8) + align256(p.vocab * 4));
  const int tid = threadIdx.x;

  for (int32_t i = blockIdx.x; i < p.num_samples; i += gridDim.x) {
    const float* row = p.logits + static_cast<int64_t>(p.rows[i]) * p.vocab;
    const SamplingParams sp = p.params[i];
    const int64_t vocab = sp.vocab > 0 ? min(sp.vocab, p.vocab) : p.vocab;

    // 1. Non-finite check, max and lowest argmax.
    int32_t bad = 0;
    float best_v = -INFINITY;
    int32_t best_i = INT32_MAX;
    for (int64_t j = tid; j < vocab; j += kThreads) {
      const float v = row[j];
      if (isnan(v) || v == INFINITY) bad = 1;
      if (better(v, static_cast<int32_t>(j), best_v, best_i)) {
        best_v = v;
        best_i = static_cast<int32_t>(j);
      }
    }
    sh.bad[tid] = bad;
    sh.best_value[tid] = best_v;
    sh.best_index[tid] = best_i;
    __syncthreads();
    for (int s = kThreads / 2; s > 0; s >>= 1) {
      if (tid < s) {
        sh.bad[tid] |= sh.bad[tid + s];
        if (better(sh.best_value[tid + s], sh.best_index[tid + s], sh.best_value[tid],
                   sh.best_index[tid])) {
          sh.best_value[tid] = sh.best_value[tid + s];
          sh.best_index[tid] = sh.best_index[tid + s];
        }
      }
      __syncthreads();
    }
    const bool row_bad = sh.bad[0] != 0;
    const float max_logit = sh.best_value[0];
    const int32_t argmax = sh.best_index[0];
    __syncthreads();
    if (row_bad) {
      if (tid == 0) {
        p.tokens[i] = -1;
        if (p.log_probs != nullptr) p.log_probs[i] = 0.0f;
      }
      continue;
    }

    if (sp.temperature == 0.0f || sp.top_k == 1) {
      if (tid == 0) sh.token = argmax;
    } else {
      const int64_t k = sp.top_k > 0 ? min(static_cast<int64_t>(sp.top_k), vocab) : vocab;
      if (max_logit == -INFINITY) {
        // Every token masked: the CPU's weights are all NaN, nothing is drawn and it falls back
        // to the last of the k (ties sorted by id): token k - 1, one draw spent.
        if (tid == 0) {
          uint64_t state = p.rng_states[i];
          next_random(&state);
          p.rng_states[i] = state;
          sh.token = static_cast<int32_t>(k - 1);
        }
      } else {
        const double top = static_cast<double>(max_logit);
        const double inv_t = __ddiv_rn(1.0, static_cast<double>(sp.temperature));
        if (tid == 0) sh.count = 0;
        __syncthreads();
        for (int64_t j = tid; j < vocab; j += kThreads) {
          const float v = row[j];
          if (token_weight(v, top, inv_t) > 0.0f) {
            keys[atomicAdd(&sh.count, 1u)] = sort_key(v, static_cast<int32_t>(j));
          }
        }
        __syncthreads();
        const int64_t n = sh.count;
        const int64_t padded = next_pow2(n);
        for (int64_t j = n + tid; j < padded; j += kThreads) keys[j] = ~0ull;
        __syncthreads();
        // Keys are distinct (ids are), so the sorted order is unique. Small sets sort in shared
        // memory (rows whose weights mostly underflow: low temperature, peaked logits).
        if (padded <= kSharedSortKeys) {
          for (int64_t j = tid; j < padded; j += kThreads) small_keys[j] = keys[j];
          __syncthreads();
          bitonic_sort(small_keys, padded);
          for (int64_t j = tid; j < padded; j += kThreads) keys[j] = small_keys[j];
          __syncthreads();
        } else {
          bitonic_sort(keys, padded);
        }
        const int64_t count = min(k, n);
        for (int64_t j = tid; j < count; j += kThreads) {
          const int32_t id = static_cast<int32_t>(keys[j] & 0xffffffffull);
          ids[j] = id;
          weights[j] = token_weight(row[id], top, inv_t);
        }
        __syncthreads();
        if (tid == 0) {
          // The CPU's sums, in its order. The weights are read kChunk at a time into registers
          // so one thread's chain waits on memory once per chunk, not once per token.
          double total = 0.0;
          for (int64_t j0 = 0; j0 < count; j0 += kChunk) {
            float w[kChunk];
#pragma unroll
            for (int c = 0; c < kChunk; ++c) w[c] = j0 + c < count ? weights[j0 + c] : 0.0f;
#pragma unroll
            for (int c = 0; c < kChunk; ++c) {
              if (j0 + c < count) {
                total = __dadd_rn(total, static_cast<double>(w[c]));
                prefix[j0 + c] = total;
              }
            }
          }
          int64_t keep = count;
          if (sp.top_p < 1.0f) {
            const double top_p = static_cast<double>(sp.top_p);
            double mass = 0.0;
            for (int64_t j0 = 0; j0 < count && keep == count; j0 += kChunk) {
              float w[kChunk];
#pragma unroll
              for (int c = 0; c < kChunk; ++c) w[c] = j0 + c < count ? weights[j0 + c] : 0.0f;
#pragma unroll
              for (int c = 0; c < kChunk; ++c) {
                if (j0 + c < count && keep == count) {
                  mass = __dadd_rn(mass, __ddiv_rn(static_cast<double>(w[c]), total));
                  if (mass >= top_p) keep = j0 + c + 1;
                }
              }
            }
          }
          const double kept = prefix[keep - 1];
          uint64_t state = p.rng_states[i];
          const double u =
              __dmul_rn(__dmul_rn(static_cast<double>(next_random(&state) >> 11), 0x1.0p-53), kept);
          p.rng_states[i] = state;
          // The first j with u < prefix[j] (prefix never decreases), else the last kept.
          int64_t lo = 0, hi = keep;
          while (lo < hi) {
            const int64_t mid = lo + (hi - lo) / 2;
            if (u < prefix[mid]) {
              hi = mid;
            } else {
              lo = mid + 1;
            }
          }
          sh.token = ids[lo < keep ? lo : keep - 1];
        }
      }
    }
    __syncthreads();
    const int32_t token = sh.token;
    if (p.log_probs != nullptr) {
      double part = 0.0;
      for (int64_t j = tid; j < vocab; j += kThreads) {
        part = __dadd_rn(part, exp(static_cast<double>(row[j] - max_logit)));
      }
      const double total = block_sum(sh, part);
      if (tid == 0) {
        p.log_probs[i] =
            static_cast<float>(__dsub_rn(static_cast<double>(row[token] - max_logit), log(total)));
      }
    }
    if (tid == 0) p.tokens[i] = token;
    __syncthreads();
  }
}

}  // namespace

int64_t sample_workspace_bytes(int64_t num_samples, int64_t vocab) {
  if (num_samples <= 0 || vocab <= 0) return 0;
  return std::min(num_samples, kSampleMaxBlocks) * block_workspace_bytes(vocab);
}

void sample(const SampleParams& p, void* stream) {
  if (p.num_samples <= 0) return;
  if (p.vocab > INT32_MAX) {
    raise<InvalidArgument>("sample: a vocabulary of ", p.vocab, " exceeds int32 token ids");
  }
  if (reinterpret_cast<uintptr_t>(p.workspace) % 256 != 0) {
    raise<InvalidArgument>("sample: the device workspace must be 256-byte aligned");
  }
  const int64_t need = sample_workspace_bytes(p.num_samples, p.vocab);
  if (p.workspace == nullptr || p.workspace_bytes < need) {
    raise<InvalidArgument>("sample: the CUDA sampler needs ", need,
                           " bytes of device workspace, got ", p.workspace_bytes);
  }
  const int blocks = static_cast<int>(std::min<int64_t>(p.num_samples, kSampleMaxBlocks));
  sample_kernel<<<blocks, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      p, block_workspace_bytes(p.vocab));
  check_launch("sample_kernel");
}

}  // namespace lorart::cuda

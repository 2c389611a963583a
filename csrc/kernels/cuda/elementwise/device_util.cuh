// Device helpers of the elementwise kernels: weight elements widened to float32 (exactly, as the
// CPU's load_float), 16-byte row copies with a scalar fallback, and a block sum in a fixed order.
// Included by the .cu files of this folder only.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "core/dtype.h"

namespace lorart::cuda::detail {

__device__ __forceinline__ float widen_half(uint16_t bits) {
  return __half2float(__ushort_as_half(bits));
}
__device__ __forceinline__ float widen_bf16(uint16_t bits) {
  return __uint_as_float(static_cast<uint32_t>(bits) << 16);
}

// Element i of a floating array of `dtype`, as float32 (exact).
__device__ __forceinline__ float load_float(const void* p, DType dtype, int64_t i) {
  switch (dtype) {
    case DType::kFloat16:
      return widen_half(static_cast<const uint16_t*>(p)[i]);
    case DType::kBFloat16:
      return widen_bf16(static_cast<const uint16_t*>(p)[i]);
    default:
      return static_cast<const float*>(p)[i];
  }
}

// dst[i] = widen(src[i]) for i in [0, n), elements shared out by `index` over `step` threads.
// vec: src and dst are 16-byte aligned and n is a multiple of 16 bytes' worth of src elements
// (4 float32 or 8 16-bit values): one 16-byte load per group; else one element per load.
__device__ __forceinline__ void widen_row(const void* src, DType dtype, float* dst, int64_t n,
                                          int64_t index, int64_t step, bool vec) {
  if (vec && dtype == DType::kFloat32) {
    const float4* s = static_cast<const float4*>(src);
    float4* d = reinterpret_cast<float4*>(dst);
    for (int64_t g = index; g < n / 4; g += step) d[g] = s[g];
    return;
  }
  if (vec) {  // 8 16-bit values per 16 bytes
    const uint4* s = static_cast<const uint4*>(src);
    float4* d = reinterpret_cast<float4*>(dst);
    const bool bf16 = dtype == DType::kBFloat16;
    for (int64_t g = index; g < n / 8; g += step) {
      const uint4 w = s[g];
      const uint32_t words[4] = {w.x, w.y, w.z, w.w};
      float f[8];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const uint16_t lo = static_cast<uint16_t>(words[j] & 0xFFFFu);
        const uint16_t hi = static_cast<uint16_t>(words[j] >> 16);
        f[2 * j] = bf16 ? widen_bf16(lo) : widen_half(lo);
        f[2 * j + 1] = bf16 ? widen_bf16(hi) : widen_half(hi);
      }
      d[2 * g] = make_float4(f[0], f[1], f[2], f[3]);
      d[2 * g + 1] = make_float4(f[4], f[5], f[6], f[7]);
    }
    return;
  }
  for (int64_t i = index; i < n; i += step) dst[i] = load_float(src, dtype, i);
}

// The sum of every thread's `v` in a block of kThreads (a multiple of 32, <= 1024), returned to
// every thread. The order is fixed by kThreads alone: a shuffle tree within each warp, then the
// warps' partials by the same tree in warp 0. `shared` holds kThreads / 32 doubles.
template <int kThreads>
__device__ __forceinline__ double block_sum(double v, double* shared) {
  static_assert(kThreads % 32 == 0 && kThreads <= 1024, "whole warps, one block");
  constexpr int kWarps = kThreads / 32;
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xFFFFFFFFu, v, offset);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kWarps ? shared[lane] : 0.0;
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xFFFFFFFFu, v, offset);
    if (lane == 0) shared[0] = v;
  }
  __syncthreads();
  return shared[0];
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Blocks for a grid-stride loop over `n` work items of kThreads each: enough to fill the GPU,
// within gridDim.x's limit; the count depends on n only.
inline unsigned int grid_for(int64_t n, int threads) {
  const int64_t blocks = (n + threads - 1) / threads;
  return static_cast<unsigned int>(blocks < 1 ? 1 : (blocks > 65536 ? 65536 : blocks));
}

}  // namespace lorart::cuda::detail

// ops::linear on the GPU (gemm.h). Two kernel families:
// - mma_linear: tensor cores for 16-bit weights at Precision::kBFloat16. A block computes a
//   BM x BN tile of y; its warps each own a WM x WN sub-tile. x (float32) and w (16-bit) stream
//   through a STAGES-deep cp.async pipeline of BK-column tiles in shared memory; x stays float32
//   there and is rounded to w's type as each A fragment is built, w fragments come from ldmatrix.
//   Each accumulator is updated once per 16-column step of k, ascending, whatever the tile shape:
//   the decode (M <= 16), middle and prefill shapes below give bitwise the same rows.
// - fma_linear: float32 fused multiply-adds, k ascending, for Precision::kFloat32 or float32 w.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "core/cuda/cuda_check.h"
#include "core/errors.h"
#include "kernels/cuda/gemm/gemm.h"

namespace lorart::cuda {
namespace {

// ---- 16-bit element traits: packing two floats and the matching mma ----

template <class T>
struct Mma;

template <>
struct Mma<__nv_bfloat16> {
  static __device__ __forceinline__ uint32_t pack(float2 v) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(v.x, v.y);  // .x in the low half
    return *reinterpret_cast<const uint32_t*>(&h);
  }
  static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <>
struct Mma<__half> {
  static __device__ __forceinline__ uint32_t pack(float2 v) {
    const __half2 h = __floats2half2_rn(v.x, v.y);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
  static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, bypassing L1; src_bytes == 0 writes zeros (out-of-range tiles).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_addr(p)));
}

// y = acc + beta * y (beta == 0 never reads y), one rounding; the same in every kernel.
__device__ __forceinline__ void store_out(float* y, float acc, float beta) {
  *y = beta == 0.0f ? acc : __fmaf_rn(beta, *y, acc);
}

// ---- tensor-core kernel ----

// Row paddings (elements) keep ldmatrix and the float2 A reads free of bank conflicts: an A row
// of BK + 8 floats puts rows g = 0..3 of a half-warp's float2 reads on distinct banks when
// (BK + 8) % 32 == 8; a w row of BK + 8 16-bit values (BK % 64 == 32 or 0) puts ldmatrix's eight
// 16-byte rows on distinct bank groups.
template <int BK>
constexpr int a_pitch() {
  return BK + 8;
}
template <int BK>
constexpr int b_pitch() {
  return BK + 8;
}

template <int BM, int BN, int BK, int STAGES>
constexpr size_t mma_smem_bytes() {
  return size_t{STAGES} * (size_t{BM} * a_pitch<BK>() * 4 + size_t{BN} * b_pitch<BK>() * 2);
}

// Two 128-row blocks fit an SM (2 x 92 KB of shared memory) at <= 128 registers a thread.
// kVec: x, its row stride, w, its row stride and K allow 16-byte copies (x rows of 4-float chunks,
// w rows of 8-element chunks, K a multiple of 8). Otherwise elements are copied one at a time;
// the values staged, and so the results, are the same.
template <class T, int BM, int BN, int BK, int WM, int WN, int STAGES, bool kVec>
__global__ void __launch_bounds__((BM / WM) * (BN / WN) * 32, BM >= 128 ? 2 : 1)
    mma_linear(const float* __restrict__ x, int64_t x_stride, const T* __restrict__ w,
               int64_t w_stride, float* __restrict__ y, int64_t y_stride, int64_t m, int64_t n,
               int64_t k, float beta) {
  constexpr int kWarpsN = BN / WN;
  constexpr int kThreads = (BM / WM) * kWarpsN * 32;
  constexpr int kMt = WM / 16;  // m16 tiles per warp
  constexpr int kNt = WN / 8;   // n8 tiles per warp
  constexpr int kAp = a_pitch<BK>(), kBp = b_pitch<BK>();
  static_assert(BK % 16 == 0 && WM % 16 == 0 && (kNt == 1 || kNt % 2 == 0), "tile shape");

  extern __shared__ float4 smem_raw[];
  float* const a_smem = reinterpret_cast<float*>(smem_raw);            // [STAGES][BM][kAp]
  T* const b_smem = reinterpret_cast<T*>(a_smem + STAGES * BM * kAp);  // [STAGES][BN][kBp]

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warp_m = warp / kWarpsN, warp_n = warp % kWarpsN;
  const int64_t m0 = int64_t{blockIdx.y} * BM, n0 = int64_t{blockIdx.x} * BN;
  const int64_t k_tiles = (k + BK - 1) / BK;

  // Stages k-tile `kt` into buffer `s`; zeros outside [0, m) x [0, k) and [0, n) x [0, k).
  auto load_tile = [&](int s, int64_t kt) {
    const int64_t k0 = kt * BK;
    float* as = a_smem + s * BM * kAp;
    T* bs = b_smem + s * BN * kBp;
    if constexpr (kVec) {
      for (int c = tid; c < BM * BK / 4; c += kThreads) {
        const int row = c / (BK / 4), col = (c % (BK / 4)) * 4;
        const int64_t gm = m0 + row, gk = k0 + col;
        const bool ok = gm < m && gk < k;
        cp_async16(as + row * kAp + col, ok ? x + gm * x_stride + gk : x, ok ? 16 : 0);
      }
      for (int c = tid; c < BN * BK / 8; c += kThreads) {
        const int row = c / (BK / 8), col = (c % (BK / 8)) * 8;
        const int64_t gn = n0 + row, gk = k0 + col;
        const bool ok = gn < n && gk < k;
        cp_async16(bs + row * kBp + col, ok ? w + gn * w_stride + gk : w, ok ? 16 : 0);
      }
    } else {
      for (int e = tid; e < BM * BK; e += kThreads) {
        const int row = e / BK, col = e % BK;
        const int64_t gm = m0 + row, gk = k0 + col;
        as[row * kAp + col] = gm < m && gk < k ? x[gm * x_stride + gk] : 0.0f;
      }
      const auto* wb = reinterpret_cast<const uint16_t*>(w);
      auto* bb = reinterpret_cast<uint16_t*>(bs);
      for (int e = tid; e < BN * BK; e += kThreads) {
        const int row = e / BK, col = e % BK;
        const int64_t gn = n0 + row, gk = k0 + col;
        bb[row * kBp + col] = gn < n && gk < k ? wb[gn * w_stride + gk] : uint16_t{0};
      }
    }
  };

  float acc[kMt][kNt][4];
#pragma unroll
  for (int i = 0; i < kMt; ++i)
#pragma unroll
    for (int j = 0; j < kNt; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[i][j][r] = 0.0f;

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < k_tiles) load_tile(s, s);
    cp_async_commit();
  }

  const int g = lane >> 2, t = lane & 3;
  for (int64_t kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();  // tile kt visible to all; everyone is done with the buffer refilled next
    {
      const int64_t next = kt + STAGES - 1;
      if (next < k_tiles) load_tile(static_cast<int>(next % STAGES), next);
      cp_async_commit();
    }
    const int s = static_cast<int>(kt % STAGES);
    const float* as = a_smem + s * BM * kAp + (warp_m * WM) * kAp;
    const T* bs = b_smem + s * BN * kBp + (warp_n * WN) * kBp;
#pragma unroll
    for (int ks = 0; ks < BK / 16; ++ks) {
      // Steps wholly past k are skipped rather than run on zeros, so that every tile shape makes
      // exactly ceil(k / 16) accumulating steps (a zero step would turn -0 into +0).
      if (kt * BK + ks * 16 >= k) break;
      const int kc = ks * 16;
      uint32_t a[kMt][4];
#pragma unroll
      for (int i = 0; i < kMt; ++i) {
        const float* r0 = as + (i * 16 + g) * kAp + kc + 2 * t;
        const float* r8 = r0 + 8 * kAp;
        a[i][0] = Mma<T>::pack(*reinterpret_cast<const float2*>(r0));
        a[i][1] = Mma<T>::pack(*reinterpret_cast<const float2*>(r8));
        a[i][2] = Mma<T>::pack(*reinterpret_cast<const float2*>(r0 + 8));
        a[i][3] = Mma<T>::pack(*reinterpret_cast<const float2*>(r8 + 8));
      }
      uint32_t b[kNt][2];
      if constexpr (kNt == 1) {
        // Matrices (rows n 0..7; k kc..kc+7) and (k kc+8..kc+15); lanes 16..31 repeat 0..15.
        const int l = lane & 15;
        ldmatrix_x2(b[0], bs + (l & 7) * kBp + kc + (l >> 3) * 8);
      } else {
#pragma unroll
        for (int j = 0; j < kNt; j += 2) {
          // Matrix q = lane / 8: n tile j + q / 2, k half q % 2.
          const int q = lane >> 3, r = lane & 7;
          uint32_t v[4];
          ldmatrix_x4(v, bs + ((j + (q >> 1)) * 8 + r) * kBp + kc + (q & 1) * 8);
          b[j][0] = v[0];
          b[j][1] = v[1];
          b[j + 1][0] = v[2];
          b[j + 1][1] = v[3];
        }
      }
#pragma unroll
      for (int i = 0; i < kMt; ++i)
#pragma unroll
        for (int j = 0; j < kNt; ++j) Mma<T>::mma(acc[i][j], a[i], b[j][0], b[j][1]);
    }
  }
  cp_async_wait<0>();

#pragma unroll
  for (int i = 0; i < kMt; ++i) {
#pragma unroll
    for (int j = 0; j < kNt; ++j) {
      const int64_t col = n0 + warp_n * WN + j * 8 + 2 * t;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t row = m0 + warp_m * WM + i * 16 + g + 8 * h;
        if (row >= m) continue;
        float* out = y + row * y_stride + col;
        if (col < n) store_out(out, acc[i][j][2 * h], beta);
        if (col + 1 < n) store_out(out + 1, acc[i][j][2 * h + 1], beta);
      }
    }
  }
}

// ---- float32 FMA kernel ----

__device__ __forceinline__ float widen(float v) { return v; }
__device__ __forceinline__ float widen(__half v) { return __half2float(v); }
__device__ __forceinline__ float widen(__nv_bfloat16 v) { return __bfloat162float(v); }

// A 64 x 64 tile per 256-thread block, each thread 4 x 4 outputs (rows ty + 16 i, columns
// tx + 16 j), k ascending one fused multiply-add at a time: one order for every M.
constexpr int kFmaTile = 64, kFmaK = 16, kFmaThreads = 256;

template <class W>
__global__ void __launch_bounds__(kFmaThreads)
    fma_linear(const float* __restrict__ x, int64_t x_stride, const W* __restrict__ w,
               int64_t w_stride, float* __restrict__ y, int64_t y_stride, int64_t m, int64_t n,
               int64_t k, float beta) {
  __shared__ float as[kFmaK][kFmaTile + 1];
  __shared__ float ws[kFmaK][kFmaTile + 1];
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t m0 = int64_t{blockIdx.y} * kFmaTile, n0 = int64_t{blockIdx.x} * kFmaTile;
  float acc[4][4] = {};
  for (int64_t k0 = 0; k0 < k; k0 += kFmaK) {
#pragma unroll
    for (int r = 0; r < kFmaTile * kFmaK / kFmaThreads; ++r) {
      const int e = tid + r * kFmaThreads, row = e / kFmaK, kk = e % kFmaK;
      const int64_t gk = k0 + kk, gm = m0 + row, gn = n0 + row;
      as[kk][row] = gm < m && gk < k ? x[gm * x_stride + gk] : 0.0f;
      ws[kk][row] = gn < n && gk < k ? widen(w[gn * w_stride + gk]) : 0.0f;
    }
    __syncthreads();
    const int steps = k - k0 < kFmaK ? static_cast<int>(k - k0) : kFmaK;
    for (int kk = 0; kk < steps; ++kk) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = as[kk][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = ws[kk][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = __fmaf_rn(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t row = m0 + ty + 16 * i;
    if (row >= m) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t col = n0 + tx + 16 * j;
      if (col < n) store_out(y + row * y_stride + col, acc[i][j], beta);
    }
  }
}

// ---- launchers ----

constexpr int64_t kMaxGridY = 65535;

dim3 grid_for(const LinearParams& p, int bm, int bn) {
  const int64_t gy = (p.m + bm - 1) / bm, gx = (p.n + bn - 1) / bn;
  if (gy > kMaxGridY || gx > 0x7fffffff) {
    raise<InvalidArgument>("linear: m = ", p.m, ", n = ", p.n, " needs a grid of ", gx, " x ", gy,
                           " blocks, over CUDA's limit (", kMaxGridY, " rows of ", bm, ")");
  }
  return dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
}

template <class T, int BM, int BN, int BK, int WM, int WN, int STAGES, bool kVec>
void launch_mma(const LinearParams& p, cudaStream_t stream) {
  constexpr size_t smem = mma_smem_bytes<BM, BN, BK, STAGES>();
  auto* kernel = mma_linear<T, BM, BN, BK, WM, WN, STAGES, kVec>;
  // Above 48 KB a kernel must opt in; the attribute is per device, so it is set on each launch.
  LORART_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem)));
  constexpr int threads = (BM / WM) * (BN / WN) * 32;
  kernel<<<grid_for(p, BM, BN), threads, smem, stream>>>(
      p.x, p.x_stride, static_cast<const T*>(p.w.data), p.w.stride, p.y, p.y_stride, p.m, p.n, p.k,
      p.beta);
  check_launch("mma_linear");
}

// Tile shape by M only; all shapes accumulate in the same k order (batch invariant).
// - decode (M <= 16): 16 x 32 tiles of 4 warps (one n8 tile each) and an 8-deep pipeline of
//   64-column tiles, so that about 7 * 64 * 2 bytes of every weight row are in flight.
// - middle (M <= 64): 64 x 128 tiles, 8 warps of 32 x 32.
// - prefill: 128 x 128 tiles, 8 warps of 64 x 32, 3 stages (92 KB of shared memory).
template <class T, bool kVec>
void dispatch_mma(const LinearParams& p, cudaStream_t stream) {
  if (p.m <= 16) {
    launch_mma<T, 16, 32, 64, 16, 8, 8, kVec>(p, stream);
  } else if (p.m <= 64) {
    launch_mma<T, 64, 128, 32, 32, 32, 4, kVec>(p, stream);
  } else {
    launch_mma<T, 128, 128, 32, 64, 32, 3, kVec>(p, stream);
  }
}

template <class T>
void run_mma(const LinearParams& p, cudaStream_t stream) {
  const bool vec = reinterpret_cast<uintptr_t>(p.x) % 16 == 0 && p.x_stride % 4 == 0 &&
                   reinterpret_cast<uintptr_t>(p.w.data) % 16 == 0 && p.w.stride % 8 == 0 &&
                   p.k % 8 == 0;
  if (vec) {
    dispatch_mma<T, true>(p, stream);
  } else {
    dispatch_mma<T, false>(p, stream);
  }
}

template <class W>
void run_fma(const LinearParams& p, cudaStream_t stream) {
  fma_linear<W><<<grid_for(p, kFmaTile, kFmaTile), kFmaThreads, 0, stream>>>(
      p.x, p.x_stride, static_cast<const W*>(p.w.data), p.w.stride, p.y, p.y_stride, p.m, p.n, p.k,
      p.beta);
  check_launch("fma_linear");
}

}  // namespace

void linear(const LinearParams& p, void* stream) {
  if (p.w.layout != WeightLayout::kRowMajor) {
    raise<InvalidArgument>("linear: the CUDA kernels read row-major weights only (the ",
                           "k32-interleaved layout is the CPU's; ops::preferred_layout gives ",
                           "kRowMajor on CUDA)");
  }
  if (p.w.scales != nullptr) {
    raise<InvalidArgument>("linear: w.scales are for quantized weights; float weights take none");
  }
  if (p.m < 0 || p.n < 0 || p.k < 0) {
    raise<InvalidArgument>("linear: negative extent m = ", p.m, ", n = ", p.n, ", k = ", p.k);
  }
  if (p.m == 0 || p.n == 0) return;
  const auto s = static_cast<cudaStream_t>(stream);
  const bool tensor_cores = p.precision == Precision::kBFloat16 && p.w.dtype != DType::kFloat32;
  switch (p.w.dtype) {
    case DType::kBFloat16:
      return tensor_cores ? run_mma<__nv_bfloat16>(p, s) : run_fma<__nv_bfloat16>(p, s);
    case DType::kFloat16:
      return tensor_cores ? run_mma<__half>(p, s) : run_fma<__half>(p, s);
    case DType::kFloat32:
      return run_fma<float>(p, s);
    default:
      raise<InvalidArgument>("linear: w must be float32, float16 or bfloat16, got ",
                             dtype_name(p.w.dtype));
  }
}

}  // namespace lorart::cuda

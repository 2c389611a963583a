#include "kernels/cpu/fixed_order_gemm.h"

#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "core/errors.h"

// GCC/Clang vector extensions: one portable kernel source (fixed_order_gemm_kernels.h),
// compiled once per instruction set with the register width of that set (L float lanes: 16 for
// AVX-512, 8 for AVX2 + FMA, 4 for the baseline) and the tile shapes its register file holds.
// One set is picked per process (gemm_isa()). The multiply-adds are explicit (FMA intrinsics
// where the set has them) and CMake builds this file with -ffp-contract=off, so the arithmetic
// is the source's at every optimisation level, not the compiler's choice of where to fuse.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LORART_X86_ISAS 1
#include <immintrin.h>
#else
#define LORART_X86_ISAS 0
#endif
#define LORART_INLINE __attribute__((always_inline)) inline
// The vectors never cross a call boundary (every helper is always_inline), so GCC's note that
// passing them by value would change the ABI under other flags does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace lorart::cpu {

namespace {

// Storage tags for the 16-bit weight types (both are raw uint16_t words in memory).
struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};
// bfloat16 in WeightLayout::kK32Interleaved.
struct BFloat16Pairs {
  uint16_t bits;
};

// The entry points of one instruction set: nt for each weight dtype (and bfloat16 interleaved,
// index 3), nn for each weight dtype.
struct Kernels {
  void (*nt[4])(int64_t, int64_t, int64_t, int64_t, const float*, int64_t, const void*, int64_t,
                float, float*, int64_t);
  void (*nn[3])(int64_t, int64_t, int64_t, int64_t, const float*, int64_t, const void*, int64_t,
                float*, int64_t);
};

// Weight rows per column block: the block stays in cache while every group of activation rows
// passes over it, so each weight row comes from memory once per call. Up to kFewRows rows (decode:
// a pass or two) 16 rows, which stay in L1; more rows (prefill) take blocks of half the L2 (at
// most 768 KB, the best measured on a 2 MB L2), which amortise each block's start over many
// passes.
constexpr int64_t kFewRows = 16;

int64_t column_block_bytes() {
  static const int64_t bytes = [] {
#if defined(_SC_LEVEL2_CACHE_SIZE)
    const long l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);  // 0 or -1 where unknown
#else
    const long l2 = 0;
#endif
    return l2 > 0 ? std::clamp<int64_t>(l2 / 2, 128 << 10, 768 << 10) : int64_t{768 << 10};
  }();
  return bytes;
}

// The vector types of one instruction set, L float lanes per register.
#define LORART_VECTOR_TYPES(BYTES)                              \
  constexpr int L = BYTES / 4;                                  \
  typedef float F __attribute__((vector_size(BYTES)));          \
  typedef uint16_t U16 __attribute__((vector_size(BYTES / 2))); \
  typedef uint32_t U32 __attribute__((vector_size(BYTES)));     \
  typedef int32_t I32 __attribute__((vector_size(BYTES)));      \
  LORART_INLINE F splat(float x) {                              \
    F v;                                                        \
    for (int i = 0; i < L; ++i) v[i] = x;                       \
    return v;                                                   \
  }

#if LORART_X86_ISAS
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,fma")
namespace avx512 {
LORART_VECTOR_TYPES(64)
LORART_INLINE F madd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
#include "kernels/cpu/fixed_order_gemm_kernels.h"
}  // namespace avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
LORART_VECTOR_TYPES(32)
LORART_INLINE F madd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
#include "kernels/cpu/fixed_order_gemm_kernels.h"
}  // namespace avx2
#pragma GCC pop_options
#endif

namespace baseline {
LORART_VECTOR_TYPES(16)
// Rounded product, then the add: the baseline has no fused multiply-add.
LORART_INLINE F madd(F a, F b, F c) { return a * b + c; }
#include "kernels/cpu/fixed_order_gemm_kernels.h"
}  // namespace baseline

GemmIsa best_isa() {
#if LORART_X86_ISAS
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("fma")) {
    return GemmIsa::kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return GemmIsa::kAvx2;
#endif
  return GemmIsa::kBaseline;
}

GemmIsa& current_isa() {
  static GemmIsa isa = best_isa();
  return isa;
}

const Kernels& kernels() {
  switch (current_isa()) {
#if LORART_X86_ISAS
    case GemmIsa::kAvx512:
      return avx512::kKernels;
    case GemmIsa::kAvx2:
      return avx2::kKernels;
#endif
    default:
      return baseline::kKernels;
  }
}

int dtype_index(DType dtype, const char* op) {
  switch (dtype) {
    case DType::kFloat32:
      return 0;
    case DType::kFloat16:
      return 1;
    case DType::kBFloat16:
      return 2;
    default:
      raise<InvalidArgument>(op, ": weights must be float32, float16 or bfloat16, got ",
                             dtype_name(dtype));
  }
}

}  // namespace

const char* gemm_isa_name(GemmIsa isa) {
  switch (isa) {
    case GemmIsa::kAvx512:
      return "avx512";
    case GemmIsa::kAvx2:
      return "avx2";
    default:
      return "baseline";
  }
}

GemmIsa gemm_isa() { return current_isa(); }

void set_gemm_isa(GemmIsa isa) {
  if (static_cast<int>(isa) > static_cast<int>(best_isa())) {
    raise<InvalidArgument>("set_gemm_isa: this CPU has no ", gemm_isa_name(isa), " (best is ",
                           gemm_isa_name(best_isa()), ")");
  }
  current_isa() = isa;
}

void gemm_nt(DType w_dtype, int64_t m, int64_t n_begin, int64_t n_end, int64_t k, const float* x,
             int64_t ldx, const void* w, int64_t ldw, float beta, float* y, int64_t ldy,
             WeightLayout w_layout) {
  int index = dtype_index(w_dtype, "gemm_nt");
  if (w_layout == WeightLayout::kK32Interleaved) {
    if (w_dtype != DType::kBFloat16) {
      raise<InvalidArgument>("gemm_nt: the k32-interleaved layout is for bfloat16 weights, got ",
                             dtype_name(w_dtype));
    }
    index = 3;
  }
  if (m <= 0 || n_begin >= n_end) return;
  kernels().nt[index](m, n_begin, n_end, k, x, ldx, w, ldw, beta, y, ldy);
}

void gemm_nn(DType w_dtype, int64_t m, int64_t n_begin, int64_t n_end, int64_t k, const float* x,
             int64_t ldx, const void* w, int64_t ldw, float* y, int64_t ldy) {
  const int index = dtype_index(w_dtype, "gemm_nn");
  if (m <= 0 || n_begin >= n_end) return;
  kernels().nn[index](m, n_begin, n_end, k, x, ldx, w, ldw, y, ldy);
}

}  // namespace lorart::cpu

#include "kernels/cpu/fixed_order_gemm.h"

#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <utility>

#include "core/errors.h"

// GCC/Clang vector extensions: one portable source, compiled once per instruction set with the
// register width of that set (L float lanes: 16 for AVX-512, 8 for AVX2 + FMA, 4 for the baseline)
// and the tile shapes its register file holds. One set is picked per process (gemm_isa()).
#define LORART_INLINE __attribute__((always_inline)) inline
// The vectors never cross a call boundary (every helper is always_inline), so GCC's note that
// passing them by value would change the ABI under other flags does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LORART_X86_ISAS 1
#define LORART_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,fma")))
#define LORART_TARGET_AVX2 __attribute__((target("avx2,fma")))
#else
#define LORART_X86_ISAS 0
#endif

namespace lorart::cpu {

namespace {

// The vector types of an L-lane instruction set.
template <int L>
struct Simd;
template <>
struct Simd<16> {
  typedef float F __attribute__((vector_size(64)));
  typedef uint16_t U16 __attribute__((vector_size(32)));
  typedef uint32_t U32 __attribute__((vector_size(64)));
  typedef int32_t I32 __attribute__((vector_size(64)));
};
template <>
struct Simd<8> {
  typedef float F __attribute__((vector_size(32)));
  typedef uint16_t U16 __attribute__((vector_size(16)));
  typedef uint32_t U32 __attribute__((vector_size(32)));
  typedef int32_t I32 __attribute__((vector_size(32)));
};
template <>
struct Simd<4> {
  typedef float F __attribute__((vector_size(16)));
  typedef uint16_t U16 __attribute__((vector_size(8)));
  typedef uint32_t U32 __attribute__((vector_size(16)));
  typedef int32_t I32 __attribute__((vector_size(16)));
};

// Storage tags for the 16-bit weight types (both are raw uint16_t words in memory).
struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

template <int L>
LORART_INLINE typename Simd<L>::F load(const float* p) {
  typename Simd<L>::F v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <int L>
LORART_INLINE typename Simd<L>::F load(const BFloat16* p) {
  // bfloat16 is the top half of a float32: widening is a 16-bit shift, exact.
  using S = Simd<L>;
  typename S::U16 h;
  std::memcpy(&h, p, sizeof(h));
  const typename S::U32 u = __builtin_convertvector(h, typename S::U32) << 16;
  typename S::F v;
  std::memcpy(&v, &u, sizeof(v));
  return v;
}

template <int L>
LORART_INLINE typename Simd<L>::F load(const Half* p) {
  // Exact widening that every instruction set vectorises (GCC turns a _Float16 vector conversion
  // into per-element library calls without AVX512-FP16), with no float32 subnormal anywhere, so a
  // DAZ mode set by another library cannot flush half subnormals to zero: normals move their 15
  // magnitude bits up by 13 and rebias the exponent (+112); inf / nan get the float32 all-ones
  // exponent. (About 2x slower per element than float32 loads; bfloat16 is the fast 16-bit type.)
  using U32 = typename Simd<L>::U32;
  using F = typename Simd<L>::F;
  typename Simd<L>::U16 h;
  std::memcpy(&h, p, sizeof(h));
  const U32 u = __builtin_convertvector(h, U32);
  const U32 exponent = u & 0x7c00u;
  const U32 shifted = (u & 0x7fffu) << 13;
  // Subnormal m * 2^-24 as (2^-14 * (1 + m / 1024)) - 2^-14: both operands normal, result exact.
  const U32 sub_biased = shifted + (113u << 23);
  F sub;
  std::memcpy(&sub, &sub_biased, sizeof(sub));
  sub -= 0x1p-14f;
  U32 sub_bits;
  std::memcpy(&sub_bits, &sub, sizeof(sub_bits));
  // Comparisons give all-ones / all-zeros lanes: blend with bit masks.
  const U32 is_sub = U32(exponent == 0u), is_special = U32(exponent == 0x7c00u);
  const U32 normal = shifted + (112u << 23);
  U32 bits = (sub_bits & is_sub) | (normal & ~is_sub);
  bits = ((shifted | 0x7f800000u) & is_special) | (bits & ~is_special);
  bits |= (u & 0x8000u) << 16;
  F v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}

// `count` < L elements of p, widened, zero-padded to a full vector.
template <int L, typename T>
LORART_INLINE typename Simd<L>::F load_partial(const T* p, int64_t count) {
  T padded[L];
  std::memset(padded, 0, sizeof(padded));
  std::memcpy(padded, p, count * sizeof(T));
  return load<L>(padded);
}

template <int L>
LORART_INLINE void store_partial(float* p, typename Simd<L>::F v, int64_t count) {
  std::memcpy(p, &v, count * sizeof(float));
}

// One level of the lane fold: (a, b) -> one vector whose first half holds a's and second half
// b's lanes folded pairwise, lane i with lane i + H in every group of 2H lanes. log2(L) levels
// (H = L/2, ..., 1) leave the full sum of accumulator i in lane i, added by the same tree for
// every accumulator.
template <int L, int H>
constexpr int fold_source(int lane) {
  const int half = L / 2, in = lane < half ? lane : lane - half;
  const int from = 2 * H * (in / H) + in % H;
  return lane < half ? from : L + from;
}

template <int L, int H, int... I>
LORART_INLINE typename Simd<L>::F fold(typename Simd<L>::F a, typename Simd<L>::F b,
                                       std::integer_sequence<int, I...>) {
#if defined(__clang__)
  return __builtin_shufflevector(a, b, fold_source<L, H>(I)...) +
         __builtin_shufflevector(a, b, (fold_source<L, H>(I) + H)...);
#else  // __builtin_shufflevector needs GCC 12; __builtin_shuffle is older GCC's spelling
  using I32 = typename Simd<L>::I32;
  return __builtin_shuffle(a, b, I32{fold_source<L, H>(I)...}) +
         __builtin_shuffle(a, b, I32{(fold_source<L, H>(I) + H)...});
#endif
}

// N accumulators in v (N <= L) folded in place; afterwards lane i < N of v[0] is the sum of the
// lanes of accumulator i.
template <int L, int H, int N>
LORART_INLINE void fold_levels(typename Simd<L>::F* v) {
  constexpr int kNext = N / 2 > 0 ? N / 2 : 1;
  for (int i = 0; i < kNext; ++i) {
    v[i] =
        fold<L, H>(v[2 * i], v[std::min(2 * i + 1, N - 1)], std::make_integer_sequence<int, L>());
  }
  if constexpr (H > 1) fold_levels<L, H / 2, kNext>(v);
}

// sums[i] = the lane sum of acc[i] for i < N, by batches of L accumulators (the last batch
// may be a smaller power of two).
template <int L, int N>
LORART_INLINE void reduce(const typename Simd<L>::F* acc, float* sums) {
  constexpr int kBatch = N < L ? N : L;
  static_assert((kBatch & (kBatch - 1)) == 0, "a batch of accumulators must be a power of two");
  typename Simd<L>::F v[kBatch];
  for (int i = 0; i < kBatch; ++i) v[i] = acc[i];
  fold_levels<L, L / 2, kBatch>(v);
  std::memcpy(sums, v, kBatch * sizeof(float));
  if constexpr (N > L) reduce<L, N - L>(acc + L, sums + L);
}

// One register tile: G activation rows x R weight rows (G * R accumulators of L lanes):
// y[g, c0 + r] for r < rows. Lane l of an accumulator sums the products at k = l, l + L, ... in
// order, a K tail zero-padded (the padding adds exact zeros). Tile rows past `rows` re-read the
// last valid weight row and are discarded. The tile shape only decides which outputs share the
// loop: every accumulator sees the same loads and multiply-adds in the same order.
template <int L, int G, int R, bool kTail, typename T>
LORART_INLINE void nt_tile(int64_t k, const float* x, int64_t ldx, const T* w, int64_t ldw,
                           int64_t c0, int64_t rows, float beta, float* y, int64_t ldy) {
  using F = typename Simd<L>::F;
  constexpr int kAcc = G * R;
  const T* wr[R];
  for (int r = 0; r < R; ++r) wr[r] = w + (c0 + std::min<int64_t>(r, rows - 1)) * ldw;
  F acc[kAcc] = {};
  const int64_t k_full = k / L * L;
  for (int64_t i = 0; i < k_full; i += L) {
    F xv[G];
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g) xv[g] = load<L>(x + g * ldx + i);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const F wv = load<L>(wr[r] + i);
#pragma GCC unroll 8
      for (int g = 0; g < G; ++g) acc[g * R + r] += xv[g] * wv;
    }
  }
  if (kTail) {
    F xv[G];
    for (int g = 0; g < G; ++g) xv[g] = load_partial<L>(x + g * ldx + k_full, k - k_full);
    for (int r = 0; r < R; ++r) {
      const F wv = load_partial<L>(wr[r] + k_full, k - k_full);
      for (int g = 0; g < G; ++g) acc[g * R + r] += xv[g] * wv;
    }
  }
  // Output (g, r) is accumulator g * R + r, so each activation row's R sums are contiguous.
  float sums[kAcc + L];
  reduce<L, kAcc>(acc, sums);
  for (int g = 0; g < G; ++g) {
    float* yg = y + g * ldy + c0;
    const float* sg = sums + g * R;
    if (beta == 0.0f && rows == R) {
      std::memcpy(yg, sg, R * sizeof(float));
      continue;
    }
    for (int64_t r = 0; r < rows; ++r) yg[r] = beta == 0.0f ? sg[r] : beta * yg[r] + sg[r];
  }
}

// G activation rows against weight rows [c_begin, c_end), R at a time. (A K without a tail gets
// its own copy of the tile: the tail's code made GCC keep the accumulators on the stack.)
template <int L, int G, int R, typename T>
LORART_INLINE void nt_rows(int64_t c_begin, int64_t c_end, int64_t k, const float* x, int64_t ldx,
                           const T* w, int64_t ldw, float beta, float* y, int64_t ldy) {
  for (int64_t c = c_begin; c < c_end; c += R) {
    const int64_t rows = std::min<int64_t>(R, c_end - c);
    if (k % L == 0) {
      nt_tile<L, G, R, false>(k, x, ldx, w, ldw, c, rows, beta, y, ldy);
    } else {
      nt_tile<L, G, R, true>(k, x, ldx, w, ldw, c, rows, beta, y, ldy);
    }
  }
}

// Activation rows [j, m) in groups of G while G are left, against weight rows [c_begin, c_end);
// returns the first row left over.
template <int L, int G, int R, typename T>
LORART_INLINE int64_t nt_groups(int64_t j, int64_t m, int64_t c_begin, int64_t c_end, int64_t k,
                                const float* x, int64_t ldx, const T* w, int64_t ldw, float beta,
                                float* y, int64_t ldy) {
  for (; j + G <= m; j += G) {
    nt_rows<L, G, R>(c_begin, c_end, k, x + j * ldx, ldx, w, ldw, beta, y + j * ldy, ldy);
  }
  return j;
}

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

// Tile shapes (activation rows x weight rows) per register file, the largest whose accumulators,
// activation vectors and one weight vector fit without spilling: AVX-512 (32 registers) 6 x 4,
// AVX2 (16) 3 x 4, SSE2 (16, and a temporary per multiply-add) 2 x 4. On this model's prefill
// GEMMs (one thread, Xeon with AVX-512) they ran at 84-96% (AVX-512) and 85-94% (AVX2) of
// OpenBLAS's sgemm; at 1-16 rows as fast as the few-row kernels they replaced, or faster.
template <int L, typename T>
LORART_INLINE void nt_impl(int64_t m, int64_t n_begin, int64_t n_end, int64_t k, const float* x,
                           int64_t ldx, const T* w, int64_t ldw, float beta, float* y,
                           int64_t ldy) {
  const int64_t row_bytes = std::max<int64_t>(k, 1) * static_cast<int64_t>(sizeof(T));
  const int64_t block =
      m <= kFewRows ? 16
                    : std::clamp<int64_t>(column_block_bytes() / row_bytes / 16 * 16, 16, 1024);
  for (int64_t c = n_begin; c < n_end; c += block) {
    const int64_t c_end = std::min(n_end, c + block);
    int64_t j = 0;
    if constexpr (L == 16) {
      // 8 rows (decode at batch 8) as 4 + 4: 6 + 2 ran ~10% slower on the 32000-row lm_head.
      if (m == 8) j = nt_groups<L, 4, 4>(j, m, c, c_end, k, x, ldx, w, ldw, beta, y, ldy);
      j = nt_groups<L, 6, 4>(j, m, c, c_end, k, x, ldx, w, ldw, beta, y, ldy);
      j = nt_groups<L, 4, 4>(j, m, c, c_end, k, x, ldx, w, ldw, beta, y, ldy);
      j = nt_groups<L, 2, 8>(j, m, c, c_end, k, x, ldx, w, ldw, beta, y, ldy);
    } else if constexpr (L == 8) {
      j = nt_groups<L, 3, 4>(j, m, c, c_end, k, x, ldx, w, ldw, beta, y, ldy);
      j = nt_groups<L, 2, 4>(j, m, c, c_end, k, x, ldx, w, ldw, beta, y, ldy);
    } else {
      j = nt_groups<L, 2, 4>(j, m, c, c_end, k, x, ldx, w, ldw, beta, y, ldy);
    }
    nt_groups<L, 1, L>(j, m, c, c_end, k, x, ldx, w, ldw, beta, y, ldy);
  }
}

// Columns in chunks of 4 vectors; per group of G activation rows the chunk's partial sums stay in
// registers while the K weight rows stream past: y + x[0] w[0] + x[1] w[1] + ... in that order.
constexpr int kNnVectors = 4;

template <int L, int G, typename T>
LORART_INLINE void nn_chunk(int64_t c, int64_t k, const float* x, int64_t ldx, const T* w,
                            int64_t ldw, float* y, int64_t ldy) {
  using F = typename Simd<L>::F;
  F acc[G][kNnVectors];
  for (int g = 0; g < G; ++g) {
    for (int u = 0; u < kNnVectors; ++u) acc[g][u] = load<L>(y + g * ldy + c + u * L);
  }
  for (int64_t r = 0; r < k; ++r) {
    F wv[kNnVectors];
    for (int u = 0; u < kNnVectors; ++u) wv[u] = load<L>(w + r * ldw + c + u * L);
    for (int g = 0; g < G; ++g) {
      const float xr = x[g * ldx + r];
      for (int u = 0; u < kNnVectors; ++u) acc[g][u] += xr * wv[u];
    }
  }
  for (int g = 0; g < G; ++g) std::memcpy(y + g * ldy + c, acc[g], sizeof(acc[g]));
}

// The last columns (fewer than a chunk) one vector at a time, zero-padded: every column gets the
// same lane arithmetic as in nn_chunk, so results do not depend on where a split falls.
template <int L, typename T>
LORART_INLINE void nn_tail(int64_t m, int64_t c, int64_t cols, int64_t k, const float* x,
                           int64_t ldx, const T* w, int64_t ldw, float* y, int64_t ldy) {
  for (int64_t v = 0; v < cols; v += L) {
    const int64_t width = std::min<int64_t>(L, cols - v);
    for (int64_t j = 0; j < m; ++j) {
      float* yj = y + j * ldy + c + v;
      typename Simd<L>::F acc = load_partial<L>(yj, width);
      for (int64_t r = 0; r < k; ++r) {
        acc += x[j * ldx + r] * load_partial<L>(w + r * ldw + c + v, width);
      }
      store_partial<L>(yj, acc, width);
    }
  }
}

// Groups of 4 activation rows share each weight vector (16 accumulators with AVX-512, 8 with
// 16 registers).
template <int L, typename T>
LORART_INLINE void nn_impl(int64_t m, int64_t n_begin, int64_t n_end, int64_t k, const float* x,
                           int64_t ldx, const T* w, int64_t ldw, float* y, int64_t ldy) {
  constexpr int64_t kChunk = kNnVectors * L;
  constexpr int kGroup = L == 16 ? 4 : 2;
  int64_t c = n_begin;
  for (; c + kChunk <= n_end; c += kChunk) {
    int64_t j = 0;
    for (; j + kGroup <= m; j += kGroup) {
      nn_chunk<L, kGroup>(c, k, x + j * ldx, ldx, w, ldw, y + j * ldy, ldy);
    }
    for (; j < m; ++j) nn_chunk<L, 1>(c, k, x + j * ldx, ldx, w, ldw, y + j * ldy, ldy);
  }
  if (c < n_end) nn_tail<L>(m, c, n_end - c, k, x, ldx, w, ldw, y, ldy);
}

// The entry points of one instruction set: nt and nn for each weight dtype.
struct Kernels {
  void (*nt[3])(int64_t, int64_t, int64_t, int64_t, const float*, int64_t, const void*, int64_t,
                float, float*, int64_t);
  void (*nn[3])(int64_t, int64_t, int64_t, int64_t, const float*, int64_t, const void*, int64_t,
                float*, int64_t);
};

#define LORART_KERNELS(NAME, TARGET, L)                                                       \
  template <typename T>                                                                       \
  TARGET void NAME##_nt(int64_t m, int64_t n_begin, int64_t n_end, int64_t k, const float* x, \
                        int64_t ldx, const void* w, int64_t ldw, float beta, float* y,        \
                        int64_t ldy) {                                                        \
    nt_impl<L>(m, n_begin, n_end, k, x, ldx, static_cast<const T*>(w), ldw, beta, y, ldy);    \
  }                                                                                           \
  template <typename T>                                                                       \
  TARGET void NAME##_nn(int64_t m, int64_t n_begin, int64_t n_end, int64_t k, const float* x, \
                        int64_t ldx, const void* w, int64_t ldw, float* y, int64_t ldy) {     \
    nn_impl<L>(m, n_begin, n_end, k, x, ldx, static_cast<const T*>(w), ldw, y, ldy);          \
  }                                                                                           \
  constexpr Kernels k##NAME = {{NAME##_nt<float>, NAME##_nt<Half>, NAME##_nt<BFloat16>},      \
                               {NAME##_nn<float>, NAME##_nn<Half>, NAME##_nn<BFloat16>}};

LORART_KERNELS(Baseline, , 4)
#if LORART_X86_ISAS
LORART_KERNELS(Avx2, LORART_TARGET_AVX2, 8)
LORART_KERNELS(Avx512, LORART_TARGET_AVX512, 16)
#endif

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
      return kAvx512;
    case GemmIsa::kAvx2:
      return kAvx2;
#endif
    default:
      return kBaseline;
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
             int64_t ldx, const void* w, int64_t ldw, float beta, float* y, int64_t ldy) {
  const int index = dtype_index(w_dtype, "gemm_nt");
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

#include "kernels/cpu/skinny_gemm.h"

#include <algorithm>
#include <cstring>

#include "core/errors.h"

// GCC/Clang vector extensions: portable source that each clone below compiles to its own ISA
// (AVX-512, AVX2 + FMA + F16C, or baseline SSE2), picked at load time by the CPU it runs on.
// Clang builds (and non-x86 ones) get one baseline copy.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define LORART_CPU_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#elif defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// GCC 11 has no x86-64-vN levels in target_clones; AVX-512F brings its own FMA.
#define LORART_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define LORART_CPU_CLONES
#endif
#define LORART_INLINE __attribute__((always_inline)) inline
// The 64-byte vectors never cross a call boundary (every helper is always_inline), so GCC's note
// that passing them by value would change the ABI without AVX-512 does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace lorart::cpu {

namespace {

constexpr int kLanes = 16;
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));
typedef uint16_t Vec16 __attribute__((vector_size(kLanes * sizeof(uint16_t))));
typedef uint32_t VecU32 __attribute__((vector_size(kLanes * sizeof(uint32_t))));

// Two-vector lane shuffle: __builtin_shufflevector needs GCC 12; __builtin_shuffle is GCC's older
// spelling (GCC 11 is Ubuntu 22.04's compiler).
typedef int32_t VecI32 __attribute__((vector_size(kLanes * sizeof(int32_t))));
#if defined(__clang__)
#define LORART_SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define LORART_SHUFFLE(a, b, ...) __builtin_shuffle(a, b, VecI32{__VA_ARGS__})
#endif

// Storage tags for the 16-bit weight types (both are raw uint16_t words in memory).
struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

LORART_INLINE Vec load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

LORART_INLINE Vec load(const BFloat16* p) {
  // bfloat16 is the top half of a float32: widening is a 16-bit shift, exact.
  Vec16 h;
  std::memcpy(&h, p, sizeof(h));
  const VecU32 u = __builtin_convertvector(h, VecU32) << 16;
  Vec v;
  std::memcpy(&v, &u, sizeof(v));
  return v;
}

LORART_INLINE Vec load(const Half* p) {
  // Exact widening that every clone vectorises (GCC turns a _Float16 vector conversion into
  // per-element library calls without AVX512-FP16), with no float32 subnormal anywhere, so a DAZ
  // mode set by another library cannot flush half subnormals to zero: normals move their 15
  // magnitude bits up by 13 and rebias the exponent (+112); inf / nan get the float32 all-ones
  // exponent. (About 2x slower per element than float32 loads; bfloat16 is the fast 16-bit type.)
  Vec16 h;
  std::memcpy(&h, p, sizeof(h));
  const VecU32 u = __builtin_convertvector(h, VecU32);
  const VecU32 exponent = u & 0x7c00u;
  const VecU32 shifted = (u & 0x7fffu) << 13;
  // Subnormal m * 2^-24 as (2^-14 * (1 + m / 1024)) - 2^-14: both operands normal, result exact.
  const VecU32 sub_biased = shifted + (113u << 23);
  Vec sub;
  std::memcpy(&sub, &sub_biased, sizeof(sub));
  sub -= 0x1p-14f;
  VecU32 sub_bits;
  std::memcpy(&sub_bits, &sub, sizeof(sub_bits));
  // Comparisons give all-ones / all-zeros lanes: blend with bit masks.
  const VecU32 is_sub = VecU32(exponent == 0u), is_special = VecU32(exponent == 0x7c00u);
  const VecU32 normal = shifted + (112u << 23);
  VecU32 bits = (sub_bits & is_sub) | (normal & ~is_sub);
  bits = ((shifted | 0x7f800000u) & is_special) | (bits & ~is_special);
  bits |= (u & 0x8000u) << 16;
  Vec v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}

// `count` < kLanes elements of p, widened, zero-padded to a full vector.
template <typename T>
LORART_INLINE Vec load_partial(const T* p, int64_t count) {
  T padded[kLanes];
  std::memset(padded, 0, sizeof(padded));
  std::memcpy(padded, p, count * sizeof(T));
  return load(padded);
}

LORART_INLINE void store_partial(float* p, Vec v, int64_t count) { std::memcpy(p, &v, count * 4); }

// (a, b) -> one vector holding both halves folded: lanes 0..7 = a[i] + a[i+8] pattern per group
// of `2 * width` lanes. Each level halves every accumulator's live lanes; after four levels lane i
// of the result is the full sum of accumulator i, added in the same order for every i.
template <int W>
LORART_INLINE Vec fold(Vec a, Vec b) {
  if constexpr (W == 8) {
    return LORART_SHUFFLE(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           LORART_SHUFFLE(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  } else if constexpr (W == 4) {
    return LORART_SHUFFLE(a, b, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
           LORART_SHUFFLE(a, b, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  } else if constexpr (W == 2) {
    return LORART_SHUFFLE(a, b, 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
           LORART_SHUFFLE(a, b, 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  } else {
    return LORART_SHUFFLE(a, b, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
           LORART_SHUFFLE(a, b, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  }
}

// Lane i of the result = sum of the lanes of acc[i].
LORART_INLINE Vec reduce16(const Vec* acc) {
  Vec l1[8], l2[4], l3[2];
  for (int i = 0; i < 8; ++i) l1[i] = fold<8>(acc[2 * i], acc[2 * i + 1]);
  for (int i = 0; i < 4; ++i) l2[i] = fold<4>(l1[2 * i], l1[2 * i + 1]);
  for (int i = 0; i < 2; ++i) l3[i] = fold<2>(l2[2 * i], l2[2 * i + 1]);
  return fold<1>(l3[0], l3[1]);
}

// R weight rows x G activation rows (R * G = 16 accumulators): y[g, c0 + r] for r < rows.
// Rows past `rows` re-read the last valid weight row and are discarded.
template <int R, int G, typename T>
LORART_INLINE void nt_block(int64_t k, const float* x, int64_t ldx, const T* w, int64_t ldw,
                            int64_t c0, int64_t rows, float beta, float* y, int64_t ldy) {
  static_assert(R * G == kLanes);
  const T* wr[R];
  for (int r = 0; r < R; ++r) wr[r] = w + (c0 + std::min<int64_t>(r, rows - 1)) * ldw;
  Vec acc[kLanes] = {};
  const int64_t k_full = k / kLanes * kLanes;
  for (int64_t i = 0; i < k_full; i += kLanes) {
    Vec xv[G];
    for (int g = 0; g < G; ++g) xv[g] = load(x + g * ldx + i);
    for (int r = 0; r < R; ++r) {
      const Vec wv = load(wr[r] + i);
      for (int g = 0; g < G; ++g) acc[r * G + g] += xv[g] * wv;
    }
  }
  if (k_full < k) {  // zero-padded tail: the padding adds exact zeros
    Vec xv[G];
    for (int g = 0; g < G; ++g) xv[g] = load_partial(x + g * ldx + k_full, k - k_full);
    for (int r = 0; r < R; ++r) {
      const Vec wv = load_partial(wr[r] + k_full, k - k_full);
      for (int g = 0; g < G; ++g) acc[r * G + g] += xv[g] * wv;
    }
  }
  float sums[kLanes];
  const Vec total = reduce16(acc);
  std::memcpy(sums, &total, sizeof(sums));
  for (int g = 0; g < G; ++g) {
    float* yg = y + g * ldy + c0;
    for (int64_t r = 0; r < rows; ++r) {
      yg[r] = beta == 0.0f ? sums[r * G + g] : beta * yg[r] + sums[r * G + g];
    }
  }
}

// Activation rows in groups of 4, then 2, then 1; for each group, weight rows in blocks of R.
template <int R, int G, typename T>
LORART_INLINE void nt_group(int64_t n_begin, int64_t n_end, int64_t k, const float* x, int64_t ldx,
                            const T* w, int64_t ldw, float beta, float* y, int64_t ldy) {
  for (int64_t c = n_begin; c < n_end; c += R) {
    nt_block<R, G>(k, x, ldx, w, ldw, c, std::min<int64_t>(R, n_end - c), beta, y, ldy);
  }
}

// Column blocks of this many weight rows are finished for every activation row before the next
// block starts, so each weight row comes from memory once and from L2 for the later groups.
constexpr int64_t kNtColumnBlock = 16;

template <typename T>
LORART_INLINE void nt_impl(int64_t m, int64_t n_begin, int64_t n_end, int64_t k, const float* x,
                           int64_t ldx, const T* w, int64_t ldw, float beta, float* y,
                           int64_t ldy) {
  for (int64_t c = n_begin; c < n_end; c += kNtColumnBlock) {
    const int64_t c_end = std::min(n_end, c + kNtColumnBlock);
    int64_t j = 0;
    for (; j + 4 <= m; j += 4)
      nt_group<4, 4>(c, c_end, k, x + j * ldx, ldx, w, ldw, beta, y + j * ldy, ldy);
    for (; j + 2 <= m; j += 2)
      nt_group<8, 2>(c, c_end, k, x + j * ldx, ldx, w, ldw, beta, y + j * ldy, ldy);
    for (; j < m; ++j)
      nt_group<16, 1>(c, c_end, k, x + j * ldx, ldx, w, ldw, beta, y + j * ldy, ldy);
  }
}

// Columns in chunks of kNnChunk; per activation row the chunk's partial sums stay in registers
// while the K weight rows stream past: y + x[0] w[0] + x[1] w[1] + ... in that order.
constexpr int kNnVectors = 4;
constexpr int64_t kNnChunk = kNnVectors * kLanes;

template <typename T>
LORART_INLINE void nn_chunk(int64_t m, int64_t c, int64_t k, const float* x, int64_t ldx,
                            const T* w, int64_t ldw, float* y, int64_t ldy) {
  for (int64_t j = 0; j < m; ++j) {
    Vec acc[kNnVectors];
    for (int u = 0; u < kNnVectors; ++u) acc[u] = load(y + j * ldy + c + u * kLanes);
    for (int64_t r = 0; r < k; ++r) {
      const float xr = x[j * ldx + r];
      for (int u = 0; u < kNnVectors; ++u) acc[u] += xr * load(w + r * ldw + c + u * kLanes);
    }
    std::memcpy(y + j * ldy + c, acc, sizeof(acc));
  }
}

// The last columns (fewer than kNnChunk) one vector at a time, zero-padded: every column gets the
// same lane arithmetic as in nn_chunk, so results do not depend on where a split falls.
template <typename T>
LORART_INLINE void nn_tail(int64_t m, int64_t c, int64_t cols, int64_t k, const float* x,
                           int64_t ldx, const T* w, int64_t ldw, float* y, int64_t ldy) {
  for (int64_t v = 0; v < cols; v += kLanes) {
    const int64_t width = std::min<int64_t>(kLanes, cols - v);
    for (int64_t j = 0; j < m; ++j) {
      float* yj = y + j * ldy + c + v;
      Vec acc = load_partial(yj, width);
      for (int64_t r = 0; r < k; ++r) {
        acc += x[j * ldx + r] * load_partial(w + r * ldw + c + v, width);
      }
      store_partial(yj, acc, width);
    }
  }
}

template <typename T>
LORART_INLINE void nn_impl(int64_t m, int64_t n_begin, int64_t n_end, int64_t k, const float* x,
                           int64_t ldx, const T* w, int64_t ldw, float* y, int64_t ldy) {
  int64_t c = n_begin;
  for (; c + kNnChunk <= n_end; c += kNnChunk) nn_chunk(m, c, k, x, ldx, w, ldw, y, ldy);
  if (c < n_end) nn_tail(m, c, n_end - c, k, x, ldx, w, ldw, y, ldy);
}

LORART_CPU_CLONES void nt_f32(int64_t m, int64_t n_begin, int64_t n_end, int64_t k, const float* x,
                              int64_t ldx, const float* w, int64_t ldw, float beta, float* y,
                              int64_t ldy) {
  nt_impl(m, n_begin, n_end, k, x, ldx, w, ldw, beta, y, ldy);
}
LORART_CPU_CLONES void nt_f16(int64_t m, int64_t n_begin, int64_t n_end, int64_t k, const float* x,
                              int64_t ldx, const Half* w, int64_t ldw, float beta, float* y,
                              int64_t ldy) {
  nt_impl(m, n_begin, n_end, k, x, ldx, w, ldw, beta, y, ldy);
}
LORART_CPU_CLONES void nt_bf16(int64_t m, int64_t n_begin, int64_t n_end, int64_t k, const float* x,
                               int64_t ldx, const BFloat16* w, int64_t ldw, float beta, float* y,
                               int64_t ldy) {
  nt_impl(m, n_begin, n_end, k, x, ldx, w, ldw, beta, y, ldy);
}
LORART_CPU_CLONES void nn_f32(int64_t m, int64_t n_begin, int64_t n_end, int64_t k, const float* x,
                              int64_t ldx, const float* w, int64_t ldw, float* y, int64_t ldy) {
  nn_impl(m, n_begin, n_end, k, x, ldx, w, ldw, y, ldy);
}
LORART_CPU_CLONES void nn_f16(int64_t m, int64_t n_begin, int64_t n_end, int64_t k, const float* x,
                              int64_t ldx, const Half* w, int64_t ldw, float* y, int64_t ldy) {
  nn_impl(m, n_begin, n_end, k, x, ldx, w, ldw, y, ldy);
}
LORART_CPU_CLONES void nn_bf16(int64_t m, int64_t n_begin, int64_t n_end, int64_t k, const float* x,
                               int64_t ldx, const BFloat16* w, int64_t ldw, float* y, int64_t ldy) {
  nn_impl(m, n_begin, n_end, k, x, ldx, w, ldw, y, ldy);
}

}  // namespace

void skinny_gemm_nt(DType w_dtype, int64_t m, int64_t n_begin, int64_t n_end, int64_t k,
                    const float* x, int64_t ldx, const void* w, int64_t ldw, float beta, float* y,
                    int64_t ldy) {
  if (m <= 0 || n_begin >= n_end) return;
  switch (w_dtype) {
    case DType::kFloat32:
      return nt_f32(m, n_begin, n_end, k, x, ldx, static_cast<const float*>(w), ldw, beta, y, ldy);
    case DType::kFloat16:
      return nt_f16(m, n_begin, n_end, k, x, ldx, static_cast<const Half*>(w), ldw, beta, y, ldy);
    case DType::kBFloat16:
      return nt_bf16(m, n_begin, n_end, k, x, ldx, static_cast<const BFloat16*>(w), ldw, beta, y,
                     ldy);
    default:
      raise<InvalidArgument>("skinny_gemm_nt: weights must be float32, float16 or bfloat16, got ",
                             dtype_name(w_dtype));
  }
}

void skinny_gemm_nn(DType w_dtype, int64_t m, int64_t n_begin, int64_t n_end, int64_t k,
                    const float* x, int64_t ldx, const void* w, int64_t ldw, float* y,
                    int64_t ldy) {
  if (m <= 0 || n_begin >= n_end) return;
  switch (w_dtype) {
    case DType::kFloat32:
      return nn_f32(m, n_begin, n_end, k, x, ldx, static_cast<const float*>(w), ldw, y, ldy);
    case DType::kFloat16:
      return nn_f16(m, n_begin, n_end, k, x, ldx, static_cast<const Half*>(w), ldw, y, ldy);
    case DType::kBFloat16:
      return nn_bf16(m, n_begin, n_end, k, x, ldx, static_cast<const BFloat16*>(w), ldw, y, ldy);
    default:
      raise<InvalidArgument>("skinny_gemm_nn: weights must be float32, float16 or bfloat16, got ",
                             dtype_name(w_dtype));
  }
}

}  // namespace lorart::cpu

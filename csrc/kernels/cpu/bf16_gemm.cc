// linear_bf16 (cpu_kernels.h) on the instruction set of bf16_gemm.h: activations rounded and
// packed once per call (shared by the threads), then columns split across threads as in linear.
#include "kernels/cpu/bf16_gemm.h"

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "core/dtype.h"
#include "core/errors.h"
#include "kernels/cpu/column_share.h"
#include "kernels/cpu/cpu_kernels.h"
#include "kernels/cpu/float_mode.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LORART_BF16_X86 1
#include <cpuid.h>
#include <immintrin.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#else
#define LORART_BF16_X86 0
#endif
#define LORART_INLINE __attribute__((always_inline)) inline
#pragma GCC diagnostic ignored "-Wpsabi"
// GCC 12 flags the _mm512_undefined operand inside its own AVX-512 intrinsics (a false positive).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace lorart::cpu {

namespace {

// K is padded to whole 64-byte rows of bfloat16 (one vdpbf16ps operand, one AMX tile row).
constexpr int64_t kKBlock = 32;
int64_t padded_k(int64_t k) { return (std::max<int64_t>(k, 0) + kKBlock - 1) / kKBlock * kKBlock; }

// Round to nearest even; NaN stays NaN (quiet), as float_to_bfloat16 in core/dtype.h. Written as
// a plain loop so that the compiler vectorises it.
LORART_INLINE void round_row(const float* x, int64_t k, uint16_t* out, int64_t kp) {
  for (int64_t i = 0; i < k; ++i) {
    uint32_t u;
    std::memcpy(&u, &x[i], 4);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    out[i] = static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? (u >> 16) | 0x40u : rounded);
  }
  std::fill(out + k, out + kp, uint16_t{0});
}

// Row `row` of w (dtype, row stride ldw) as bfloat16, zero-padded to kp.
void weight_row_bf16(const void* w, DType dtype, int64_t ldw, int64_t row, int64_t k, uint16_t* out,
                     int64_t kp) {
  switch (dtype) {
    case DType::kFloat32:
      round_row(static_cast<const float*>(w) + row * ldw, k, out, kp);
      return;
    case DType::kFloat16:
      convert_floats(static_cast<const uint16_t*>(w) + row * ldw, DType::kFloat16, out,
                     DType::kBFloat16, k);
      break;
    default:
      std::memcpy(out, static_cast<const uint16_t*>(w) + row * ldw, k * sizeof(uint16_t));
  }
  std::fill(out + k, out + kp, uint16_t{0});
}

// `count` elements of `storage` (grown as needed, never shrunk) from a 64-byte boundary: AMX tile
// loads of rows that straddle cache lines ran ~6x slower (45 vs 7 cycles per 1 KB tile here).
uint16_t* aligned(std::vector<uint16_t>& storage, size_t count) {
  if (storage.size() < count + 32) storage.resize(count + 32);
  const auto address = reinterpret_cast<uintptr_t>(storage.data());
  return reinterpret_cast<uint16_t*>((address + 63) & ~uintptr_t{63});
}

// Rows [begin, end) of w as a bfloat16 panel [rows_padded, kp] (64-byte aligned), rows past `end`
// zero.
const uint16_t* weight_panel(const void* w, DType dtype, int64_t ldw, int64_t begin, int64_t end,
                             int64_t rows_padded, int64_t k, int64_t kp,
                             std::vector<uint16_t>& storage) {
  uint16_t* panel = aligned(storage, static_cast<size_t>(rows_padded * kp));
  for (int64_t r = begin; r < end; ++r) {
    weight_row_bf16(w, dtype, ldw, r, k, panel + (r - begin) * kp, kp);
  }
  std::fill(panel + (end - begin) * kp, panel + rows_padded * kp, uint16_t{0});
  return panel;
}

// The 16 lanes of an accumulator summed by one fixed tree (i + 8, + 4, + 2, + 1).
#define LORART_FOLD_LANES               \
  LORART_INLINE float fold_lanes(F v) { \
    float s[16];                        \
    std::memcpy(s, &v, sizeof(s));      \
    for (int h = 8; h >= 1; h /= 2) {   \
      for (int i = 0; i < h; ++i) {     \
        s[i] = s[i] + s[i + h];         \
      }                                 \
    }                                   \
    return s[0];                        \
  }

#define LORART_BF16_TYPES                                \
  typedef float F __attribute__((vector_size(64)));      \
  typedef uint16_t W __attribute__((vector_size(64)));   \
  typedef uint32_t U32 __attribute__((vector_size(64))); \
  LORART_FOLD_LANES

// vdpbf16ps's arithmetic in plain code: per lane, acc = ftz(fma(odd_x, odd_w, acc)), then the
// same with the even elements, inputs with subnormals as zero. (fma: the product of two bfloat16
// is exact in float32, so the fused multiply-add is "add the exact product, round once".)
#define LORART_BF16_EMULATION                                                 \
  LORART_INLINE F flush(U32 bits) {                                           \
    const U32 tiny = (U32)((bits & 0x7f800000u) == 0u);                       \
    bits = (bits & (0x80000000u | ~tiny));                                    \
    F v;                                                                      \
    std::memcpy(&v, &bits, sizeof(v));                                        \
    return v;                                                                 \
  }                                                                           \
  LORART_INLINE F flush(F v) {                                                \
    U32 bits;                                                                 \
    std::memcpy(&bits, &v, sizeof(bits));                                     \
    return flush(bits);                                                       \
  }                                                                           \
  LORART_INLINE F dp(F acc, W x, W w) {                                       \
    U32 xw, ww;                                                               \
    std::memcpy(&xw, &x, sizeof(xw));                                         \
    std::memcpy(&ww, &w, sizeof(ww));                                         \
    acc = flush(madd(flush(xw & 0xffff0000u), flush(ww & 0xffff0000u), acc)); \
    return flush(madd(flush(xw << 16), flush(ww << 16), acc));                \
  }

namespace emulated {
LORART_BF16_TYPES
LORART_INLINE F madd(F a, F b, F c) {
  F out;
  for (int i = 0; i < 16; ++i) out[i] = __builtin_fmaf(a[i], b[i], c[i]);
  return out;
}
LORART_BF16_EMULATION
#include "kernels/cpu/bf16_dot_kernels.h"
}  // namespace emulated

#if LORART_BF16_X86
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,fma")
namespace emulated512 {
LORART_BF16_TYPES
LORART_INLINE F madd(F a, F b, F c) { return (F)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c); }
LORART_BF16_EMULATION
#include "kernels/cpu/bf16_dot_kernels.h"
}  // namespace emulated512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx512bf16,fma")
namespace avx512bf16 {
LORART_BF16_TYPES
LORART_INLINE F dp(F acc, W x, W w) {
  return (F)_mm512_dpbf16_ps((__m512)acc, (__m512bh)x, (__m512bh)w);
}
#include "kernels/cpu/bf16_dot_kernels.h"
}  // namespace avx512bf16
#pragma GCC pop_options
#endif

// ---- instruction set selection ----

struct CpuFeatures {
  bool avx512 = false;       // F, VL, BW, DQ and FMA (the emulation's fast build)
  bool avx512_bf16 = false;  // + AVX512_BF16
  bool amx = false;          // AMX-TILE + AMX-BF16, tile data granted by the OS
};

#if LORART_BF16_X86 && defined(__linux__)
// Linux hands out the AMX tile state (8 KB per thread) only on request, once per process.
bool request_amx() {
  constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
}
#endif

CpuFeatures detect() {
  CpuFeatures f;
#if LORART_BF16_X86
  __builtin_cpu_init();
  f.avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
             __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("fma");
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (f.avx512 && __get_cpuid_count(7, 1, &a, &b, &c, &d)) f.avx512_bf16 = (a >> 5) & 1u;
#if defined(__linux__)
  if (f.avx512_bf16 && __get_cpuid_count(7, 0, &a, &b, &c, &d)) {
    const bool amx_bf16 = (d >> 22) & 1u, amx_tile = (d >> 24) & 1u;
    f.amx = amx_bf16 && amx_tile && request_amx();
  }
#endif
#endif
  return f;
}

const CpuFeatures& features() {
  static const CpuFeatures f = detect();
  return f;
}

bool supported(Bf16Isa isa) {
  switch (isa) {
    case Bf16Isa::kAmx:
      return features().amx;
    case Bf16Isa::kAvx512Bf16:
      return features().avx512_bf16;
    default:
      return true;
  }
}

Bf16Isa& current_isa() {
  static Bf16Isa isa = supported(Bf16Isa::kAmx)          ? Bf16Isa::kAmx
                       : supported(Bf16Isa::kAvx512Bf16) ? Bf16Isa::kAvx512Bf16
                                                         : Bf16Isa::kEmulated;
  return isa;
}

}  // namespace

const char* bf16_isa_name(Bf16Isa isa) {
  switch (isa) {
    case Bf16Isa::kAmx:
      return "amx";
    case Bf16Isa::kAvx512Bf16:
      return "avx512bf16";
    default:
      return "emulated";
  }
}

Bf16Isa bf16_isa() { return current_isa(); }

void set_bf16_isa(Bf16Isa isa) {
  if (!supported(isa)) {
    raise<InvalidArgument>("set_bf16_isa: this CPU (or OS) cannot run ", bf16_isa_name(isa));
  }
  current_isa() = isa;
}

// ---- AMX ----
namespace {

#if LORART_BF16_X86
#pragma GCC push_options
#pragma GCC target("amx-tile,amx-bf16,avx512f,avx512vl,avx512bw,avx512dq,fma")
namespace amx {

// Tiles 0-3 accumulate C (16 weight rows x 16 tokens, float32), 4-5 hold weight rows (A: 16
// rows x 32 bfloat16), 6-7 token blocks (B: 16 pairs x 16 tokens x 2, the pair-interleaved
// layout of pack_tokens). C tile 2 i + j is weight block i times token block j.
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// The tile intrinsics are asm statements without a memory clobber: fence the compiler around
// the buffers they read and write.
LORART_INLINE void compiler_fence() { __asm__ volatile("" ::: "memory"); }

// Packed tokens: 16-token blocks of kb 1 KB tiles each; tile (block, kb) row p holds pair
// kb * 16 + p of tokens 0..15 (two bfloat16 each), tokens past m zero.
size_t packed_size(int64_t m, int64_t kp) { return static_cast<size_t>((m + 15) / 16 * 16 * kp); }

// In-register transpose of 16 rows of 16 dwords: r[i][j] -> r[j][i].
LORART_INLINE void transpose16(__m512i* r) {
  __m512i a[16], b[16];
  for (int p = 0; p < 8; ++p) {
    a[2 * p] = _mm512_unpacklo_epi32(r[2 * p], r[2 * p + 1]);
    a[2 * p + 1] = _mm512_unpackhi_epi32(r[2 * p], r[2 * p + 1]);
  }
  // b[4 q + c], 128-bit lane L: column 4 L + c of rows 4 q .. 4 q + 3.
  for (int q = 0; q < 4; ++q) {
    b[4 * q + 0] = _mm512_unpacklo_epi64(a[4 * q], a[4 * q + 2]);
    b[4 * q + 1] = _mm512_unpackhi_epi64(a[4 * q], a[4 * q + 2]);
    b[4 * q + 2] = _mm512_unpacklo_epi64(a[4 * q + 1], a[4 * q + 3]);
    b[4 * q + 3] = _mm512_unpackhi_epi64(a[4 * q + 1], a[4 * q + 3]);
  }
  for (int c = 0; c < 4; ++c) {
    const __m512i s0 = _mm512_shuffle_i32x4(b[c], b[4 + c], 0x44);
    const __m512i s1 = _mm512_shuffle_i32x4(b[c], b[4 + c], 0xee);
    const __m512i s2 = _mm512_shuffle_i32x4(b[8 + c], b[12 + c], 0x44);
    const __m512i s3 = _mm512_shuffle_i32x4(b[8 + c], b[12 + c], 0xee);
    r[c] = _mm512_shuffle_i32x4(s0, s2, 0x88);
    r[4 + c] = _mm512_shuffle_i32x4(s0, s2, 0xdd);
    r[8 + c] = _mm512_shuffle_i32x4(s1, s3, 0x88);
    r[12 + c] = _mm512_shuffle_i32x4(s1, s3, 0xdd);
  }
}

// Token block `block` (16 tokens from block * 16; those past m zero) of x rounded and packed.
void pack_tokens(const float* x, int64_t ldx, int64_t m, int64_t k, int64_t kp, int64_t block,
                 bool interleave, uint16_t* packed, std::vector<uint16_t>& rows) {
  rows.resize(16 * kp);
  for (int64_t t = 0; t < 16; ++t) {
    const int64_t token = block * 16 + t;
    uint16_t* row = rows.data() + t * kp;
    if (token < m) {
      round_row(x + token * ldx, k, row, kp);
      if (interleave) interleave_k32(row, k);
    } else {
      std::fill(row, row + kp, uint16_t{0});
    }
  }
  uint16_t* out = packed + block * 16 * kp;
  for (int64_t kb = 0; kb < kp / kKBlock; ++kb) {
    __m512i r[16];
    for (int t = 0; t < 16; ++t) r[t] = _mm512_loadu_si512(rows.data() + t * kp + kb * kKBlock);
    transpose16(r);
    for (int p = 0; p < 16; ++p) _mm512_storeu_si512(out + kb * 512 + p * kKBlock, r[p]);
  }
}

template <int MB, int NB>
LORART_INLINE void tiles(const uint16_t* a, int64_t lda, const uint16_t* b, int64_t kblocks,
                         float* c) {
  _tile_zero(0);
  if constexpr (MB > 1) _tile_zero(1);
  if constexpr (NB > 1) _tile_zero(2);
  if constexpr (MB > 1 && NB > 1) _tile_zero(3);
  const int64_t stride = lda * 2;
  const uint16_t* a1 = a + 16 * lda;
  const uint16_t* b1 = b + kblocks * 512;
  for (int64_t kb = 0; kb < kblocks; ++kb) {
    _tile_loadd(4, a + kb * kKBlock, stride);
    if constexpr (NB > 1) _tile_loadd(5, a1 + kb * kKBlock, stride);
    _tile_loadd(6, b + kb * 512, 64);
    if constexpr (MB > 1) _tile_loadd(7, b1 + kb * 512, 64);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (MB > 1) _tile_dpbf16ps(1, 4, 7);
    if constexpr (NB > 1) _tile_dpbf16ps(2, 5, 6);
    if constexpr (MB > 1 && NB > 1) _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, c, 64);
  if constexpr (MB > 1) _tile_stored(1, c + 256, 64);
  if constexpr (NB > 1) _tile_stored(2, c + 512, 64);
  if constexpr (MB > 1 && NB > 1) _tile_stored(3, c + 768, 64);
  compiler_fence();
}

struct Output {
  int64_t m;
  float beta;
  float* y;
  int64_t ldy;
};

// C tiles to y[token, n0 + row] for the valid tokens (from t0) and rows: each tile transposed
// in registers, then one (masked) row of up to 16 outputs per token.
void write(const float* c, int mb, int nb, int64_t n0, int64_t rows, int64_t t0,
           const Output& out) {
  for (int j = 0; j < mb; ++j) {
    const int64_t tokens = std::min<int64_t>(16, out.m - t0 - 16 * j);
    for (int i = 0; i < nb; ++i) {
      const int64_t n = std::min<int64_t>(16, rows - 16 * i);
      const __mmask16 mask = static_cast<__mmask16>((1u << n) - 1u);
      __m512i r[16];
      const float* tile = c + (2 * i + j) * 256;
      for (int row = 0; row < 16; ++row) r[row] = _mm512_load_si512(tile + row * 16);
      transpose16(r);
      for (int64_t t = 0; t < tokens; ++t) {
        float* yt = out.y + (t0 + 16 * j + t) * out.ldy + n0 + 16 * i;
        __m512 v = _mm512_castsi512_ps(r[t]);
        if (out.beta != 0.0f) {
          v = _mm512_add_ps(
              _mm512_mul_ps(_mm512_set1_ps(out.beta), _mm512_maskz_loadu_ps(mask, yt)), v);
        }
        _mm512_mask_storeu_ps(yt, mask, v);
      }
    }
  }
}

// Weight rows [n0, n0 + rows) (rows <= 32, read from a with row stride lda; a block past `rows`
// holds zeros or the next valid rows, whose products are discarded) against token blocks
// [mb_begin, mb_end).
void run_rows(const uint16_t* a, int64_t lda, int64_t n0, int64_t rows, int64_t mb_begin,
              int64_t mb_end, const uint16_t* packed, int64_t kblocks, const Output& out) {
  alignas(64) float c[4 * 256];
  for (int64_t mb = mb_begin; mb < mb_end; mb += 2) {
    const uint16_t* b = packed + mb * kblocks * 512;
    const bool two = mb + 1 < mb_end;
    if (rows > 16) {
      two ? tiles<2, 2>(a, lda, b, kblocks, c) : tiles<1, 2>(a, lda, b, kblocks, c);
    } else {
      two ? tiles<2, 1>(a, lda, b, kblocks, c) : tiles<1, 1>(a, lda, b, kblocks, c);
    }
    write(c, two ? 2 : 1, rows > 16 ? 2 : 1, n0, rows, mb * 16, out);
  }
}

// Columns [n_begin, n_end). Loops: token chunks that stay in L2, weight panels of up to
// `panel` rows, pairs of 16-row weight blocks, pairs of token blocks, then K.
void gemm(int64_t m, int64_t n_begin, int64_t n_end, int64_t k, const uint16_t* packed,
          const void* w, DType w_dtype, int64_t ldw, float beta, float* y, int64_t ldy) {
  const int64_t kp = padded_k(k), kblocks = kp / kKBlock, mblocks = (m + 15) / 16;
  TileConfig config;
  for (int t = 0; t < 8; ++t) {
    config.rows[t] = 16;
    config.colsb[t] = 64;
  }
  compiler_fence();  // ldtilecfg reads `config`: its stores must not be elided or sunk
  _tile_loadconfig(&config);
  thread_local std::vector<uint16_t> panel_storage, tail_storage;
  const Output out{m, beta, y, ldy};
  // bfloat16 weights are read in place when their tile rows are whole cache lines, or at a few
  // rows (decode), where a copy would double the memory traffic that bounds the call.
  const bool aligned_rows = (ldw * 2) % 64 == 0 && reinterpret_cast<uintptr_t>(w) % 64 == 0;
  const bool in_place =
      w_dtype == DType::kBFloat16 && k % kKBlock == 0 && (aligned_rows || m <= 16);
  const auto* w16 = static_cast<const uint16_t*>(w);
  // Prefill: a weight panel of ~1 MB and a token chunk of ~768 KB share the 2 MB L2 (the best of
  // the splits measured at M = 512 and 4096, K = 2048 and 5632).
  const int64_t row_bytes = std::max<int64_t>(kp * 2, 64);
  const int64_t panel =
      m <= 16 ? 256 : std::clamp<int64_t>((1 << 20) / row_bytes / 32 * 32, 32, 1024);
  const int64_t chunk = std::max<int64_t>(2, (768 << 10) / (row_bytes * 16) / 2 * 2);
  for (int64_t mb0 = 0; mb0 < mblocks; mb0 += chunk) {
    const int64_t mb1 = std::min(mblocks, mb0 + chunk);
    for (int64_t p = n_begin; p < n_end; p += panel) {
      const int64_t rows = std::min(panel, n_end - p);
      if (!in_place) {
        const uint16_t* a =
            weight_panel(w, w_dtype, ldw, p, p + rows, (rows + 15) / 16 * 16, k, kp, panel_storage);
        compiler_fence();
        for (int64_t r = 0; r < rows; r += 32) {
          run_rows(a + r * kp, kp, p + r, std::min<int64_t>(32, rows - r), mb0, mb1, packed,
                   kblocks, out);
        }
        continue;
      }
      for (int64_t r = 0; r < rows; r += 32) {
        const int64_t left = std::min<int64_t>(32, rows - r), full = left / 16 * 16;
        if (full > 0) {
          run_rows(w16 + (p + r) * ldw, ldw, p + r, full, mb0, mb1, packed, kblocks, out);
        }
        if (left > full) {  // a last block of fewer than 16 rows: zero-padded copy
          const int64_t begin = p + r + full;
          const uint16_t* a =
              weight_panel(w, w_dtype, ldw, begin, p + r + left, 16, k, kp, tail_storage);
          compiler_fence();
          run_rows(a, kp, begin, left - full, mb0, mb1, packed, kblocks, out);
        }
      }
    }
  }
  _tile_release();
}

}  // namespace amx
#pragma GCC pop_options
#endif

// ---- dot-product sets: packed activations [m, kp] ----

using DotGemm = void (*)(int64_t, int64_t, int64_t, int64_t, const uint16_t*, int64_t,
                         const uint16_t*, int64_t, float, float*, int64_t);

DotGemm dot_kernel(Bf16Isa isa) {
#if LORART_BF16_X86
  if (isa == Bf16Isa::kAvx512Bf16) return avx512bf16::dot_gemm;
  if (features().avx512) return emulated512::dot_gemm;
#endif
  (void)isa;
  return emulated::dot_gemm;
}

// Columns [n_begin, n_end); weights other than bfloat16 (or strided ones) are rounded a panel
// at a time into per-thread storage.
void dot_gemm(Bf16Isa isa, int64_t m, int64_t n_begin, int64_t n_end, int64_t k,
              const uint16_t* packed, const void* w, DType w_dtype, int64_t ldw, float beta,
              float* y, int64_t ldy) {
  const DotGemm kernel = dot_kernel(isa);
  const int64_t kp = padded_k(k);
  if (w_dtype == DType::kBFloat16) {
    kernel(m, n_begin, n_end, k, packed, kp, static_cast<const uint16_t*>(w), ldw, beta, y, ldy);
    return;
  }
  thread_local std::vector<uint16_t> storage;
  constexpr int64_t kPanel = 256;
  for (int64_t p = n_begin; p < n_end; p += kPanel) {
    const int64_t rows = std::min(kPanel, n_end - p);
    const uint16_t* a = weight_panel(w, w_dtype, ldw, p, p + rows, rows, k, kp, storage);
    kernel(m, 0, rows, k, packed, kp, a, kp, beta, y + p, ldy);
  }
}

}  // namespace

void linear_bf16(const float* x, int64_t x_stride, const void* w, DType w_dtype, int64_t m,
                 int64_t n, int64_t k, float beta, float* y, int64_t y_stride,
                 WeightLayout w_layout) {
  if (w_dtype != DType::kFloat32 && w_dtype != DType::kFloat16 && w_dtype != DType::kBFloat16) {
    raise<InvalidArgument>("linear_bf16: weights must be float32, float16 or bfloat16, got ",
                           dtype_name(w_dtype));
  }
  // Interleaved weights meet activations interleaved the same way: every product pairs the
  // values it pairs row-major, only the order of the pairs within a 32-column block differs.
  const bool interleave = w_layout == WeightLayout::kK32Interleaved;
  if (interleave && w_dtype != DType::kBFloat16) {
    raise<InvalidArgument>("linear_bf16: the k32-interleaved layout is for bfloat16 weights, got ",
                           dtype_name(w_dtype));
  }
  if (m <= 0 || n <= 0) return;
  const Bf16Isa isa = current_isa();
  const int64_t kp = padded_k(k);
#if LORART_BF16_X86
  const bool tiles = isa == Bf16Isa::kAmx;
#else
  const bool tiles = false;
#endif
  // The calling thread's packed activations, grown as needed and shared with the workers.
  thread_local std::vector<uint16_t> packed_storage;
  size_t size = static_cast<size_t>(m * kp);
#if LORART_BF16_X86
  if (tiles) size = amx::packed_size(m, kp);
#endif
  uint16_t* packed = aligned(packed_storage, size);
  const int64_t units = tiles ? (m + 15) / 16 : m;
  const int threads = m * n * k < (int64_t{1} << 18) ? 1 : omp_get_max_threads();
  const FloatMode mode;
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    const FloatMode::Scope same(mode);
    thread_local std::vector<uint16_t> rows;
#pragma omp for schedule(static)
    for (int64_t u = 0; u < units; ++u) {
#if LORART_BF16_X86
      if (tiles) {
        amx::pack_tokens(x, x_stride, m, k, kp, u, interleave, packed, rows);
        continue;
      }
#endif
      round_row(x + u * x_stride, k, packed + u * kp, kp);
      if (interleave) interleave_k32(packed + u * kp, k);
    }
    const auto [begin, end] = column_share(n, omp_get_num_threads(), omp_get_thread_num());
    if (begin < end) {
#if LORART_BF16_X86
      if (tiles) {
        amx::gemm(m, begin, end, k, packed, w, w_dtype, k, beta, y, y_stride);
      } else {
        dot_gemm(isa, m, begin, end, k, packed, w, w_dtype, k, beta, y, y_stride);
      }
#else
      dot_gemm(isa, m, begin, end, k, packed, w, w_dtype, k, beta, y, y_stride);
#endif
    }
  }
}

}  // namespace lorart::cpu

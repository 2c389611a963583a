// The GEMM kernels of one instruction set. Only fixed_order_gemm.cc includes this, once per
// instruction set (hence no include guard), inside a namespace that defines L (float lanes per
// register), the vector types F, U16, U32, I32 of L lanes, madd(a, b, c) = a * b + c (fused
// where the set has FMA) and splat(x), all under that set's `#pragma GCC target`, so everything
// here compiles for it.

LORART_INLINE F load(const float* p) {
  F v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

LORART_INLINE F load(const BFloat16* p) {
  // bfloat16 is the top half of a float32: widening is a 16-bit shift, exact.
  U16 h;
  std::memcpy(&h, p, sizeof(h));
  const U32 u = __builtin_convertvector(h, U32) << 16;
  F v;
  std::memcpy(&v, &u, sizeof(v));
  return v;
}

// A kK32Interleaved row read in column order: past its last full block of 32 (where it is in
// order), and for the tests' zero-padded tails.
LORART_INLINE F load(const BFloat16Pairs* p) { return load(reinterpret_cast<const BFloat16*>(p)); }

// Columns [i + S L, i + (S + 1) L) of a kK32Interleaved row, i a multiple of 32 with i + 32 <= K:
// the 16 / L words at position i + 2 L (S % Q) hold the block's columns j (low half) and 16 + j
// (high half), so the first Q vectors are low halves shifted up, the last Q high halves masked.
template <int S>
LORART_INLINE F load_interleaved(const BFloat16Pairs* row, int64_t i) {
  constexpr int Q = 16 / L;
  U32 u;
  std::memcpy(&u, row + i + 2 * L * (S % Q), sizeof(u));
  const U32 bits = S < Q ? u << 16 : u & 0xffff0000u;
  F v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}

LORART_INLINE F load(const Half* p) {
  // Exact widening that every instruction set vectorises (GCC turns a _Float16 vector conversion
  // into per-element library calls without AVX512-FP16), with no float32 subnormal anywhere, so a
  // DAZ mode set by another library cannot flush half subnormals to zero: normals move their 15
  // magnitude bits up by 13 and rebias the exponent (+112); inf / nan get the float32 all-ones
  // exponent. (About 2x slower per element than float32 loads; bfloat16 is the fast 16-bit type.)
  U16 h;
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
template <typename T>
LORART_INLINE F load_partial(const T* p, int64_t count) {
  T padded[L];
  std::memset(padded, 0, sizeof(padded));
  std::memcpy(padded, p, count * sizeof(T));
  return load(padded);
}

LORART_INLINE void store_partial(float* p, F v, int64_t count) {
  std::memcpy(p, &v, count * sizeof(float));
}

// One level of the lane fold: (a, b) -> one vector whose first half holds a's and second half
// b's lanes folded pairwise, lane i with lane i + H in every group of 2H lanes. log2(L) levels
// (H = L/2, ..., 1) leave the full sum of accumulator i in lane i, added by the same tree for
// every accumulator.
template <int H>
constexpr int fold_source(int lane) {
  const int half = L / 2, in = lane < half ? lane : lane - half;
  const int from = 2 * H * (in / H) + in % H;
  return lane < half ? from : L + from;
}

template <int H, int... I>
LORART_INLINE F fold(F a, F b, std::integer_sequence<int, I...>) {
#if defined(__clang__)
  return __builtin_shufflevector(a, b, fold_source<H>(I)...) +
         __builtin_shufflevector(a, b, (fold_source<H>(I) + H)...);
#else  // __builtin_shufflevector needs GCC 12; __builtin_shuffle is older GCC's spelling
  return __builtin_shuffle(a, b, I32{fold_source<H>(I)...}) +
         __builtin_shuffle(a, b, I32{(fold_source<H>(I) + H)...});
#endif
}

// N accumulators in v (N <= L) folded in place; afterwards lane i < N of v[0] is the sum of the
// lanes of accumulator i.
template <int H, int N>
LORART_INLINE void fold_levels(F* v) {
  constexpr int kNext = N / 2 > 0 ? N / 2 : 1;
  for (int i = 0; i < kNext; ++i) {
    v[i] = fold<H>(v[2 * i], v[std::min(2 * i + 1, N - 1)], std::make_integer_sequence<int, L>());
  }
  if constexpr (H > 1) fold_levels<H / 2, kNext>(v);
}

// sums[i] = the lane sum of acc[i] for i < N, by batches of L accumulators (the last batch
// may be a smaller power of two).
template <int N>
LORART_INLINE void reduce(const F* acc, float* sums) {
  constexpr int kBatch = N < L ? N : L;
  static_assert((kBatch & (kBatch - 1)) == 0, "a batch of accumulators must be a power of two");
  F v[kBatch];
  for (int i = 0; i < kBatch; ++i) v[i] = acc[i];
  fold_levels<L / 2, kBatch>(v);
  std::memcpy(sums, v, kBatch * sizeof(float));
  if constexpr (N > L) reduce<N - L>(acc + L, sums + L);
}

// Values ahead of the current column a kK32Interleaved row is prefetched at (1 KB: 16 lines).
constexpr int64_t kPrefetchAhead = 512;

// Step S of a full 32-column block of kK32Interleaved rows from column i: the same multiply-adds,
// in the same order, as steps i + S L of the row-major loop in nt_tile.
template <int G, int R, int S>
LORART_INLINE void interleaved_block(const float* x, int64_t ldx, const BFloat16Pairs* const* wr,
                                     int64_t i, F* acc) {
  F xv[G];
#pragma GCC unroll 8
  for (int g = 0; g < G; ++g) xv[g] = load(x + g * ldx + i + S * L);
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    const F wv = load_interleaved<S>(wr[r], i);
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g) acc[g * R + r] = madd(xv[g], wv, acc[g * R + r]);
  }
  if constexpr (S + 1 < 32 / L) interleaved_block<G, R, S + 1>(x, ldx, wr, i, acc);
}

// One register tile: G activation rows x R weight rows (G * R accumulators of L lanes):
// y[g, c0 + r] for r < rows. Lane l of an accumulator sums the products at k = l, l + L, ... in
// order, a K tail zero-padded (the padding adds exact zeros). Tile rows past `rows` re-read the
// last valid weight row and are discarded. The tile shape only decides which outputs share the
// loop: every accumulator sees the same loads and multiply-adds in the same order.
template <int G, int R, bool kTail, typename T>
LORART_INLINE void nt_tile(int64_t k, const float* x, int64_t ldx, const T* w, int64_t ldw,
                           int64_t c0, int64_t rows, float beta, float* y, int64_t ldy) {
  constexpr int kAcc = G * R;
  const T* wr[R];
  for (int r = 0; r < R; ++r) wr[r] = w + (c0 + std::min<int64_t>(r, rows - 1)) * ldw;
  F acc[kAcc] = {};
  const int64_t k_full = k / L * L;
  int64_t i = 0;
  if constexpr (std::is_same_v<T, BFloat16Pairs>) {
    for (; i + 32 <= k; i += 32) {
      // A software prefetch per row and cache line: the hardware prefetchers alone left ~10% of
      // the streaming bandwidth unused with a tile's rows read side by side.
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) __builtin_prefetch(wr[r] + i + kPrefetchAhead);
      interleaved_block<G, R, 0>(x, ldx, wr, i, acc);
    }
  }
  for (; i < k_full; i += L) {
    F xv[G];
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g) xv[g] = load(x + g * ldx + i);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const F wv = load(wr[r] + i);
#pragma GCC unroll 8
      for (int g = 0; g < G; ++g) acc[g * R + r] = madd(xv[g], wv, acc[g * R + r]);
    }
  }
  if (kTail) {
    F xv[G];
    for (int g = 0; g < G; ++g) xv[g] = load_partial(x + g * ldx + k_full, k - k_full);
    for (int r = 0; r < R; ++r) {
      const F wv = load_partial(wr[r] + k_full, k - k_full);
      for (int g = 0; g < G; ++g) acc[g * R + r] = madd(xv[g], wv, acc[g * R + r]);
    }
  }
  // Output (g, r) is accumulator g * R + r, so each activation row's R sums are contiguous.
  float sums[kAcc + L];
  reduce<kAcc>(acc, sums);
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
template <int G, int R, typename T>
LORART_INLINE void nt_rows(int64_t c_begin, int64_t c_end, int64_t k, const float* x, int64_t ldx,
                           const T* w, int64_t ldw, float beta, float* y, int64_t ldy) {
  for (int64_t c = c_begin; c < c_end; c += R) {
    const int64_t rows = std::min<int64_t>(R, c_end - c);
    if (k % L == 0) {
      nt_tile<G, R, false>(k, x, ldx, w, ldw, c, rows, beta, y, ldy);
    } else {
      nt_tile<G, R, true>(k, x, ldx, w, ldw, c, rows, beta, y, ldy);
    }
  }
}

// Activation rows [j, m) in groups of G while G are left, against weight rows [c_begin, c_end);
// returns the first row left over.
template <int G, int R, typename T>
LORART_INLINE int64_t nt_groups(int64_t j, int64_t m, int64_t c_begin, int64_t c_end, int64_t k,
                                const float* x, int64_t ldx, const T* w, int64_t ldw, float beta,
                                float* y, int64_t ldy) {
  for (; j + G <= m; j += G) {
    nt_rows<G, R>(c_begin, c_end, k, x + j * ldx, ldx, w, ldw, beta, y + j * ldy, ldy);
  }
  return j;
}

// Tile shapes (activation rows x weight rows) per register file, the largest whose accumulators,
// activation vectors and one weight vector fit without spilling: AVX-512 (32 registers) 6 x 4,
// AVX2 (16) 3 x 4, SSE2 (16, and a temporary per multiply-add) 2 x 4. On this model's prefill
// GEMMs (one thread, Xeon with AVX-512) they ran at 84-96% (AVX-512) and 85-94% (AVX2) of
// OpenBLAS's sgemm; at 1-16 rows as fast as the few-row kernels they replaced, or faster.
template <typename T>
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
      if (m == 8) j = nt_groups<4, 4>(j, m, c, c_end, k, x, ldx, w, ldw, beta, y, ldy);
      j = nt_groups<6, 4>(j, m, c, c_end, k, x, ldx, w, ldw, beta, y, ldy);
      j = nt_groups<4, 4>(j, m, c, c_end, k, x, ldx, w, ldw, beta, y, ldy);
      j = nt_groups<2, 8>(j, m, c, c_end, k, x, ldx, w, ldw, beta, y, ldy);
    } else if constexpr (L == 8) {
      j = nt_groups<3, 4>(j, m, c, c_end, k, x, ldx, w, ldw, beta, y, ldy);
      j = nt_groups<2, 4>(j, m, c, c_end, k, x, ldx, w, ldw, beta, y, ldy);
    } else {
      j = nt_groups<2, 4>(j, m, c, c_end, k, x, ldx, w, ldw, beta, y, ldy);
    }
    // Single rows (decode at batch 1) 8 weight rows at a time from interleaved rows: 16 ran ~8%
    // slower, the prefetches of 16 rows outrunning the line fill buffers.
    constexpr int kSingleRowTile = std::is_same_v<T, BFloat16Pairs> && L == 16 ? 8 : L;
    nt_groups<1, kSingleRowTile>(j, m, c, c_end, k, x, ldx, w, ldw, beta, y, ldy);
  }
}

// Columns in chunks of 4 vectors; per group of G activation rows the chunk's partial sums stay in
// registers while the K weight rows stream past: y + x[0] w[0] + x[1] w[1] + ... in that order.
constexpr int kNnVectors = 4;

template <int G, typename T>
LORART_INLINE void nn_chunk(int64_t c, int64_t k, const float* x, int64_t ldx, const T* w,
                            int64_t ldw, float* y, int64_t ldy) {
  F acc[G][kNnVectors];
  for (int g = 0; g < G; ++g) {
    for (int u = 0; u < kNnVectors; ++u) acc[g][u] = load(y + g * ldy + c + u * L);
  }
  for (int64_t r = 0; r < k; ++r) {
    F wv[kNnVectors];
    for (int u = 0; u < kNnVectors; ++u) wv[u] = load(w + r * ldw + c + u * L);
    for (int g = 0; g < G; ++g) {
      const F xr = splat(x[g * ldx + r]);
      for (int u = 0; u < kNnVectors; ++u) acc[g][u] = madd(xr, wv[u], acc[g][u]);
    }
  }
  for (int g = 0; g < G; ++g) std::memcpy(y + g * ldy + c, acc[g], sizeof(acc[g]));
}

// The last columns (fewer than a chunk) one vector at a time, zero-padded: every column gets the
// same lane arithmetic as in nn_chunk, so results do not depend on where a split falls.
template <typename T>
LORART_INLINE void nn_tail(int64_t m, int64_t c, int64_t cols, int64_t k, const float* x,
                           int64_t ldx, const T* w, int64_t ldw, float* y, int64_t ldy) {
  for (int64_t v = 0; v < cols; v += L) {
    const int64_t width = std::min<int64_t>(L, cols - v);
    for (int64_t j = 0; j < m; ++j) {
      float* yj = y + j * ldy + c + v;
      F acc = load_partial(yj, width);
      for (int64_t r = 0; r < k; ++r) {
        acc = madd(splat(x[j * ldx + r]), load_partial(w + r * ldw + c + v, width), acc);
      }
      store_partial(yj, acc, width);
    }
  }
}

// Groups of 4 activation rows share each weight vector (16 accumulators with AVX-512, 8 with
// 16 registers).
template <typename T>
LORART_INLINE void nn_impl(int64_t m, int64_t n_begin, int64_t n_end, int64_t k, const float* x,
                           int64_t ldx, const T* w, int64_t ldw, float* y, int64_t ldy) {
  constexpr int64_t kChunk = kNnVectors * L;
  constexpr int kGroup = L == 16 ? 4 : 2;
  int64_t c = n_begin;
  for (; c + kChunk <= n_end; c += kChunk) {
    int64_t j = 0;
    for (; j + kGroup <= m; j += kGroup) {
      nn_chunk<kGroup>(c, k, x + j * ldx, ldx, w, ldw, y + j * ldy, ldy);
    }
    for (; j < m; ++j) nn_chunk<1>(c, k, x + j * ldx, ldx, w, ldw, y + j * ldy, ldy);
  }
  if (c < n_end) nn_tail(m, c, n_end - c, k, x, ldx, w, ldw, y, ldy);
}

// The entry points: nt and nn for each weight dtype.
template <typename T>
void nt(int64_t m, int64_t n_begin, int64_t n_end, int64_t k, const float* x, int64_t ldx,
        const void* w, int64_t ldw, float beta, float* y, int64_t ldy) {
  nt_impl(m, n_begin, n_end, k, x, ldx, static_cast<const T*>(w), ldw, beta, y, ldy);
}

template <typename T>
void nn(int64_t m, int64_t n_begin, int64_t n_end, int64_t k, const float* x, int64_t ldx,
        const void* w, int64_t ldw, float* y, int64_t ldy) {
  nn_impl(m, n_begin, n_end, k, x, ldx, static_cast<const T*>(w), ldw, y, ldy);
}

constexpr Kernels kKernels = {{nt<float>, nt<Half>, nt<BFloat16>, nt<BFloat16Pairs>},
                              {nn<float>, nn<Half>, nn<BFloat16>}};

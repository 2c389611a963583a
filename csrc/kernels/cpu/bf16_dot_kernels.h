// The dot-product kernels of kAvx512Bf16 and kEmulated (bf16_gemm.h). Only bf16_gemm.cc includes
// this, once per instruction set (hence no include guard), inside a namespace that defines
// dp(acc, x, w): acc + the products of 16 bfloat16 pairs, odd element of each pair first (the
// arithmetic of vdpbf16ps), on 16-lane float32 vectors F and 32-element bfloat16 vectors W.

// 32 bfloat16 at p; `count` < 32 of them, zero-padded, in the K tail.
LORART_INLINE W load_w(const uint16_t* p) {
  W v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

LORART_INLINE W load_w_partial(const uint16_t* p, int64_t count) {
  uint16_t padded[32] = {};
  std::memcpy(padded, p, count * sizeof(uint16_t));
  return load_w(padded);
}

// One register tile: G activation rows (packed bfloat16, row stride ldx, zero-padded to a
// multiple of 32) x R weight rows (row stride ldw, K elements): y[g, c0 + r] for r < rows. Tile
// rows past `rows` re-read the last valid weight row and are discarded; every accumulator sees
// the same sequence of dp calls whatever the tile shape.
template <int G, int R, bool kTail>
LORART_INLINE void dot_tile(int64_t k, const uint16_t* x, int64_t ldx, const uint16_t* w,
                            int64_t ldw, int64_t c0, int64_t rows, float beta, float* y,
                            int64_t ldy) {
  const uint16_t* wr[R];
  for (int r = 0; r < R; ++r) wr[r] = w + (c0 + std::min<int64_t>(r, rows - 1)) * ldw;
  F acc[G * R] = {};
  const int64_t k_full = k / 32 * 32;
  for (int64_t i = 0; i < k_full; i += 32) {
    W xv[G];
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g) xv[g] = load_w(x + g * ldx + i);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const W wv = load_w(wr[r] + i);
#pragma GCC unroll 8
      for (int g = 0; g < G; ++g) acc[g * R + r] = dp(acc[g * R + r], xv[g], wv);
    }
  }
  if constexpr (kTail) {
    W xv[G];
    for (int g = 0; g < G; ++g) xv[g] = load_w(x + g * ldx + k_full);
    for (int r = 0; r < R; ++r) {
      const W wv = load_w_partial(wr[r] + k_full, k - k_full);
      for (int g = 0; g < G; ++g) acc[g * R + r] = dp(acc[g * R + r], xv[g], wv);
    }
  }
  for (int g = 0; g < G; ++g) {
    float* yg = y + g * ldy + c0;
    for (int64_t r = 0; r < rows; ++r) {
      const float s = fold_lanes(acc[g * R + r]);
      yg[r] = beta == 0.0f ? s : beta * yg[r] + s;
    }
  }
}

template <int G, int R>
LORART_INLINE int64_t dot_groups(int64_t j, int64_t m, int64_t c_begin, int64_t c_end, int64_t k,
                                 const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t ldw,
                                 float beta, float* y, int64_t ldy) {
  for (; j + G <= m; j += G) {
    for (int64_t c = c_begin; c < c_end; c += R) {
      const int64_t rows = std::min<int64_t>(R, c_end - c);
      if (k % 32 == 0) {
        dot_tile<G, R, false>(k, x + j * ldx, ldx, w, ldw, c, rows, beta, y + j * ldy, ldy);
      } else {
        dot_tile<G, R, true>(k, x + j * ldx, ldx, w, ldw, c, rows, beta, y + j * ldy, ldy);
      }
    }
  }
  return j;
}

// Columns [n_begin, n_end) of y for all m packed activation rows, weights bfloat16 [N, ldw].
// Column blocks sized for L2 (prefill) or L1 (a few rows) so each weight row comes from memory
// once per call.
void dot_gemm(int64_t m, int64_t n_begin, int64_t n_end, int64_t k, const uint16_t* x, int64_t ldx,
              const uint16_t* w, int64_t ldw, float beta, float* y, int64_t ldy) {
  const int64_t row_bytes = std::max<int64_t>(k, 1) * 2;
  const int64_t block =
      m <= 8 ? 32 : std::clamp<int64_t>((768 << 10) / row_bytes / 16 * 16, 16, 1024);
  for (int64_t c = n_begin; c < n_end; c += block) {
    const int64_t c_end = std::min(n_end, c + block);
    int64_t j = dot_groups<4, 4>(0, m, c, c_end, k, x, ldx, w, ldw, beta, y, ldy);
    dot_groups<1, 8>(j, m, c, c_end, k, x, ldx, w, ldw, beta, y, ldy);
  }
}

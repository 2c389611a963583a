// Single-precision GEMM through the CPU BLAS (scipy-openblas32's prefixed symbols, or a system
// CBLAS). Row-major throughout. Only csrc/kernels/cpu/ includes this.
#pragma once

#include <cblas.h>

#include <cstdint>

namespace lorart::cpu {

// C[M, N] = alpha * A[M, K] @ op(B) + beta * C, op(B) = B^T when `b_transposed` (B is [N, K]),
// else B ([K, N]). Leading dimensions are row strides in elements.
inline void sgemm(bool b_transposed, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                  int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
#if LORART_CBLAS_PREFIX_SCIPY
  scipy_cblas_sgemm
#else
  cblas_sgemm
#endif
      (CblasRowMajor, CblasNoTrans, b_transposed ? CblasTrans : CblasNoTrans, static_cast<int>(m),
       static_cast<int>(n), static_cast<int>(k), alpha, a, static_cast<int>(lda), b,
       static_cast<int>(ldb), beta, c, static_cast<int>(ldc));
}

// Threads the BLAS may use (lorart keeps it at 1 and parallelises around it with OpenMP).
inline void set_blas_threads(int threads) {
#if LORART_CBLAS_PREFIX_SCIPY
  scipy_openblas_set_num_threads(threads);
#else
  openblas_set_num_threads(threads);
#endif
}

}  // namespace lorart::cpu

// GEMMs with few activation rows (decode steps, LoRA segments of a few tokens) whose cost is
// reading the weight once. A general BLAS packs the weight first, which at M <= 16 costs more
// than the product itself; these kernels stream each weight row exactly once, keep the activation
// rows in L1, and widen float16/bfloat16 weights to float32 in registers, so an adapter stored in
// 16 bits costs half the memory traffic of a float32 one with the same result.
//
// Each output element is a float32 sum accumulated in a fixed order that does not depend on M,
// on which rows share the call, or on the [n_begin, n_end) split: a token's result is bitwise the
// same alone or in any batch. Single-threaded; callers split columns across threads. Only
// csrc/kernels/cpu/ includes this.
#pragma once

#include <cstdint>

#include "core/dtype.h"

namespace lorart::cpu {

// Columns n_begin <= c < n_end of y[M, N] = x[M, K] @ w[N, K]^T + beta * y, with w in `w_dtype`
// (float32, float16 or bfloat16) and row stride ldw. beta == 0 never reads y.
void skinny_gemm_nt(DType w_dtype, int64_t m, int64_t n_begin, int64_t n_end, int64_t k,
                    const float* x, int64_t ldx, const void* w, int64_t ldw, float beta, float* y,
                    int64_t ldy);

// Columns n_begin <= c < n_end of y[M, N] += x[M, K] @ w[K, N], with w in `w_dtype` and row stride
// ldw. Meant for small K (a LoRA rank): each of the K weight rows is read once.
void skinny_gemm_nn(DType w_dtype, int64_t m, int64_t n_begin, int64_t n_end, int64_t k,
                    const float* x, int64_t ldx, const void* w, int64_t ldw, float* y, int64_t ldy);

}  // namespace lorart::cpu

// The GEMM kernels behind every matrix product of the CPU backend (dense layers, the LM head, the
// LoRA shrink and expand, attention's scores and weighted values), at every row count: one decode
// token or a prefill of thousands.
//
// Batch invariance is their contract: each output element is a float32 sum accumulated in one
// fixed order that depends only on K, never on M, on which rows share the call, on the
// [n_begin, n_end) split or on the blocking, so a token's result is bitwise the same alone, in any
// batch and at any thread count. gemm_nt: 16 lane-wise partial sums (lane l sums the products of
// k = l, l + 16, l + 32, ... in that order, with fused multiply-adds where the CPU has them; a K
// tail is zero-padded), then one fixed pairwise fold of the 16 lanes. gemm_nn: y + x[0] w[0] +
// x[1] w[1] + ... in order of k. The tiles that reach prefill speed (6 activation rows x 4 weight
// rows in registers, weight blocks sized for L2) only change which outputs are computed together.
//
// float16 / bfloat16 weights are widened to float32 exactly (in registers, or by the caller into
// a float32 copy: both give the same bits). The lane count is the register width of the
// instruction set the process runs (GemmIsa: 16 with AVX-512, 8 with AVX2 + FMA, 4 otherwise;
// no fused multiply-add in the baseline), picked once per process, so every call in a process
// shares one arithmetic; another instruction set may round differently.
// Single-threaded; callers split columns across threads. Only csrc/kernels/cpu/ (and the tests)
// include this.
#pragma once

#include <cstdint>

#include "core/dtype.h"
#include "kernels/params.h"

namespace lorart::cpu {

// Instruction sets the kernels are compiled for, in order of preference.
enum class GemmIsa { kBaseline, kAvx2, kAvx512 };

const char* gemm_isa_name(GemmIsa isa);
// The set in use: the best this CPU supports unless set_gemm_isa chose another.
GemmIsa gemm_isa();
// For tests that cover every set on one machine; changing it between two calls gives up their
// bitwise agreement. Throws InvalidArgument for a set this CPU lacks.
void set_gemm_isa(GemmIsa isa);

// Columns n_begin <= c < n_end of y[M, N] = x[M, K] @ w[N, K]^T + beta * y, with w in `w_dtype`
// (float32, float16 or bfloat16) and row stride ldw. beta == 0 never reads y. bfloat16 w may be
// in WeightLayout::kK32Interleaved, with bitwise the results of its row-major copy.
void gemm_nt(DType w_dtype, int64_t m, int64_t n_begin, int64_t n_end, int64_t k, const float* x,
             int64_t ldx, const void* w, int64_t ldw, float beta, float* y, int64_t ldy,
             WeightLayout w_layout = WeightLayout::kRowMajor);

// Columns n_begin <= c < n_end of y[M, N] += x[M, K] @ w[K, N], with w in `w_dtype` and row stride
// ldw. Meant for small K (a LoRA rank, a run of attention keys): each weight row is read once per
// group of activation rows.
void gemm_nn(DType w_dtype, int64_t m, int64_t n_begin, int64_t n_end, int64_t k, const float* x,
             int64_t ldx, const void* w, int64_t ldw, float* y, int64_t ldy);

}  // namespace lorart::cpu

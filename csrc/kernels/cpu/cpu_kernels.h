// CPU implementations of the ops (the reference every CUDA kernel is checked against, and the
// backend CI runs). Row-major, float32 activations, weights in their storage dtype widened to
// float32 as they are read (exact); multi-threaded with OpenMP on the calling thread's team.
// Only csrc/kernels/ops.cc (and the kernel tests) call these: ops check the arguments and build
// the parameter structs.
#pragma once

#include <cstdint>
#include <utility>

#include "kernels/params.h"

namespace lorart::cpu {

void embedding(const EmbeddingParams& p);
// One row of k bfloat16 values, row-major -> WeightLayout::kK32Interleaved, in place.
void interleave_k32(uint16_t* row, int64_t k);
// A row-major bfloat16 matrix [rows, cols] (row stride `stride`) -> `layout`, in place.
void to_layout(uint16_t* w, int64_t rows, int64_t cols, int64_t stride, WeightLayout layout);
void rms_norm(const RmsNormParams& p);
void add_rms_norm(const AddRmsNormParams& p);
// Rotates [num_tokens, num_heads, head_dim] (token row stride `stride`) in place, HF's
// rotate_half layout: pairs (i, i + head_dim/2) turn by positions[t] * inv_freq[i].
void rope(float* x, int64_t stride, int64_t num_tokens, int32_t num_heads, int32_t head_dim,
          const int32_t* positions, const float* inv_freq);
// out[t, i] = silu(gate_up[t, i]) * gate_up[t, inter + i]
void silu_mul(const float* gate_up, int64_t num_tokens, int64_t inter, float* out);
void add_bias(const BiasParams& p);
// y[i] += x[i]
void add(float* y, const float* x, int64_t n);
// out[i, :] = x[rows[i], :] (row width `width`, contiguous rows).
void gather_rows(const float* x, int64_t width, const int32_t* rows, int64_t num_rows, float* out);
// Writes the chunk's K/V rows to their cache slots, then attends.
void paged_attention(const PagedAttentionParams& p);
void lora_gemm(const LoraGemmParams& p);
void dora_scales(const DoraScalesParams& p);
void dora_apply(const DoraApplyParams& p);
// Row `row` of w [rows, cols] (in its dtype and layout) widened to float32 in column order.
void read_weight_row(const WeightRef& w, int64_t row, int64_t cols, float* out);
// Exact (Precision::kFloat32: fixed_order_gemm.h) or bf16 (Precision::kBFloat16: linear_bf16)
// by p.precision.
void linear(const LinearParams& p);
// precision="bfloat16": y[M, N] (+)= bf16(x)[M, K] @ bf16(w)[N, K]^T, float32 accumulation in
// a fixed order per element (bf16_gemm.h). w is [N, K] contiguous in `w_dtype` (float32, float16
// or bfloat16; bfloat16 is read in place, the others rounded as they are read). beta == 0 never
// reads y. Activations are rounded into a per-calling-thread buffer that grows and is kept.
// bfloat16 w in WeightLayout::kK32Interleaved gives the results of the row-major call on
// activations and weights both interleaved (each output the same products, paired in another
// order within a 32-column block).
void linear_bf16(const float* x, int64_t x_stride, const void* w, DType w_dtype, int64_t m,
                 int64_t n, int64_t k, float beta, float* y, int64_t y_stride,
                 WeightLayout w_layout = WeightLayout::kRowMajor);
// `scratch` holds vocab (value, index) pairs.
void sample(const SampleParams& p, std::pair<float, int32_t>* scratch);

void set_num_threads(int threads);
int num_threads();

}  // namespace lorart::cpu

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
void rms_norm(const RmsNormParams& p);
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
// Exact (Precision::kFloat32) or bf16 (Precision::kBFloat16) by p.precision.
void linear(const LinearParams& p);
// `scratch` holds vocab (value, index) pairs.
void sample(const SampleParams& p, std::pair<float, int32_t>* scratch);

void set_num_threads(int threads);
int num_threads();

}  // namespace lorart::cpu

// CPU implementations of the ops (the reference every CUDA kernel is checked against, and the
// backend CI runs). Raw pointers, row-major, float32; multi-threaded with OpenMP. Callers go
// through csrc/kernels/ops.h, which checks arguments and dispatches on the device.
#pragma once

#include <cstdint>
#include <utility>

#include "core/dtype.h"
#include "kernels/params.h"

namespace lorart::cpu {

// out[t, :] = table[ids[t], :]
void embedding(const float* table, int64_t hidden, const int32_t* ids, int64_t num_tokens,
               float* out);
// out[t] = w * (x[t] / sqrt(mean(x[t]^2) + eps)); out may alias x.
void rms_norm(const float* x, int64_t x_stride, const float* weight, int64_t num_tokens,
              int64_t hidden, float eps, float* out, int64_t out_stride);
// Rotates [num_tokens, num_heads, head_dim] (token row stride `stride`) in place, HF's
// rotate_half layout: pairs (i, i + head_dim/2) turn by positions[t] * inv_freq[i].
void rope(float* x, int64_t stride, int64_t num_tokens, int32_t num_heads, int32_t head_dim,
          const int32_t* positions, const float* inv_freq);
// out[t, i] = silu(gate_up[t, i]) * gate_up[t, inter + i]
void silu_mul(const float* gate_up, int64_t num_tokens, int64_t inter, float* out);
// y[t, :cols] += bias (row stride `stride`)
void add_bias(float* y, int64_t stride, int64_t num_tokens, int64_t cols, const float* bias);
// y[i] += x[i]
void add(float* y, const float* x, int64_t n);
// Copies the chunk's K and V rows ([num_tokens, kv_width] with row stride `stride`) to their
// cache slots (layout of PagedAttentionParams::k_cache).
void paged_kv_write(const float* k, const float* v, int64_t stride, const PagedAttentionParams& p,
                    float* k_cache, float* v_cache);
void paged_attention(const PagedAttentionParams& p);
void lora_gemm(const LoraGemmParams& p);
// y[M, N] (+)= x[M, K] @ w[N, K]^T
void linear(const float* x, int64_t x_stride, const float* w, int64_t m, int64_t n, int64_t k,
            float beta, float* y, int64_t y_stride);
// precision="bfloat16": y[M, N] (+)= bf16(x)[M, K] @ bf16(w)[N, K]^T, float32 accumulation in
// a fixed order per element (bf16_gemm.h). w is [N, K] contiguous in `w_dtype` (float32, float16
// or bfloat16; bfloat16 is read in place, the others rounded as they are read). beta == 0 never
// reads y. Activations are rounded into a per-calling-thread buffer that grows and is kept.
void linear_bf16(const float* x, int64_t x_stride, const void* w, DType w_dtype, int64_t m,
                 int64_t n, int64_t k, float beta, float* y, int64_t y_stride);
// Picks a token from logits [vocab] (greedy, or temperature / top-k / top-p sampling drawing
// from the caller's RNG state, advanced once per sampled token). `log_prob` receives log p(token)
// under the unmodified distribution (temperature 1). `scratch` holds vocab (index, value) pairs.
int32_t sample_token(const float* logits, int64_t vocab, const SamplingParams& params,
                     uint64_t* rng_state, float* log_prob, std::pair<float, int32_t>* scratch);
void set_num_threads(int threads);
int num_threads();

}  // namespace lorart::cpu

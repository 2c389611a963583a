// The op entry points the model calls: one per op, each checks its arguments (names and expected
// values in the message) and dispatches on the device of its tensors. Tensors are float32 unless
// stated; shapes in comments. No op allocates: scratch comes from the caller's workspace.
#pragma once

#include "core/tensor.h"
#include "kernels/params.h"

namespace lorart::ops {

// out [T, H] = table [V, H] rows of ids [T] (int32, each in [0, V)).
void embedding(const Tensor& table, const Tensor& ids, const Tensor& out);
// out [T, H] = RMSNorm(x [T, H]) * weight [H]; out may alias x.
void rms_norm(const Tensor& x, const Tensor& weight, float eps, const Tensor& out);
// In-place rotary embedding of x [T, heads * head_dim] (row stride may exceed the width, e.g. a
// view into the fused qkv output) at positions [T] (int32) with inv_freq [head_dim / 2].
void rope(const Tensor& x, int32_t head_dim, const Tensor& positions, const Tensor& inv_freq);
// y [M, N] = x [M, K] @ w [N, K]^T + beta * y.
void linear(const Tensor& x, const Tensor& w, const Tensor& y, float beta = 0.0f);
// y [M, N] += bias [N].
void add_bias(const Tensor& y, const Tensor& bias);
// y += x (same shape, contiguous).
void add(const Tensor& y, const Tensor& x);
// out [T, I] = silu(gate_up[:, :I]) * gate_up[:, I:], gate_up [T, 2I].
void silu_mul(const Tensor& gate_up, const Tensor& out);
// Writes the chunk's k, v ([T, kv_heads * head_dim] views) into the layer's caches, then attends.
void paged_attention(const Tensor& k, const Tensor& v, const PagedAttentionParams& params,
                     float* k_cache, float* v_cache, Device device);
// Grouped LoRA GEMM over adapter segments (see LoraGemmParams).
void lora_gemm(const LoraGemmParams& params, Device device);

}  // namespace lorart::ops

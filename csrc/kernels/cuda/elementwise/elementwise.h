// CUDA launchers of the elementwise and row ops (embedding, norms, RoPE, SwiGLU, bias and residual
// adds, row gathers, weight rows) and of DoRA's two kernels: the twins of
// kernels/cpu/elementwise.cc and kernels/cpu/dora.cc, which stay the reference the GPU tests
// compare with. Plain C++ (no CUDA headers): only kernels/ops.cc calls these, with parameter
// structs it has checked, pointers in device memory of the current device and `stream` a
// cudaStream_t (null: the default stream). Launches are asynchronous; a refused launch throws
// DeviceError. Nothing allocates.
//
// Arithmetic: float32 with the CPU's operation order and rounding (no contraction into FMA where
// the CPU rounds twice), so embedding, add, add_bias, gather_rows, read_weight_row, silu_mul's
// products and lora_dora_apply give the CPU's bits; the reductions (RMSNorm's and DoRA's float64
// sums of squares) add in a fixed tree order per row that depends only on the row width, and
// RoPE's cos/sin and silu's exp come from CUDA's math library, which may differ from the host's by
// an ulp or two. Every reduction is per row: no output depends on the number of tokens.
#pragma once

#include <cstdint>

#include "kernels/params.h"

namespace lorart::cuda {

void embedding(const EmbeddingParams& p, void* stream);
// out may alias x.
void rms_norm(const RmsNormParams& p, void* stream);
void add_rms_norm(const AddRmsNormParams& p, void* stream);
// x [num_tokens, num_heads * head_dim] (row stride `stride`) rotated in place; head_dim <= 1024.
void rope(float* x, int64_t stride, int64_t num_tokens, int32_t num_heads, int32_t head_dim,
          const int32_t* positions, const float* inv_freq, void* stream);
void silu_mul(const float* gate_up, int64_t num_tokens, int64_t inter, float* out, void* stream);
void add_bias(const BiasParams& p, void* stream);
void add(float* y, const float* x, int64_t n, void* stream);
void gather_rows(const float* x, int64_t width, const int32_t* rows, int64_t num_rows, float* out,
                 void* stream);
// Row-major w only (WeightLayout::kK32Interleaved is a CPU layout).
void read_weight_row(const WeightRef& w, int64_t row, int64_t cols, float* out, void* stream);
// One block per output row; p.threads is ignored.
void dora_scales(const DoraScalesParams& p, void* stream);
// p.runs and p.pairs are device arrays (LoraBatch::device_runs / device_pairs); one block per
// token of the `num_tokens` rows of y, a token outside every run (or whose pair has no
// dora_scale) left as it is.
void dora_apply(const DoraApplyParams& p, int64_t num_tokens, void* stream);

}  // namespace lorart::cuda

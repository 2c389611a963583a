// The op entry points: the backend seam. The model calls only these. Each op takes Tensor views
// (data, dtype, device, shape) and the ExecContext it runs in, checks dtypes, shapes and devices
// with messages naming the argument, builds its kernel's parameter struct (kernels/params.h)
// and dispatches on the device (and the dtypes) to an implementation: csrc/kernels/cpu/ today;
// a CUDA kernel goes beside it (csrc/kernels/cuda/) and is added to the dispatch here once it
// is checked against the CPU one. No op allocates per call: scratch comes from the caller (a few
// CPU kernels keep a per-thread buffer that grows to the largest call and stays).
//
// Activations are float32. Weights (`w`, `table`, `weight`, `bias`) may be float32, float16 or
// bfloat16: kernels widen them exactly to float32 as they read, so the result is bitwise that of
// the same call on a float32 copy of the weights (under Precision::kFloat32).
#pragma once

#include <utility>

#include "core/tensor.h"
#include "kernels/exec_context.h"
#include "kernels/params.h"

namespace lorart::ops {

// out [T, H] = table [V, H] rows of ids [T] (int32, each in [0, V)).
void embedding(const ExecContext& ctx, const Tensor& table, const Tensor& ids, const Tensor& out);
// out [T, H] = RMSNorm(x [T, H]) * weight [H]; out may alias x.
void rms_norm(const ExecContext& ctx, const Tensor& x, const Tensor& weight, float eps,
              const Tensor& out);
// In-place rotary embedding of x [T, heads * head_dim] (row stride may exceed the width, e.g. a
// view into the fused qkv output) at positions [T] (int32) with inv_freq [head_dim / 2].
void rope(const ExecContext& ctx, const Tensor& x, int32_t head_dim, const Tensor& positions,
          const Tensor& inv_freq);
// y [M, N] = x [M, K] @ w [N, K]^T + beta * y, at ctx.precision. `w_scales` ([N] float32
// per-output-channel scales) is for quantized weights and must be undefined for float ones.
// `w_layout` is how w's rows hold their values (relayout_weight); the result does not depend on
// it under Precision::kFloat32.
void linear(const ExecContext& ctx, const Tensor& x, const Tensor& w, const Tensor& y,
            float beta = 0.0f, const Tensor& w_scales = Tensor(),
            WeightLayout w_layout = WeightLayout::kRowMajor);
// The layout the device's linear kernels read a weight matrix of `dtype` fastest in: on the CPU
// kK32Interleaved for bfloat16 (decode reads each weight once per step, and the interleaved
// rows widen with a shift and a mask instead of a shuffle), kRowMajor otherwise.
WeightLayout preferred_layout(const ExecContext& ctx, DType dtype);
// Converts the row-major matrix w [N, K] (unit column stride) in place to `layout`; kRowMajor
// leaves it as it is. kK32Interleaved takes bfloat16 only. Call it once per matrix: a matrix
// already in the layout is not recognised, and a second call would interleave it again.
void relayout_weight(const ExecContext& ctx, const Tensor& w, WeightLayout layout);
// y [M, N] += bias [N].
void add_bias(const ExecContext& ctx, const Tensor& y, const Tensor& bias);
// y += x (same shape, contiguous).
void add(const ExecContext& ctx, const Tensor& y, const Tensor& x);
// out [T, I] = silu(gate_up[:, :I]) * gate_up[:, I:], gate_up [T, 2I].
void silu_mul(const ExecContext& ctx, const Tensor& gate_up, const Tensor& out);
// out [N, W] = x [T, W] rows `rows` [N] (int32, each in [0, T)).
void gather_rows(const ExecContext& ctx, const Tensor& x, const Tensor& rows, const Tensor& out);

// The batch layout attention reads (the step's flat arrays, see model/forward_batch.h).
struct AttentionBatch {
  Tensor seq_starts;    // [S + 1] int32
  Tensor context_lens;  // [S] int32
  Tensor block_tables;  // [S, max_blocks] int32
  // Host-known bounds of the step, for a device launch that cannot read the arrays above (they
  // are device memory there): the longest query chunk and the longest context plus chunk of any
  // sequence. 0 = unknown (the CPU reads the arrays).
  int32_t max_query_len = 0;
  int32_t max_kv_len = 0;
  // CUDA: device scratch of at least paged_attention_workspace_bytes bytes (any dtype,
  // contiguous) for the split-KV partials of decode sequences. Unused on the CPU (may be empty).
  Tensor workspace;
};
struct AttentionShape {
  int32_t num_heads, num_kv_heads, head_dim, sliding_window;
  float scale;
};
// Writes the chunk's k, v ([T, kv_heads * head_dim] views with one row stride) into the layer's
// caches k_cache, v_cache ([blocks, block_size, kv_heads, head_dim], float32, float16 or bfloat16;
// 16-bit caches are written rounded to nearest even and widened to float32 as read), then out
// [T, heads * head_dim] = causal attention of q ([T, heads * head_dim] view) over the cache.
// On the CPU the batch's arrays are checked (block ids, lengths); device arrays cannot be read, so
// on CUDA the caller validates them on the host first, and max_query_len / max_kv_len must be set
// (> 0) and be true bounds.
void paged_attention(const ExecContext& ctx, const Tensor& q, const Tensor& k, const Tensor& v,
                     const Tensor& k_cache, const Tensor& v_cache, const AttentionBatch& batch,
                     const AttentionShape& shape, const Tensor& out);
// Bytes of AttentionBatch::workspace for steps of at most `max_seqs` sequences whose context plus
// chunk is at most `max_kv_len` tokens: 0 on the CPU. Throws InvalidArgument on overflow.
size_t paged_attention_workspace_bytes(const ExecContext& ctx, int64_t max_seqs, int64_t max_kv_len,
                                       const AttentionShape& shape);

// The adapters of one step as the LoRA op reads them: `pairs` holds, for each adapter slot,
// `pairs_per_slot` entries indexed by (layer * lora_module::kCount + module).
struct LoraBatch {
  const LoraRun* runs = nullptr;  // token runs sharing one slot, in token order (host memory)
  int32_t num_runs = 0;
  const LoraPair* pairs = nullptr;  // host memory; on CUDA its a / b_t / dora_scale are device
  int32_t num_slots = 0;
  int64_t pairs_per_slot = 0;
  // CUDA: the same two arrays in device memory, uploaded once per step by the model. Kernels read
  // these; the op checks and plans from the host arrays above. Null on the CPU.
  const LoraRun* device_runs = nullptr;
  const LoraPair* device_pairs = nullptr;
};
// y[:, :out] += x @ A^T @ B^T per run, with each run's slot's pair at `pair_index` (layer *
// kCount + module); x [T, in] and y [T, >= out] are row views, scratch holds T * max rank floats.
void lora_gemm(const ExecContext& ctx, const Tensor& x, const Tensor& y, int64_t out,
               const LoraBatch& lora, int64_t pair_index, const Tensor& scratch);

// DoRA's per-row scales: scales [out] float32 = magnitude [out] / ||w[row_offset + o, :] +
// b [out, r] @ a [r, K]|| (w [N, K] in `w_layout`; W + B A in float32, norms accumulated in
// float64); +inf where a norm is 0.
void dora_scales(const ExecContext& ctx, const Tensor& w, WeightLayout w_layout, int64_t row_offset,
                 const Tensor& a, const Tensor& b, const Tensor& magnitude, const Tensor& scales);
// DoRA's output after lora_gemm added the delta: for each run whose slot's pair at `pair_index`
// has dora_scale, y[t, o] = scale[o] * (y[t, o] - bias[o]) + bias[o] for o < out (`bias` [out],
// or undefined for none). y [T, >= out] is a row view.
void lora_dora_apply(const ExecContext& ctx, const Tensor& y, int64_t out, const Tensor& bias,
                     const LoraBatch& lora, int64_t pair_index);
// Row `row` of w [N, K] (in `w_layout`) as float32 [K] in column order.
void read_weight_row(const ExecContext& ctx, const Tensor& w, WeightLayout w_layout, int64_t row,
                     const Tensor& out);

// What a CUDA sample reads besides its tensors: device copies of the step's `params` and
// `rng_states` (uploaded by the caller with the step; the RNG states are advanced there, and the
// caller copies them back with the tokens) and device scratch of sample_workspace_bytes bytes.
// A CPU sample ignores it.
struct SampleDeviceArgs {
  const SamplingParams* params = nullptr;  // [R], the same values as the host `params`
  uint64_t* rng_states = nullptr;          // [R], in/out
  void* workspace = nullptr;
  int64_t workspace_bytes = 0;
};

// tokens[i] (int32 [R]) = a token drawn from logits [N, V] row rows[i] (int32 [R]) with
// params[i] and rng_states[i] (advanced); log_probs (float32 [R], or undefined) receives log
// p(token). -inf masks a token; a row holding NaN or +inf gets token -1 and leaves its RNG state
// as it was. `scratch` holds V (float, int32) pairs on the host (CPU only). `params` is host
// memory on every device (it is validated here); on a CUDA context the kernel reads
// `device.params` and advances `device.rng_states`, and the host `rng_states` is not touched
// (may be null). Both backends draw alike: identical logits give identical tokens and states.
void sample(const ExecContext& ctx, const Tensor& logits, const Tensor& rows,
            const SamplingParams* params, uint64_t* rng_states, const Tensor& tokens,
            const Tensor& log_probs, std::pair<float, int32_t>* scratch,
            const SampleDeviceArgs& device = {});
// Device bytes SampleDeviceArgs::workspace needs for `num_samples` rows of `vocab` logits on
// ctx's device (0 on the CPU, whose scratch is the host pairs).
int64_t sample_workspace_bytes(const ExecContext& ctx, int64_t num_samples, int64_t vocab);

// The CPU backend's thread pool: OpenMP threads of the calling thread's ops.
void set_cpu_threads(int threads);
int cpu_threads();

}  // namespace lorart::ops

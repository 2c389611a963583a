// Parameter structs of the kernels. The ops (kernels/ops.cc) build them from checked Tensors; a
// kernel reads nothing else. Each field is commented with its layout; pointers are memory of the
// op's device. Weights carry their storage dtype (float32, float16 or bfloat16; the kernels widen
// to float32 as they read) and a place for per-output-channel scales, so quantized weights can
// follow without another change of interface.
#pragma once

#include <cstdint>

#include "core/dtype.h"

namespace lorart {

// How a weight matrix's values are ordered within a row (rows are always `stride` apart).
enum class WeightLayout : int8_t {
  kRowMajor,
  // bfloat16 only, the CPU layout of the model's matrices (ops::relayout_weight): each full block
  // of 32 values of a row (columns 32 b .. 32 b + 31) is stored as 16 pairs, position 32 b + 2 j
  // holding column 32 b + j and position 32 b + 2 j + 1 column 32 b + 16 + j; the K % 32 columns
  // after the last full block stay in order. One 64-byte load then widens to the block's two
  // float32 vectors in column order with a shift and a mask (no shuffle), and the values'
  // arithmetic is unchanged: kernels give bitwise the results of the row-major matrix.
  kK32Interleaved,
};

// A weight matrix [rows, cols] (row stride `stride` elements) in its storage dtype and layout.
struct WeightRef {
  const void* data = nullptr;
  DType dtype = DType::kFloat32;
  const float* scales = nullptr;  // [rows] per-output-channel scales of a quantized dtype; null
  int64_t stride = 0;
  WeightLayout layout = WeightLayout::kRowMajor;
};

// y[M, N] = x[M, K] @ w[N, K]^T + beta * y (beta == 0 never reads y).
struct LinearParams {
  const float* x;  // [m, k], row stride x_stride
  int64_t x_stride;
  WeightRef w;  // [n, k]
  float* y;     // [m, n], row stride y_stride
  int64_t y_stride;
  int64_t m, n, k;
  float beta;
  Precision precision;
};

// out[t, :] = widen(table[ids[t], :]).
struct EmbeddingParams {
  WeightRef table;     // [vocab, hidden]
  const int32_t* ids;  // [num_tokens], each in [0, vocab)
  float* out;          // [num_tokens, hidden], contiguous
  int64_t num_tokens, hidden;
};

// out[t] = weight * (x[t] / sqrt(mean(x[t]^2) + eps)); out may alias x.
struct RmsNormParams {
  const float* x;  // [num_tokens, hidden], row stride x_stride
  int64_t x_stride;
  WeightRef weight;  // [hidden]
  float* out;        // [num_tokens, hidden], row stride out_stride
  int64_t out_stride;
  int64_t num_tokens, hidden;
  float eps;
};

// residual[t] += x[t]; out[t] = weight * (residual[t] / sqrt(mean(residual[t]^2) + eps)): the
// residual add and the next norm in one pass, bitwise the two ops one after the other. out must
// not overlap residual or x.
struct AddRmsNormParams {
  float* residual;  // [num_tokens, hidden], row stride residual_stride, in/out
  int64_t residual_stride;
  const float* x;  // [num_tokens, hidden], row stride x_stride
  int64_t x_stride;
  WeightRef weight;  // [hidden]
  float* out;        // [num_tokens, hidden], row stride out_stride
  int64_t out_stride;
  int64_t num_tokens, hidden;
  float eps;
};

// y[t, :cols] += widen(bias).
struct BiasParams {
  float* y;  // [num_tokens, >= cols], row stride y_stride
  int64_t y_stride;
  WeightRef bias;  // [cols]
  int64_t num_tokens, cols;
};

// Causal attention over a paged KV cache for a packed batch of sequence chunks. First the
// chunk's own K/V rows are written to their cache slots, then every query token t of sequence s,
// at absolute position context_lens[s] + (t - seq_starts[s]), attends to positions
// (pos - sliding_window, pos] (all of [0, pos] when sliding_window == 0).
struct PagedAttentionParams {
  const float* q;  // [num_tokens, num_heads, head_dim], row stride q_stride
  int64_t q_stride;
  const float* k;  // [num_tokens, num_kv_heads * head_dim] new keys, row stride kv_stride
  const float* v;  // same layout as k
  int64_t kv_stride;
  float* out;  // [num_tokens, num_heads, head_dim], contiguous
  // [num_blocks, block_size, num_kv_heads, head_dim] (this layer) in cache_dtype: float32, or
  // float16 / bfloat16 (written rounded to nearest even, widened to float32 as read).
  void* k_cache;
  void* v_cache;  // same layout and dtype as k_cache
  DType cache_dtype;
  const int32_t* seq_starts;    // [num_seqs + 1] token offsets into the packed batch
  const int32_t* context_lens;  // [num_seqs] tokens already cached before this chunk
  const int32_t* block_tables;  // [num_seqs, max_blocks_per_seq] block ids
  int32_t num_seqs;
  int32_t max_blocks_per_seq;
  int32_t block_size;
  int32_t num_heads;
  int32_t num_kv_heads;  // num_heads % num_kv_heads == 0 (GQA / MQA)
  int32_t head_dim;
  int32_t sliding_window;  // 0 = full causal attention
  float scale;             // usually 1 / sqrt(head_dim)
  // CUDA only (the CPU ignores them): host-known bounds of the step (AttentionBatch) that size the
  // grids, and the split-KV scratch (paged_attention_workspace_bytes), device memory.
  int32_t num_tokens;  // q's rows (= seq_starts[num_seqs])
  int32_t max_query_len;
  int32_t max_kv_len;
  void* workspace;
  int64_t workspace_bytes;
};

// One adapter's pair for one (layer, module), in the adapter's storage dtype (float32, float16 or
// bfloat16; kernels widen to float32 as they read): A [rank, in] and B transposed, [rank, out],
// both row-major, scaling already folded into B. B is kept transposed so that the expand step
// streams rank rows of `out` contiguous values.
struct LoraPair {
  const void* a = nullptr;
  const void* b_t = nullptr;
  DType dtype = DType::kFloat32;
  int32_t rank = 0;  // 0: this adapter does not adapt the module
  // DoRA: [out] float32 magnitude / ||W + B A|| per output row, applied after the pair's delta
  // (lora_dora_scale); null for a plain LoRA pair.
  const float* dora_scale = nullptr;
};

// A run of consecutive tokens of the packed batch that share one adapter slot.
struct LoraRun {
  int32_t begin;  // inclusive token index
  int32_t end;    // exclusive token index
  int32_t slot;   // >= 0
};

// y[:, out_offset : out_offset + out] += (x @ A^T) @ B^T for each run's tokens, with the pair of
// the run's slot for this (layer, module): pairs[run.slot * slot_stride].
struct LoraGemmParams {
  const float* x;  // [num_tokens, in], row stride x_stride
  int64_t x_stride;
  float* y;  // [num_tokens, >= out], row stride y_stride (already offset to the module's columns)
  int64_t y_stride;
  int64_t in;
  int64_t out;
  const LoraRun* runs;  // [num_runs]
  int32_t num_runs;
  const LoraPair* pairs;  // this (layer, module)'s pair of slot 0
  int64_t slot_stride;    // LoraPair entries between one slot's pair and the next's
  float* scratch;         // >= sum over runs of (end - begin) * rank floats
};

// One module of a fused LoRA launch (the q / k / v slices of the fused qkv matrix, the gate / up
// halves of gate_up): its pair in the LoRA table and the columns of y it adds to.
struct LoraSlice {
  int64_t pair_index;  // layer * lora_module::kCount + module
  int64_t out_offset;  // first column of y
  int64_t out;         // columns
};
constexpr int32_t kMaxLoraSlices = 4;  // fused qkv + q + k + v

// ops::lora_gemm_slices on CUDA: for each slice in order, y[:, off : off + out] += (x @ A^T) @ B^T
// for each run's tokens with the run's slot's pair. `runs` and `pairs` are device memory (their
// A / B^T too); the op planned `rank_stride` and validated the runs from the host copies.
struct CudaLoraParams {
  const float* x;  // [num_tokens, in], row stride x_stride (device)
  int64_t x_stride;
  float* y;  // [num_tokens, >= every slice's out_offset + out], row stride y_stride (device)
  int64_t y_stride;
  int64_t in;
  int32_t num_tokens;
  const LoraRun* runs;  // [num_runs], in token order, device memory
  int32_t num_runs;
  const LoraPair* pairs;  // the table: slot s's pair of slice i at pairs[s * slot_stride + index]
  int64_t slot_stride;
  LoraSlice slices[kMaxLoraSlices];
  int32_t num_slices;
  int32_t rank_stride;     // >= every used pair's rank: the scratch's rank axis
  int32_t scratch_tokens;  // >= every run's end: the scratch's token axis
  float* scratch;          // lora_scratch_floats floats (device)
};

// DoRA's per-row scale: scales[o] = magnitude[o] / ||w[row_offset + o, :] + b[o, :] @ a|| for o in
// [0, out), W + B A formed in float32 as PEFT does for a float32 model, its squared norm
// accumulated in float64 (the scaling is already in b). A zero norm gives +inf (the caller reports
// it).
struct DoraScalesParams {
  WeightRef w;  // [>= row_offset + out, k], in its layout
  int64_t row_offset;
  WeightRef a;          // [rank, k]
  WeightRef b;          // [out, rank]
  WeightRef magnitude;  // [out]
  float* scales;        // [out] out
  int64_t out, k, rank;
  int threads;  // OpenMP threads (0: the calling thread's default)
};

// DoRA's output for each run whose slot's pair has dora_scale: y[t, o] = scale[o] * (y[t, o] -
// bias[o]) + bias[o] (y holds W x + bias + B A x; bias null = 0), for o in [0, out).
struct DoraApplyParams {
  float* y;  // [num_tokens, >= out], row stride y_stride (already offset to the module's columns)
  int64_t y_stride;
  int64_t out;
  WeightRef bias;  // [out] (data null: no bias)
  const LoraRun* runs;
  int32_t num_runs;
  const LoraPair* pairs;  // this (layer, module)'s pair of slot 0
  int64_t slot_stride;
};

// How one request picks its next token from a row of logits.
struct SamplingParams {
  int32_t top_k;      // 0 = whole vocabulary; 1 = greedy
  float top_p;        // keep the smallest set of top tokens whose probability reaches top_p
  float temperature;  // 0 = greedy
  int64_t vocab = 0;  // the row's vocabulary: its first `vocab` logits (0 = the whole row)
};

// Picks tokens[i] from logits row rows[i] with params[i], drawing from rng_states[i] (advanced
// once per sampled token). log_probs[i] (when non-null) receives log p(token) under the
// unmodified distribution (temperature 1). -inf logits mask their tokens; a row holding NaN or
// +inf is not sampled: token -1, its RNG state untouched.
struct SampleParams {
  const float* logits;  // [num_logits_rows, vocab], contiguous
  int64_t vocab;
  const int32_t* rows;           // [num_samples]
  const SamplingParams* params;  // [num_samples]
  uint64_t* rng_states;          // [num_samples], in/out
  int32_t* tokens;               // [num_samples] out
  float* log_probs;              // [num_samples] out, or null
  int32_t num_samples;
  // CUDA only: device scratch of ops::sample_workspace_bytes bytes (the CPU uses its host pairs).
  void* workspace = nullptr;
  int64_t workspace_bytes = 0;
};

}  // namespace lorart

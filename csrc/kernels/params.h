// Parameter structs of the kernels that take more than a few tensors. One struct per kernel, each
// field commented with its layout; pointers are device pointers of the op's device.
#pragma once

#include <cstdint>

#include "core/dtype.h"

namespace lorart {

// Causal attention over a paged KV cache for a packed batch of sequence chunks. The chunk's own
// K/V must already be in the cache (paged_kv_write). Query token t of sequence s sits at absolute
// position context_lens[s] + (t - seq_starts[s]) and attends to positions
// (pos - sliding_window, pos] (all of [0, pos] when sliding_window == 0).
struct PagedAttentionParams {
  const float* q;               // [num_tokens, num_heads, head_dim], row stride q_stride
  int64_t q_stride;             // elements between consecutive tokens of q
  float* out;                   // [num_tokens, num_heads, head_dim], contiguous
  const float* k_cache;         // [num_blocks, block_size, num_kv_heads, head_dim] (this layer)
  const float* v_cache;         // same layout as k_cache
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
};

// A run of consecutive tokens of the packed batch that share one adapter.
struct LoraSegment {
  int32_t begin;  // inclusive token index
  int32_t end;    // exclusive token index
  LoraPair pair;
};

// y[:, out_offset : out_offset + out] += (x @ A^T) @ B^T for each segment's tokens.
struct LoraGemmParams {
  const float* x;  // [num_tokens, in], row stride x_stride
  int64_t x_stride;
  float* y;  // [num_tokens, >= out_offset + out], row stride y_stride
  int64_t y_stride;
  int64_t in;
  int64_t out;
  const LoraSegment* segments;  // [num_segments]
  int32_t num_segments;
  float* scratch;  // >= sum over segments of (end - begin) * rank floats (one block each)
};

// How one request picks its next token from a row of logits.
struct SamplingParams {
  int32_t top_k;      // 0 = whole vocabulary; 1 = greedy
  float top_p;        // keep the smallest set of top tokens whose probability reaches top_p
  float temperature;  // 0 = greedy
};

}  // namespace lorart

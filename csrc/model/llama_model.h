// LlamaModel: the forward pass of the Llama family (Llama 2/3.x, Mistral, Qwen2) over a packed
// batch with a paged KV cache and per-sequence LoRA adapters. Owns the weights and a workspace
// sized at construction (no allocation per step). Not thread-safe: one forward at a time (the
// executor's loop thread, or one Python caller).
#pragma once

#include <vector>

#include "core/buffer.h"
#include "kernels/params.h"
#include "model/forward_batch.h"
#include "model/kv_cache.h"
#include "model/lora_adapter.h"
#include "model/model_config.h"
#include "model/model_weights.h"

namespace lorart {

class LlamaModel {
 public:
  // `max_num_tokens`: the most tokens one forward may carry; `max_lora_rank`: the largest adapter
  // rank the LoRA workspace is sized for. Throws InvalidArgument (see workspace_bytes) before
  // allocating the workspace.
  LlamaModel(const ModelConfig& config, ModelWeights weights, int64_t max_num_tokens,
             int64_t max_lora_rank);

  // Bytes of the workspace a model of `config` allocates for these limits; allocates nothing.
  // Throws InvalidArgument naming the field: an invalid config, max_num_tokens or max_lora_rank
  // outside [1, INT32_MAX], a size that overflows int64 (the workspace, or the [max_num_tokens,
  // vocab_size] float32 logits callers allocate), or a workspace over the host's memory limit.
  static size_t workspace_bytes(const ModelConfig& config, int64_t max_num_tokens,
                                int64_t max_lora_rank);

  // Throws InvalidArgument naming the field and the limit for a batch forward() would refuse:
  // index tensors of the wrong kind or shape, token ids outside the vocabulary, seq_starts not
  // strictly increasing from 0 to the token count, negative context_lens, positions past
  // max_position_embeddings or the row's blocks, block ids outside [0, num_blocks), lora slots
  // naming no adapter (or one of another model, or above max_lora_rank), logits_indices out of
  // range, a KV cache of another shape. Reads only host memory; writes nothing.
  void validate(const ForwardBatch& batch, const KvCache& cache,
                const std::vector<const LoraAdapter*>& adapters) const;

  // Runs the batch, writing K/V of its tokens into `cache` and logits [N, vocab] (float32) into
  // `logits`. `adapters[slot]` is the adapter of lora slot `slot` (null entries are not allowed
  // where a sequence uses them). Throws InvalidArgument naming the field for a malformed batch
  // (validate, plus the logits' shape); on error nothing has been written to the cache.
  void forward(const ForwardBatch& batch, KvCache& cache,
               const std::vector<const LoraAdapter*>& adapters, const Tensor& logits);

  const ModelConfig& config() const { return config_; }
  int64_t max_num_tokens() const { return max_num_tokens_; }
  int64_t max_lora_rank() const { return max_lora_rank_; }
  size_t weight_bytes() const { return weights_.nbytes(); }

 private:
  // Fills segments_ for one (layer, module) from the batch's adapter runs; returns the count.
  int32_t lora_segments(int64_t layer, int32_t module_id);
  void apply_lora(int64_t layer, int32_t module_id, const Tensor& x, const Tensor& y,
                  int64_t out_offset);
  void attention_block(int64_t layer, int64_t num_tokens, const ForwardBatch& batch,
                       KvCache& cache);
  void mlp_block(int64_t layer, int64_t num_tokens);

  ModelConfig config_;
  ModelWeights weights_;
  int64_t max_num_tokens_, max_lora_rank_;
  Buffer inv_freq_;  // [head_dim / 2] rotary frequencies after scaling
  // Workspace, each sized for max_num_tokens rows.
  Buffer hidden_, normed_, qkv_, attn_, proj_, gate_up_, act_, positions_, lora_scratch_;
  // Per-step adapter runs: tokens [begin, end) use adapter `slot` (>= 0).
  struct Run {
    int32_t begin, end;
    const LoraAdapter* adapter;
  };
  std::vector<Run> runs_;
  std::vector<LoraSegment> segments_;
};

// Rotary inverse frequencies [head_dim / 2] as transformers computes them in float32, with the
// config's scaling (default, linear, llama3) applied.
std::vector<float> rope_inv_freq(const ModelConfig& config);

}  // namespace lorart

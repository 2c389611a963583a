// LlamaModel: the forward pass of the Llama family (Llama 2/3.x, Mistral, Qwen2) over a packed
// batch with a paged KV cache and per-sequence LoRA adapters, written once against the ops
// (kernels/ops.h): the device, the weights' dtype and the matmul precision are the ops' business
// (the ExecContext and the weight Tensors), never the model's. Owns the weights and a workspace
// sized at construction (no allocation per step), both on the weights' device. On CUDA the step's
// flat arrays and the LoRA table's runs and pairs are validated on the host, then uploaded in one
// copy to a device staging buffer the ops read. Not thread-safe: one forward at a time (its
// ModelRunner, or one Python caller).
#pragma once

#include <algorithm>
#include <vector>

#include "core/buffer.h"
#include "kernels/exec_context.h"
#include "kernels/params.h"
#include "model/forward_batch.h"
#include "model/kv_cache.h"
#include "model/lora_table.h"
#include "model/model_config.h"
#include "model/model_weights.h"

namespace lorart {

class LlamaModel {
 public:
  // `max_num_tokens`: the most tokens one forward may carry; `max_lora_rank`: the largest adapter
  // rank the LoRA workspace is sized for. The model runs on the weights' device (its workspace
  // is allocated there). Throws InvalidArgument (see workspace_bytes) before allocating the
  // workspace.
  LlamaModel(const ModelConfig& config, ModelWeights weights, int64_t max_num_tokens,
             int64_t max_lora_rank);

  // Bytes of the workspace a model of `config` allocates for these limits; allocates nothing.
  // Throws InvalidArgument naming the field: an invalid config, max_num_tokens or max_lora_rank
  // outside [1, INT32_MAX], a size that overflows int64 (the workspace, or the [max_num_tokens,
  // vocab_size] float32 logits callers allocate), or a workspace over the memory of `device`.
  static size_t workspace_bytes(const ModelConfig& config, int64_t max_num_tokens,
                                int64_t max_lora_rank, Device device = Device::cpu());

  // Throws InvalidArgument naming the field and the limit for a batch forward() would refuse:
  // index tensors of the wrong kind or shape, token ids outside the vocabulary, seq_starts not
  // strictly increasing from 0 to the token count, negative context_lens, positions other than
  // context_lens[s] + offset or past max_position_embeddings or the row's blocks, block ids
  // outside [0, num_blocks), lora slots outside the table, a table of another model or above
  // max_lora_rank, logits_indices out of range, a KV cache of another shape. Reads only host
  // memory; writes nothing.
  void validate(const ForwardBatch& batch, const KvCache& cache, const LoraTable& lora) const;

  // Runs the batch in `ctx` (its device must be the model's), writing K/V of its tokens into
  // `cache` and logits [N, logits_width(lora)] (float32, on the model's device) into `logits`;
  // `batch` is host memory (on CUDA it is uploaded on ctx.stream, and the LoRA table's pairs
  // must point at device copies of the adapters); sequence s uses slot
  // lora_slots[s] of `lora`: its adapter's embedding table, lm_head and vocabulary when the
  // adapter brings them. Row i holds its sequence's vocabulary (lora.vocab_size(slot)) and -inf
  // in the columns past it. Throws InvalidArgument naming the field for a malformed batch
  // (validate, plus the logits' shape); on error nothing has been written to the cache.
  void forward(const ExecContext& ctx, const ForwardBatch& batch, KvCache& cache,
               const LoraTable& lora, const Tensor& logits);
  // Columns of the logits of a step with `lora`: the widest vocabulary, base or adapter.
  int64_t logits_width(const LoraTable& lora) const {
    return std::max(config_.vocab_size, lora.max_vocab_size());
  }

  const ModelConfig& config() const { return config_; }
  int64_t max_num_tokens() const { return max_num_tokens_; }
  int64_t max_lora_rank() const { return max_lora_rank_; }
  size_t weight_bytes() const { return weights_.nbytes(); }
  // The base weights (DoRA's scales are computed against them).
  const ModelWeights& weights() const { return weights_; }
  DType weight_dtype() const { return weights_.dtype(); }
  Device device() const { return weights_.device(); }

 private:
  // The state of the forward in progress.
  struct Pass {
    const ExecContext& ctx;
    const ForwardBatch& batch;  // the arrays the ops read: `host`, or its device copy on CUDA
    KvCache& cache;
    ops::LoraBatch lora;
    int64_t num_tokens;
    bool dora;                          // a slot has DoRA pairs
    const ForwardBatch& host;           // what the host plans from (validated)
    int32_t max_query_len, max_kv_len;  // the step's bounds (ops::AttentionBatch)
  };
  // A workspace Buffer of `count` values on the model's device.
  Buffer workspace(int64_t count, const char* what, DType dtype = DType::kFloat32) const;
  // The arrays the ops read for `host`: `host` itself on the CPU; on CUDA its device copy, made
  // with `lora`'s runs and pairs in one upload on ctx.stream (device_runs / device_pairs set).
  const ForwardBatch& stage(const ExecContext& ctx, const ForwardBatch& host, ops::LoraBatch& lora);
  // y[:, out_offset : + out] += the module's LoRA delta (DoRA-scaled for DoRA pairs; `bias` is
  // the matrix's whole bias vector or undefined).
  void apply_lora(const Pass& pass, int64_t layer, int32_t module_id, const Tensor& x,
                  const Tensor& y, int64_t out_offset, const Tensor& bias = Tensor());
  // The embedding-side paths of a step whose table has adapters with their own parts.
  void embed_per_slot(const Pass& pass, const LoraTable& lora, const Tensor& hidden);
  void lm_head_per_slot(const Pass& pass, const LoraTable& lora, const Tensor& picked,
                        const Tensor& logits);
  void attention_block(const Pass& pass, int64_t layer);
  void mlp_block(const Pass& pass, int64_t layer);

  ModelConfig config_;
  ModelWeights weights_;
  int64_t max_num_tokens_, max_lora_rank_;
  Buffer inv_freq_;  // [head_dim / 2] rotary frequencies after scaling
  // Workspace, each sized for max_num_tokens rows.
  Buffer hidden_, normed_, qkv_, attn_, proj_, gate_up_, act_, lora_scratch_;
  // The step's adapter runs (neighbouring sequences of one slot merged), built once per forward,
  // and its logits rows' runs by slot (slot -1 included) for the per-slot lm_head.
  std::vector<LoraRun> runs_, head_runs_;
  // CUDA: the step's upload, packed on the host, and its device copy (grown when a step's
  // arrays outgrow it, never shrunk); device_batch_ views it.
  std::vector<unsigned char> staging_host_;
  Buffer staging_;
  ForwardBatch device_batch_;
  std::vector<float> neg_inf_;  // a row of -inf, the source of the device logits' padding
};

// Rotary inverse frequencies [head_dim / 2] as transformers computes them in float32, with the
// config's scaling (default, linear, llama3) applied.
std::vector<float> rope_inv_freq(const ModelConfig& config);

}  // namespace lorart

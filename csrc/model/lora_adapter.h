// LoraAdapter: one validated adapter laid out for the forward, indexed by (layer, module) so the
// forward finds each module's pair in O(1). Owns one buffer with every pair's A [rank, in] and
// B^T [rank, out] in the adapter's own storage dtype (float32, float16 or bfloat16): the kernels
// widen to float32 as they read, which is exact, so a 16-bit adapter costs half the memory and
// half the reads of a float32 one and computes the same values. DoRA pairs also point at their
// float32 per-row scales (magnitude / ||W + B A||, computed against the base weights by
// dora_scales, model/dora.h). The embedding-side parts (lora/lora_embeddings.h) are copied in the
// forms the forward reads: the tables as given, embed LoRA A transposed to [V, r] (one row per
// token id), lm_head LoRA as a LoraPair. Immutable and shareable across threads. The LoRA
// cache's device level stores these.
#pragma once

#include <ostream>
#include <vector>

#include "core/tensor.h"

#include "core/buffer.h"
#include "kernels/params.h"
#include "lora/lora_tensors.h"
#include "model/model_config.h"

namespace lorart {

class LoraAdapter {
 public:
  // The model sizes an adapter's layout depends on; forward refuses an adapter of another shape.
  struct ModelShape {
    // vocab: the base vocabulary the embedding-side parts were checked against (an lm_head
    // LoRA's B [V, r] is read with V columns).
    int64_t num_layers, hidden, intermediate, q_out, kv_out, vocab;
    bool operator==(const ModelShape& o) const {
      return num_layers == o.num_layers && hidden == o.hidden && intermediate == o.intermediate &&
             q_out == o.q_out && kv_out == o.kv_out && vocab == o.vocab;
    }
  };
  static ModelShape shape_of(const ModelConfig& config);

  // Validates against `config` (max_lora_rank, every rule of validate_lora), then lays out.
  // `dora_scales` (dora_scales(), model/dora.h) must be given when a row is a DoRA row: it is
  // computed against the base weights, which this class does not see.
  LoraAdapter(const LoraWeights& weights, const LoraConfig& lora_config, const ModelConfig& config,
              int64_t max_lora_rank, const std::vector<float>* dora_scales = nullptr);
  // For rows that already passed validate_lora against this `config` (the LoRA cache's host
  // level): lays out without checking them again.
  static LoraAdapter from_validated(const LoraWeights& weights, const LoraConfig& lora_config,
                                    const ModelConfig& config,
                                    const std::vector<float>* dora_scales = nullptr);
  // An adapter whose pairs live in memory it does not own: `table` ([num_layers *
  // lora_module::kCount], as pairs() returns it) points into the LoRA cache's device pages
  // (stage_lora_pages), which the cache keeps while the adapter is pinned. No embedding-side
  // parts; nbytes() is 0 (the pages are counted by their owner).
  // `device`: where the pages are (pairs_device()).
  static LoraAdapter on_pages(const ModelConfig& config, std::vector<LoraPair> table, DType dtype,
                              Device device = Device::cpu());
  // Bytes of the pairs a LoraAdapter built from validated rows of this `lora_config` and `dtype`
  // holds (with the DoRA rows' float32 scales). Throws InvalidArgument when the sum overflows.
  static int64_t storage_bytes(const LoraConfig& lora_config, const ModelConfig& config,
                               DType dtype);
  // Everything a LoraAdapter of these validated weights holds: the pairs and the embedding-side
  // parts.
  static int64_t storage_bytes(const LoraWeights& weights, const LoraConfig& lora_config,
                               const ModelConfig& config);

  // rank 0 when the adapter leaves that module alone.
  const LoraPair& pair(int64_t layer, int32_t module_id) const;
  // All pairs, [num_layers * lora_module::kCount] indexed by layer * kCount + module.
  const LoraPair* pairs() const { return table_.data(); }
  int64_t max_rank() const { return max_rank_; }
  DType dtype() const { return dtype_; }
  size_t nbytes() const;
  bool has_dora() const { return has_dora_; }
  // Where the pairs' A / B^T (and DoRA scales) live: the host for an adapter built from weights;
  // a device for one the LoRA cache's device level placed there (to_device).
  Device pairs_device() const { return pairs_device_; }
  // A copy whose pairs (A, B^T) are in one allocation on `device`, copied before it returns.
  // Throws LoraError for a DoRA adapter or one with embedding-side parts (no CUDA path reads
  // them yet), DeviceError for a device this build cannot reach.
  LoraAdapter to_device(Device device) const;

  // The embedding-side parts; each undefined when the adapter leaves that part to the model.
  // The adapter's vocabulary: rows of embed_tokens / lm_head, 0 when it keeps the model's.
  int64_t vocab_size() const { return vocab_size_; }
  const Tensor& embed_tokens() const { return embed_tokens_; }  // [V, H]
  const Tensor& lm_head() const { return lm_head_; }            // [V, H]
  const Tensor& embed_lora_a_t() const { return embed_a_t_; }   // [V, r]: A^T, a row per id
  const Tensor& embed_lora_b() const { return embed_b_; }       // [H, r], scaling folded in
  // A [r, H], B^T [r, V]; rank 0 when the adapter does not adapt lm_head.
  const LoraPair& lm_head_pair() const { return lm_head_pair_; }
  bool has_embedding_parts() const {
    return embed_tokens_.defined() || lm_head_.defined() || embed_a_t_.defined() ||
           lm_head_pair_.rank > 0;
  }
  // Whether it was laid out for a model of `config`'s shape.
  bool fits(const ModelConfig& config) const { return shape_ == shape_of(config); }
  const ModelShape& model_shape() const { return shape_; }

 private:
  LoraAdapter(const LoraWeights& weights, const LoraConfig& lora_config, const ModelConfig& config,
              const std::vector<float>* dora_scales);
  LoraAdapter() = default;  // to_device fills it
  LoraAdapter(const ModelConfig& config, std::vector<LoraPair> table, DType dtype, Device device);
  void lay_out_embeddings(const LoraEmbeddings& parts);
  // Bytes of the A and B^T values alone.
  static int64_t pair_bytes(const LoraConfig& lora_config, const ModelConfig& config, DType dtype);

  ModelShape shape_{};           // first: its initializer validates the model config
  Buffer storage_;               // per config row: A rows then B^T rows, in dtype_
  std::vector<float> dora_;      // DoRA rows' scales, in row order
  std::vector<LoraPair> table_;  // [num_layers * lora_module::kCount]
  DType dtype_ = DType::kFloat32;
  Device pairs_device_ = Device::cpu();
  int64_t max_rank_ = 0;
  bool has_dora_ = false;
  // The embedding-side parts (each in its own dtype) and views of them.
  int64_t vocab_size_ = 0;
  Buffer embed_tokens_buf_, lm_head_buf_, embed_a_t_buf_, embed_b_buf_, head_a_buf_, head_b_t_buf_;
  Tensor embed_tokens_, lm_head_, embed_a_t_, embed_b_;
  LoraPair lm_head_pair_;
};

std::ostream& operator<<(std::ostream& out, const LoraAdapter::ModelShape& shape);

}  // namespace lorart

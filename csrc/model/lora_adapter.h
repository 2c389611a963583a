// LoraAdapter: one validated adapter laid out for the forward, indexed by (layer, module) so the
// forward finds each module's pair in O(1). Owns one buffer with every pair's A [rank, in] and
// B^T [rank, out] in the adapter's own storage dtype (float32, float16 or bfloat16): the kernels
// widen to float32 as they read, which is exact, so a 16-bit adapter costs half the memory and
// half the reads of a float32 one and computes the same values. Immutable and shareable across
// threads. The LoRA cache's device level stores these.
#pragma once

#include <ostream>
#include <vector>

#include "core/buffer.h"
#include "kernels/params.h"
#include "lora/lora_tensors.h"
#include "model/model_config.h"

namespace lorart {

class LoraAdapter {
 public:
  // The model sizes an adapter's layout depends on; forward refuses an adapter of another shape.
  struct ModelShape {
    int64_t num_layers, hidden, intermediate, q_out, kv_out;
    bool operator==(const ModelShape& o) const {
      return num_layers == o.num_layers && hidden == o.hidden && intermediate == o.intermediate &&
             q_out == o.q_out && kv_out == o.kv_out;
    }
  };
  static ModelShape shape_of(const ModelConfig& config);

  // Validates against `config` (max_lora_rank, every rule of validate_lora), then lays out.
  LoraAdapter(const LoraWeights& weights, const LoraConfig& lora_config, const ModelConfig& config,
              int64_t max_lora_rank);
  // For rows that already passed validate_lora against this `config` (the LoRA cache's host
  // level): lays out without checking them again.
  static LoraAdapter from_validated(const LoraWeights& weights, const LoraConfig& lora_config,
                                    const ModelConfig& config);
  // Bytes a LoraAdapter built from validated rows of this `lora_config` and `dtype` holds.
  // Throws InvalidArgument when the sum overflows int64.
  static int64_t storage_bytes(const LoraConfig& lora_config, const ModelConfig& config,
                               DType dtype);

  // rank 0 when the adapter leaves that module alone.
  const LoraPair& pair(int64_t layer, int32_t module_id) const;
  // All pairs, [num_layers * lora_module::kCount] indexed by layer * kCount + module.
  const LoraPair* pairs() const { return table_.data(); }
  int64_t max_rank() const { return max_rank_; }
  DType dtype() const { return dtype_; }
  size_t nbytes() const { return storage_.size(); }
  // Whether it was laid out for a model of `config`'s shape.
  bool fits(const ModelConfig& config) const { return shape_ == shape_of(config); }
  const ModelShape& model_shape() const { return shape_; }

 private:
  LoraAdapter(const LoraWeights& weights, const LoraConfig& lora_config, const ModelConfig& config);

  ModelShape shape_;             // first: its initializer validates the model config
  Buffer storage_;               // per config row: A rows then B^T rows, in dtype_
  std::vector<LoraPair> table_;  // [num_layers * lora_module::kCount]
  DType dtype_;
  int64_t max_rank_ = 0;
};

std::ostream& operator<<(std::ostream& out, const LoraAdapter::ModelShape& shape);

}  // namespace lorart

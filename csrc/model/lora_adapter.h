// LoraAdapter: one validated adapter in the compute dtype, indexed by (layer, module) so the
// forward finds each module's A/B pointers in O(1). Owns its float32 copy of the rows; immutable
// and shareable across threads. The LoRA cache stores these.
#pragma once

#include <vector>

#include "kernels/params.h"
#include "lora/lora_tensors.h"
#include "model/model_config.h"

namespace lorart {

class LoraAdapter {
 public:
  // Validates against `config` (max_lora_rank, every rule of validate_lora), then converts to
  // float32.
  LoraAdapter(const LoraWeights& weights, const LoraConfig& lora_config, const ModelConfig& config,
              int64_t max_lora_rank);
  // For rows that already passed validate_lora against this `config` (the LoRA cache's host
  // level): converts and indexes without checking them again.
  static LoraAdapter from_validated(const LoraWeights& weights, const LoraConfig& lora_config,
                                    const ModelConfig& config);

  // rank 0 when the adapter leaves that module alone.
  const LoraPair& pair(int64_t layer, int32_t module_id) const;
  int64_t max_rank() const { return max_rank_; }
  size_t nbytes() const { return weights_.nbytes(); }

 private:
  LoraAdapter(const LoraWeights& weights, const LoraConfig& lora_config, const ModelConfig& config);

  LoraWeights weights_;          // float32 copy
  std::vector<LoraPair> table_;  // [num_layers * lora_module::kCount]
  int64_t max_rank_ = 0;
};

}  // namespace lorart

#include "model/lora_adapter.h"

#include <algorithm>

#include "lora/lora_validation.h"
#include "lora/module_ids.h"

namespace lorart {

namespace {

// Validates before any copy is made; returns its argument for use in a member initializer.
const LoraWeights& validated(const LoraWeights& weights, const LoraConfig& lora_config,
                             const ModelConfig& config, int64_t max_lora_rank) {
  validate_lora(&weights, &lora_config, config, LoraLimits{max_lora_rank, std::nullopt});
  return weights;
}

}  // namespace

LoraAdapter::LoraAdapter(const LoraWeights& weights, const LoraConfig& lora_config,
                         const ModelConfig& config, int64_t max_lora_rank)
    : LoraAdapter(validated(weights, lora_config, config, max_lora_rank), lora_config, config) {}

LoraAdapter LoraAdapter::from_validated(const LoraWeights& weights, const LoraConfig& lora_config,
                                        const ModelConfig& config) {
  return LoraAdapter(weights, lora_config, config);
}

LoraAdapter::LoraAdapter(const LoraWeights& weights, const LoraConfig& lora_config,
                         const ModelConfig& config)
    : weights_(weights.to(DType::kFloat32)),
      table_(static_cast<size_t>(config.num_layers) * lora_module::kCount) {
  const float* base = weights_.tensor().data_as<const float>();
  for (int64_t i = 0; i < lora_config.num_rows(); ++i) {
    const LoraConfigRow row = lora_config.row(i);
    const LoraModuleDims dims = config.lora_module_dims(row.module_id);
    LoraPair& pair = table_[row.layer_idx * lora_module::kCount + row.module_id];
    pair.a = base + i * weights_.row_size();
    pair.b = pair.a + static_cast<int64_t>(row.adapter_size) * dims.in;
    pair.rank = row.adapter_size;
    max_rank_ = std::max<int64_t>(max_rank_, row.adapter_size);
  }
}

const LoraPair& LoraAdapter::pair(int64_t layer, int32_t module_id) const {
  return table_[layer * lora_module::kCount + module_id];
}

}  // namespace lorart

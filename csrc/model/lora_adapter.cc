#include "model/lora_adapter.h"

#include <algorithm>
#include <cstring>

#include "core/checked_math.h"
#include "lora/lora_validation.h"
#include "lora/module_ids.h"

namespace lorart {

namespace {

// Validates before any copy is made; returns its argument for use in a member initializer.
const LoraWeights& validated(const LoraWeights& weights, const LoraConfig& lora_config,
                             const ModelConfig& config, int64_t max_lora_rank) {
  validate_lora(&weights, &lora_config, config.lora_target(),
                LoraLimits{max_lora_rank, std::nullopt});
  return weights;
}

// dst [rank, out] = src [out, rank]^T for elements of `size` bytes (2 or 4).
void transpose(const char* src, int64_t out, int64_t rank, size_t size, char* dst) {
  for (int64_t o = 0; o < out; ++o) {
    for (int64_t r = 0; r < rank; ++r) {
      std::memcpy(dst + (r * out + o) * size, src + (o * rank + r) * size, size);
    }
  }
}

LoraAdapter::ModelShape validated_shape(const ModelConfig& config) {
  config.validate();  // bounds num_layers before table_ is sized by it
  return LoraAdapter::shape_of(config);
}

}  // namespace

LoraAdapter::ModelShape LoraAdapter::shape_of(const ModelConfig& config) {
  return {config.num_layers, config.hidden_size, config.intermediate_size,
          config.num_attention_heads * config.head_dim, config.num_kv_heads * config.head_dim};
}

std::ostream& operator<<(std::ostream& out, const LoraAdapter::ModelShape& shape) {
  return out << shape.num_layers << " layers, hidden " << shape.hidden << ", intermediate "
             << shape.intermediate << ", q " << shape.q_out << ", kv " << shape.kv_out;
}

LoraAdapter::LoraAdapter(const LoraWeights& weights, const LoraConfig& lora_config,
                         const ModelConfig& config, int64_t max_lora_rank)
    : LoraAdapter(validated(weights, lora_config, config, max_lora_rank), lora_config, config) {}

LoraAdapter LoraAdapter::from_validated(const LoraWeights& weights, const LoraConfig& lora_config,
                                        const ModelConfig& config) {
  return LoraAdapter(weights, lora_config, config);
}

int64_t LoraAdapter::storage_bytes(const LoraConfig& lora_config, const ModelConfig& config,
                                   DType dtype) {
  constexpr std::string_view what = "LoRA adapter storage values";
  int64_t elements = 0;
  for (int64_t i = 0; i < lora_config.num_rows(); ++i) {
    // lora_row_values, checked: rank * (in + out).
    const LoraConfigRow row = lora_config.row(i);
    const LoraModuleDims dims = config.lora_module_dims(row.module_id);
    const int64_t values =
        checked_mul(row.adapter_size, checked_add(dims.in, dims.out, what), what);
    elements = checked_add(elements, values, what);
  }
  return checked_mul(elements, static_cast<int64_t>(dtype_size(dtype)),
                     "LoRA adapter storage bytes");
}

LoraAdapter::LoraAdapter(const LoraWeights& weights, const LoraConfig& lora_config,
                         const ModelConfig& config)
    : shape_(validated_shape(config)),
      storage_(Buffer::allocate(storage_bytes(lora_config, config, weights.dtype()), Device::cpu(),
                                "LoRA adapter storage")),
      table_(static_cast<size_t>(config.num_layers) * lora_module::kCount),
      dtype_(weights.dtype()) {
  const size_t size = dtype_size(dtype_);
  const auto* rows = static_cast<const char*>(weights.tensor().data());
  char* dst = static_cast<char*>(storage_.data());
  for (int64_t i = 0; i < lora_config.num_rows(); ++i) {
    const LoraConfigRow row = lora_config.row(i);
    const LoraModuleDims dims = config.lora_module_dims(row.module_id);
    const int64_t rank = row.adapter_size;
    const char* a = rows + i * weights.row_size() * size;  // A [rank, in] then B [out, rank]
    LoraPair& pair = table_[row.layer_idx * lora_module::kCount + row.module_id];
    pair.a = dst;
    std::memcpy(dst, a, rank * dims.in * size);
    dst += rank * dims.in * size;
    pair.b_t = dst;
    transpose(a + rank * dims.in * size, dims.out, rank, size, dst);
    dst += rank * dims.out * size;
    pair.dtype = dtype_;
    pair.rank = row.adapter_size;
    max_rank_ = std::max<int64_t>(max_rank_, rank);
  }
}

const LoraPair& LoraAdapter::pair(int64_t layer, int32_t module_id) const {
  return table_[layer * lora_module::kCount + module_id];
}

}  // namespace lorart

// Random adapters for the LoRA cache tests (CPU and GPU): rows of any modules, ranks and dtype.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "core/dtype.h"
#include "lora/lora_tensors.h"
#include "model/model_config.h"
#include "test_util.h"

namespace lorart::testing_util {

struct Adapter {
  LoraWeights weights;
  LoraConfig config;
};

// Rows (module, layer, rank) with seeded random values in `dtype`, each row as wide as the
// widest (the LoraWeights layout: A [rank, in] then B [out, rank]; the tail past a row's own
// values is random too, and ignored).
inline Adapter random_adapter(const ModelConfig& model, const std::vector<LoraConfigRow>& rows,
                              DType dtype, uint32_t seed) {
  int64_t width = 0;
  for (const LoraConfigRow& r : rows) {
    const LoraModuleDims d = model.lora_module_dims(r.module_id);
    width = std::max<int64_t>(width, r.adapter_size * (d.in + d.out));
  }
  const auto n = static_cast<int64_t>(rows.size());
  std::vector<float> values = testing_util::random_floats(n * width, seed, -0.5f, 0.5f);
  if (dtype == DType::kBFloat16) {
    std::vector<uint16_t> words(values.size());
    for (size_t i = 0; i < values.size(); ++i) words[i] = float_to_bfloat16(values[i]);
    return {LoraWeights::copy_of(Tensor(words.data(), DType::kBFloat16, {n, width})),
            LoraConfig::from_rows(rows)};
  }
  return {LoraWeights::copy_of(Tensor(values.data(), DType::kFloat32, {n, width})),
          LoraConfig::from_rows(rows)};
}

}  // namespace lorart::testing_util

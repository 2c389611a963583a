// A tiny random Llama for the executor tests (weights drawn by a seeded mt19937).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "model/llama_model.h"
#include "test_util.h"

namespace lorart::testing_util {

// vocab 64, hidden 32, intermediate 48, 2 layers, 4 heads / 2 KV heads of 8; 64 positions.
inline ModelConfig executor_model_config() {
  ModelConfig c = llama_config(64, 32, 48, 2, 4, 2, 8);
  c.max_position_embeddings = 64;
  return c;
}

inline std::shared_ptr<LlamaModel> random_model(const ModelConfig& c, int64_t max_num_tokens = 64,
                                                int64_t max_lora_rank = 8, uint32_t seed = 7,
                                                Device device = Device::cpu()) {
  ModelWeightsBuilder builder(c);
  auto add = [&](const std::string& name, std::vector<int64_t> shape, float lo, float hi) {
    std::vector<float> values =
        random_floats(shape[0] * (shape.size() > 1 ? shape[1] : 1), seed++, lo, hi);
    builder.add(name, shape.size() == 1
                          ? Tensor(values.data(), DType::kFloat32, {shape[0]})
                          : Tensor(values.data(), DType::kFloat32, {shape[0], shape[1]}));
  };
  for_each_llama_param(c, add);
  return std::make_shared<LlamaModel>(c, ModelWeights(std::move(builder), device), max_num_tokens,
                                      max_lora_rank);
}

}  // namespace lorart::testing_util

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
                                                int64_t max_lora_rank = 8, uint32_t seed = 7) {
  ModelWeightsBuilder builder(c);
  auto add = [&](const std::string& name, std::vector<int64_t> shape, float lo, float hi) {
    std::vector<float> values =
        random_floats(shape[0] * (shape.size() > 1 ? shape[1] : 1), seed++, lo, hi);
    builder.add(name, shape.size() == 1
                          ? Tensor(values.data(), DType::kFloat32, {shape[0]})
                          : Tensor(values.data(), DType::kFloat32, {shape[0], shape[1]}));
  };
  const int64_t h = c.hidden_size, inter = c.intermediate_size;
  const int64_t q = c.num_attention_heads * c.head_dim, kv = c.num_kv_heads * c.head_dim;
  add("model.embed_tokens.weight", {c.vocab_size, h}, -1.0f, 1.0f);
  add("model.norm.weight", {h}, 0.8f, 1.2f);
  add("lm_head.weight", {c.vocab_size, h}, -0.3f, 0.3f);
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    add(p + "input_layernorm.weight", {h}, 0.8f, 1.2f);
    add(p + "post_attention_layernorm.weight", {h}, 0.8f, 1.2f);
    add(p + "self_attn.q_proj.weight", {q, h}, -0.3f, 0.3f);
    add(p + "self_attn.k_proj.weight", {kv, h}, -0.3f, 0.3f);
    add(p + "self_attn.v_proj.weight", {kv, h}, -0.3f, 0.3f);
    add(p + "self_attn.o_proj.weight", {h, q}, -0.3f, 0.3f);
    add(p + "mlp.gate_proj.weight", {inter, h}, -0.3f, 0.3f);
    add(p + "mlp.up_proj.weight", {inter, h}, -0.3f, 0.3f);
    add(p + "mlp.down_proj.weight", {h, inter}, -0.3f, 0.3f);
  }
  return std::make_shared<LlamaModel>(c, ModelWeights(std::move(builder)), max_num_tokens,
                                      max_lora_rank);
}

}  // namespace lorart::testing_util

// Helpers shared by the C++ tests.
#pragma once

#include <gtest/gtest.h>

#include <exception>
#include <random>
#include <string>
#include <typeinfo>
#include <vector>

#include "core/tensor.h"
#include "model/model_config.h"

namespace lorart::testing_util {

// A LlamaForCausalLM configuration of the given shape (everything else default).
inline ModelConfig llama_config(int64_t vocab, int64_t hidden, int64_t intermediate, int64_t layers,
                                int64_t heads, int64_t kv_heads, int64_t head_dim) {
  ModelConfig c;
  c.architecture = "LlamaForCausalLM";
  c.vocab_size = vocab;
  c.hidden_size = hidden;
  c.intermediate_size = intermediate;
  c.num_layers = layers;
  c.num_attention_heads = heads;
  c.num_kv_heads = kv_heads;
  c.head_dim = head_dim;
  return c;
}

// n floats drawn uniformly from [lo, hi) by a seeded mt19937 (the same values on every run).
inline std::vector<float> random_floats(size_t n, uint32_t seed, float lo = -1.0f,
                                        float hi = 1.0f) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> values(n);
  for (float& v : values) v = dist(rng);
  return values;
}

// [rows, cols] float32 view of `data` with row stride `stride`.
// Calls add(name, shape, lo, hi) for every tensor of a Llama checkpoint of `c` (separate q/k/v
// and gate/up), with the value range its random test weights are drawn from.
template <class Add>
void for_each_llama_param(const ModelConfig& c, Add&& add) {
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
}

inline Tensor rows_view(float* data, int64_t rows, int64_t cols, int64_t stride) {
  const int64_t shape[2] = {rows, cols};
  const int64_t strides[2] = {stride, 1};
  return Tensor(data, DType::kFloat32, 2, shape, strides);
}

// Runs `fn`, expects it to throw exactly `E` (not a subclass: LoraError is an InvalidArgument),
// and checks that the message contains `needle`.
template <class E, class Fn>
void expect_error(Fn&& fn, const std::string& needle) {
  try {
    fn();
  } catch (const std::exception& e) {
    EXPECT_EQ(typeid(e), typeid(E)) << "wrong exception type, message: " << e.what();
    EXPECT_PRED_FORMAT2(testing::IsSubstring, needle, e.what());
    return;
  }
  ADD_FAILURE() << "expected an exception containing: " << needle;
}

}  // namespace lorart::testing_util

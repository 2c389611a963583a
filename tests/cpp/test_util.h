// Helpers shared by the C++ tests.
#pragma once

#include <gtest/gtest.h>

#include <exception>
#include <string>
#include <typeinfo>

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

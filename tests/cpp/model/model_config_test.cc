#include "model/model_config.h"

#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <string>
#include <typeinfo>
#include <vector>

#include "core/errors.h"
#include "test_util.h"

namespace lorart {
namespace {

using testing_util::expect_error;

ModelConfig small_llama() { return testing_util::llama_config(100, 64, 128, 3, 4, 2, 16); }

// Breaks one field of a valid config and expects validate() to name it.
void expect_invalid(const std::function<void(ModelConfig&)>& mutate, const std::string& needle) {
  ModelConfig config = small_llama();
  mutate(config);
  SCOPED_TRACE(needle);
  expect_error<InvalidArgument>([&] { config.validate(); }, needle);
}

constexpr char kLlamaModules[] =
    "attn_qkv, attn_q, attn_k, attn_v, attn_dense, mlp_h_to_4h, mlp_4h_to_h, mlp_gate";

TEST(ModelConfigTest, SmallLlamaIsValid) {
  EXPECT_NO_THROW(small_llama().validate());
  for (const char* arch : {"MistralForCausalLM", "Qwen2ForCausalLM"}) {
    ModelConfig config = small_llama();
    config.architecture = arch;
    EXPECT_NO_THROW(config.validate()) << arch;
  }
  EXPECT_EQ(
      ModelConfig::supported_architectures(),
      (std::vector<std::string>{"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"}));
}

TEST(ModelConfigTest, ValidRopeScalingVariants) {
  ModelConfig linear = small_llama();
  linear.rope_scaling.rope_type = "linear";
  linear.rope_scaling.factor = 2.0;
  EXPECT_NO_THROW(linear.validate());

  ModelConfig llama3 = small_llama();
  llama3.rope_scaling.rope_type = "llama3";
  llama3.rope_scaling.factor = 8.0;
  llama3.rope_scaling.original_max_position_embeddings = 8192;
  EXPECT_NO_THROW(llama3.validate());

  // The default rope ignores the factor, so an unset (0) factor is not an error there.
  ModelConfig plain = small_llama();
  plain.rope_scaling.factor = 0.0;
  EXPECT_NO_THROW(plain.validate());
}

TEST(ModelConfigTest, UnsupportedArchitectureListsSupportedOnes) {
  expect_invalid([](ModelConfig& c) { c.architecture = "GPT2LMHeadModel"; },
                 "model config: architecture 'GPT2LMHeadModel' is not supported (supported: "
                 "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM)");
}

TEST(ModelConfigTest, SizesMustBePositiveAndUseHfFieldNames) {
  expect_invalid([](ModelConfig& c) { c.vocab_size = 0; },
                 "model config: vocab_size must be > 0, got 0");
  expect_invalid([](ModelConfig& c) { c.hidden_size = -64; }, "hidden_size must be > 0, got -64");
  expect_invalid([](ModelConfig& c) { c.intermediate_size = 0; },
                 "intermediate_size must be > 0, got 0");
  expect_invalid([](ModelConfig& c) { c.num_layers = 0; }, "num_hidden_layers must be > 0, got 0");
  expect_invalid([](ModelConfig& c) { c.num_attention_heads = 0; },
                 "num_attention_heads must be > 0, got 0");
  expect_invalid([](ModelConfig& c) { c.num_kv_heads = 0; },
                 "num_key_value_heads must be > 0, got 0");
  expect_invalid([](ModelConfig& c) { c.head_dim = 0; }, "head_dim must be > 0, got 0");
  expect_invalid([](ModelConfig& c) { c.max_position_embeddings = -5; },
                 "max_position_embeddings must be > 0, got -5");
}

TEST(ModelConfigTest, SizesHaveUpperLimits) {
  // Token ids, positions and head counts are int32 in the kernels.
  const int64_t over = ModelConfig::kMaxDim + 1;
  expect_invalid([&](ModelConfig& c) { c.vocab_size = over; },
                 "model config: vocab_size = 2147483648 exceeds the limit 2147483647 (the kernels "
                 "index it with int32)");
  expect_invalid([&](ModelConfig& c) { c.hidden_size = over; }, "hidden_size = 2147483648 exceeds");
  expect_invalid([&](ModelConfig& c) { c.intermediate_size = over; },
                 "intermediate_size = 2147483648 exceeds");
  expect_invalid([&](ModelConfig& c) { c.num_attention_heads = over; },
                 "num_attention_heads = 2147483648 exceeds");
  expect_invalid([&](ModelConfig& c) { c.num_kv_heads = over; },
                 "num_key_value_heads = 2147483648 exceeds");
  expect_invalid([&](ModelConfig& c) { c.head_dim = over; }, "head_dim = 2147483648 exceeds");
  expect_invalid([&](ModelConfig& c) { c.max_position_embeddings = over; },
                 "max_position_embeddings = 2147483648 exceeds the limit 2147483647");
  expect_invalid([&](ModelConfig& c) { c.sliding_window = over; },
                 "sliding_window = 2147483648 exceeds the limit 2147483647");
  expect_invalid([](ModelConfig& c) { c.num_layers = 65537; },
                 "model config: num_hidden_layers = 65537 exceeds the limit 65536");
  ModelConfig at_limits = small_llama();
  at_limits.num_layers = ModelConfig::kMaxNumLayers;
  at_limits.max_position_embeddings = ModelConfig::kMaxDim;
  at_limits.sliding_window = ModelConfig::kMaxDim;
  EXPECT_NO_THROW(at_limits.validate());
}

TEST(ModelConfigTest, WeightSizesMustFitInt64) {
  ModelConfig config = small_llama();
  // 100 * 64 embedding values twice, the final norm, and 3 layers of 2 norms, qkv (64 + 2 * 32
  // rows), o, gate/up/down.
  const int64_t layer = 2 * 64 + 128 * 64 + 64 * 64 + 3 * 128 * 64;
  EXPECT_EQ(config.weight_values(), 2 * 100 * 64 + 64 + 3 * layer);
  config.tie_word_embeddings = true;
  EXPECT_EQ(config.weight_values(), 100 * 64 + 64 + 3 * layer);
  config.attention_bias = true;  // Llama: q/k/v and o biases
  EXPECT_EQ(config.weight_values(), 100 * 64 + 64 + 3 * (layer + 128 + 64));
  config.architecture = "Qwen2ForCausalLM";  // q/k/v only
  EXPECT_EQ(config.weight_values(), 100 * 64 + 64 + 3 * (layer + 128));

  // Each field within its limit, the products not.
  expect_invalid(
      [](ModelConfig& c) {
        c.num_attention_heads = c.num_kv_heads = c.head_dim = int64_t{1} << 20;
        c.hidden_size = ModelConfig::kMaxDim;
      },
      "model config: qkv_proj values = 3298534883328 * 2147483647 overflows int64");
  expect_invalid(
      [](ModelConfig& c) {
        c.vocab_size = c.hidden_size = c.intermediate_size = ModelConfig::kMaxDim;
        c.num_layers = ModelConfig::kMaxNumLayers;
      },
      "overflows int64 (limit 9223372036854775807)");
}

TEST(ModelConfigTest, FloatFieldsMustBeFinite) {
  expect_invalid([](ModelConfig& c) { c.rms_norm_eps = INFINITY; },
                 "model config: rms_norm_eps must be finite, got inf");
  expect_invalid([](ModelConfig& c) { c.rope_theta = INFINITY; }, "rope_theta must be finite");
  expect_invalid(
      [](ModelConfig& c) {
        c.rope_scaling.rope_type = "linear";
        c.rope_scaling.factor = INFINITY;
      },
      "rope_scaling factor must be finite, got inf");
}

TEST(ModelConfigTest, HeadsMustBeAMultipleOfKvHeads) {
  expect_invalid([](ModelConfig& c) { c.num_kv_heads = 3; },
                 "model config: num_attention_heads (4) must be a multiple of "
                 "num_key_value_heads (3)");
  expect_invalid([](ModelConfig& c) { c.head_dim = 15; },
                 "head_dim must be even for rotary embeddings, got 15");
}

TEST(ModelConfigTest, NormAndRopeThetaMustBePositive) {
  expect_invalid([](ModelConfig& c) { c.rms_norm_eps = 0.0; }, "rms_norm_eps must be > 0, got 0");
  expect_invalid([](ModelConfig& c) { c.rms_norm_eps = std::nan(""); }, "rms_norm_eps must be > 0");
  expect_invalid([](ModelConfig& c) { c.rope_theta = -1.0; }, "rope_theta must be > 0, got -1");
}

TEST(ModelConfigTest, RopeScalingErrors) {
  expect_invalid([](ModelConfig& c) { c.rope_scaling.rope_type = "yarn"; },
                 "model config: rope_scaling type 'yarn' is not supported (supported: default, "
                 "linear, llama3)");
  expect_invalid(
      [](ModelConfig& c) {
        c.rope_scaling.rope_type = "linear";
        c.rope_scaling.factor = 0.0;
      },
      "rope_scaling factor must be > 0, got 0");
  expect_invalid(
      [](ModelConfig& c) {
        c.rope_scaling.rope_type = "llama3";
        c.rope_scaling.factor = 8.0;
      },
      "model config: llama3 rope_scaling needs original_max_position_embeddings > 0");
  // The llama3 frequency blend divides by (high - low).
  expect_invalid(
      [](ModelConfig& c) {
        c.rope_scaling.rope_type = "llama3";
        c.rope_scaling.factor = 8.0;
        c.rope_scaling.original_max_position_embeddings = 8192;
        c.rope_scaling.low_freq_factor = 4.0;
        c.rope_scaling.high_freq_factor = 4.0;
      },
      "llama3 rope_scaling needs high_freq_factor (4) > low_freq_factor (4)");
}

TEST(ModelConfigTest, SlidingWindowMustNotBeNegative) {
  expect_invalid([](ModelConfig& c) { c.sliding_window = -1; },
                 "sliding_window must be >= 0, got -1");
  ModelConfig windowed = small_llama();
  windowed.sliding_window = 4096;
  EXPECT_NO_THROW(windowed.validate());
}

TEST(ModelConfigLoraTest, ModuleIdsAndNames) {
  const ModelConfig config = small_llama();
  EXPECT_EQ(config.lora_module_ids(), (std::vector<int32_t>{0, 1, 2, 3, 4, 5, 6, 7}));
  EXPECT_EQ(config.lora_module_names(), kLlamaModules);
  for (int32_t id = 0; id < 8; ++id) EXPECT_TRUE(config.has_lora_module(id)) << id;
  for (int32_t id : {-1, 8, 9, 13, 17, 18, 42}) EXPECT_FALSE(config.has_lora_module(id)) << id;
}

TEST(ModelConfigLoraTest, ModuleDimsUseGqaSizes) {
  const ModelConfig config = small_llama();
  // q: 4 heads * 16 = 64 outputs; k and v: 2 kv heads * 16 = 32 outputs each.
  const std::vector<std::pair<int64_t, int64_t>> expected = {
      {64, 128},  // attn_qkv: 64 + 2 * 32
      {64, 64},   // attn_q
      {64, 32},   // attn_k
      {64, 32},   // attn_v
      {64, 64},   // attn_dense
      {64, 128},  // mlp_h_to_4h
      {128, 64},  // mlp_4h_to_h
      {64, 128},  // mlp_gate
  };
  for (int32_t id = 0; id < 8; ++id) {
    const LoraModuleDims dims = config.lora_module_dims(id);
    EXPECT_EQ(dims.in, expected[id].first) << "module " << id;
    EXPECT_EQ(dims.out, expected[id].second) << "module " << id;
  }
}

TEST(ModelConfigLoraTest, AttentionDimsFollowHeadDimNotHiddenSize) {
  // heads * head_dim != hidden_size (as in Qwen3 or Gemma): q and dense use heads * head_dim.
  ModelConfig config = small_llama();
  config.head_dim = 32;
  config.validate();
  EXPECT_EQ(config.lora_module_dims(0).in, 64);
  EXPECT_EQ(config.lora_module_dims(0).out, 128 + 2 * 64);
  EXPECT_EQ(config.lora_module_dims(1).out, 128);
  EXPECT_EQ(config.lora_module_dims(2).out, 64);
  EXPECT_EQ(config.lora_module_dims(4).in, 128);
  EXPECT_EQ(config.lora_module_dims(4).out, 64);
}

TEST(ModelConfigLoraTest, UnsupportedModuleThrowsLoraErrorNamingSupportedModules) {
  const ModelConfig config = small_llama();
  expect_error<LoraError>([&] { config.lora_module_dims(9); },
                          std::string("module_id 9 (cross_attn_q) is not a LoRA module of "
                                      "LlamaForCausalLM (supported: ") +
                              kLlamaModules + ")");
  expect_error<LoraError>([&] { config.lora_module_dims(42); }, "module_id 42 (unknown)");
  expect_error<LoraError>([&] { config.lora_module_dims(16); }, "16 (moe_router)");
}

}  // namespace
}  // namespace lorart

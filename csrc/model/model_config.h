// ModelConfig: the shape of a Llama-family model (what an HF config.json says), plus the questions
// LoRA validation asks of it (which module ids exist, each module's in/out sizes). Filled by
// lorart.hf.load_config in Python or directly in C++; plain value type.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "lora/lora_target.h"

namespace lorart {

struct RopeScaling {
  std::string rope_type = "default";  // "default" | "linear" | "llama3"
  double factor = 1.0;
  double low_freq_factor = 1.0;                  // llama3 only
  double high_freq_factor = 4.0;                 // llama3 only
  int64_t original_max_position_embeddings = 0;  // llama3 only
};

struct ModelConfig {
  // Upper bounds validate() enforces. Token ids, positions and head counts are int32 in the
  // kernels; no released model comes near kMaxNumLayers (Llama 3.1 405B has 126 layers).
  static constexpr int64_t kMaxDim = 2147483647;  // INT32_MAX: every size field but num_layers
  static constexpr int64_t kMaxNumLayers = 65536;

  std::string architecture = "LlamaForCausalLM";
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_layers = 0;
  int64_t num_attention_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t max_position_embeddings = 2048;
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  RopeScaling rope_scaling;
  bool tie_word_embeddings = false;
  bool attention_bias = false;    // q/k/v (and o) carry biases: Qwen2
  int64_t sliding_window = 0;     // 0 = full attention
  DType dtype = DType::kFloat32;  // the checkpoint's stored dtype
  int64_t bos_token_id = -1;
  std::vector<int64_t> eos_token_ids;

  static const std::vector<std::string>& supported_architectures();

  // Throws InvalidArgument naming the first field that is missing, out of its range (> 0 and at
  // most kMaxDim / kMaxNumLayers) or inconsistent, or when the weights it implies overflow int64.
  void validate() const;
  // Float32 values of the base weights this config implies (embedding, lm_head unless tied, final
  // norm, every layer with its biases). Throws InvalidArgument when that overflows int64.
  int64_t weight_values() const;
  // Module ids a LoRA adapter may target on this model, ascending.
  std::vector<int32_t> lora_module_ids() const;
  bool has_lora_module(int32_t module_id) const;
  // Throws LoraError when the model has no such module.
  LoraModuleDims lora_module_dims(int32_t module_id) const;
  // "attn_qkv, attn_q, ..." for messages.
  std::string lora_module_names() const;
  // The model as the LoRA layer sees it (lora/lora_target.h).
  LoraTarget lora_target() const;
};

}  // namespace lorart

#include "model/model_config.h"

#include <algorithm>

#include "core/errors.h"
#include "lora/module_ids.h"

namespace lorart {

const std::vector<std::string>& ModelConfig::supported_architectures() {
  static const std::vector<std::string> names = {"LlamaForCausalLM", "MistralForCausalLM",
                                                 "Qwen2ForCausalLM"};
  return names;
}

namespace {

std::string joined(const std::vector<std::string>& names) {
  std::string out;
  for (const std::string& name : names) out += (out.empty() ? "" : ", ") + name;
  return out;
}

void require_positive(const char* field, int64_t value) {
  if (value <= 0) raise<InvalidArgument>("model config: ", field, " must be > 0, got ", value);
}

}  // namespace

void ModelConfig::validate() const {
  const auto& supported = supported_architectures();
  if (std::find(supported.begin(), supported.end(), architecture) == supported.end()) {
    raise<InvalidArgument>("model config: architecture '", architecture,
                           "' is not supported (supported: ", joined(supported), ")");
  }
  require_positive("vocab_size", vocab_size);
  require_positive("hidden_size", hidden_size);
  require_positive("intermediate_size", intermediate_size);
  require_positive("num_hidden_layers", num_layers);
  require_positive("num_attention_heads", num_attention_heads);
  require_positive("num_key_value_heads", num_kv_heads);
  require_positive("head_dim", head_dim);
  require_positive("max_position_embeddings", max_position_embeddings);
  if (num_attention_heads % num_kv_heads != 0) {
    raise<InvalidArgument>("model config: num_attention_heads (", num_attention_heads,
                           ") must be a multiple of num_key_value_heads (", num_kv_heads, ")");
  }
  if (head_dim % 2 != 0) {
    raise<InvalidArgument>("model config: head_dim must be even for rotary embeddings, got ",
                           head_dim);
  }
  if (!(rms_norm_eps > 0)) {
    raise<InvalidArgument>("model config: rms_norm_eps must be > 0, got ", rms_norm_eps);
  }
  if (!(rope_theta > 0)) {
    raise<InvalidArgument>("model config: rope_theta must be > 0, got ", rope_theta);
  }
  const std::string& rope = rope_scaling.rope_type;
  if (rope != "default" && rope != "linear" && rope != "llama3") {
    raise<InvalidArgument>("model config: rope_scaling type '", rope,
                           "' is not supported (supported: default, linear, llama3)");
  }
  if (rope != "default" && !(rope_scaling.factor > 0)) {
    raise<InvalidArgument>("model config: rope_scaling factor must be > 0, got ",
                           rope_scaling.factor);
  }
  if (rope == "llama3" && rope_scaling.original_max_position_embeddings <= 0) {
    raise<InvalidArgument>(
        "model config: llama3 rope_scaling needs original_max_position_embeddings > 0");
  }
  if (rope == "llama3" && !(rope_scaling.high_freq_factor > rope_scaling.low_freq_factor)) {
    raise<InvalidArgument>("model config: llama3 rope_scaling needs high_freq_factor (",
                           rope_scaling.high_freq_factor, ") > low_freq_factor (",
                           rope_scaling.low_freq_factor, ")");
  }
  if (sliding_window < 0) {
    raise<InvalidArgument>("model config: sliding_window must be >= 0, got ", sliding_window);
  }
}

std::vector<int32_t> ModelConfig::lora_module_ids() const {
  // Every supported family is a decoder-only gated-MLP transformer: attention (fused or split
  // q/k/v, dense) and the three MLP projections. No cross attention, no MoE.
  return {lora_module::kAttnQkv,  lora_module::kAttnQ,     lora_module::kAttnK,
          lora_module::kAttnV,    lora_module::kAttnDense, lora_module::kMlpHTo4H,
          lora_module::kMlp4HToH, lora_module::kMlpGate};
}

bool ModelConfig::has_lora_module(int32_t module_id) const {
  const std::vector<int32_t> ids = lora_module_ids();
  return std::find(ids.begin(), ids.end(), module_id) != ids.end();
}

LoraModuleDims ModelConfig::lora_module_dims(int32_t module_id) const {
  const int64_t q_out = num_attention_heads * head_dim;
  const int64_t kv_out = num_kv_heads * head_dim;
  switch (module_id) {
    case lora_module::kAttnQkv:
      return {hidden_size, q_out + 2 * kv_out};
    case lora_module::kAttnQ:
      return {hidden_size, q_out};
    case lora_module::kAttnK:
    case lora_module::kAttnV:
      return {hidden_size, kv_out};
    case lora_module::kAttnDense:
      return {q_out, hidden_size};
    case lora_module::kMlpHTo4H:
    case lora_module::kMlpGate:
      return {hidden_size, intermediate_size};
    case lora_module::kMlp4HToH:
      return {intermediate_size, hidden_size};
    default:
      raise<LoraError>("module_id ", module_id, " (", lora_module_name(module_id),
                       ") is not a LoRA module of ", architecture,
                       " (supported: ", lora_module_names(), ")");
  }
}

std::string ModelConfig::lora_module_names() const {
  std::string out;
  for (int32_t id : lora_module_ids()) {
    out += (out.empty() ? "" : ", ") + std::string(lora_module_name(id));
  }
  return out;
}

}  // namespace lorart

#include "model/model_config.h"

#include <algorithm>
#include <cmath>

#include "core/checked_math.h"
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

void require_positive(const char* field, int64_t value, int64_t max = ModelConfig::kMaxDim) {
  if (value <= 0) raise<InvalidArgument>("model config: ", field, " must be > 0, got ", value);
  if (value > max) {
    raise<InvalidArgument>("model config: ", field, " = ", value, " exceeds the limit ", max,
                           max == ModelConfig::kMaxDim ? " (the kernels index it with int32)" : "");
  }
}

void require_finite_positive(const char* field, double value) {
  if (!(value > 0)) raise<InvalidArgument>("model config: ", field, " must be > 0, got ", value);
  if (!std::isfinite(value)) {
    raise<InvalidArgument>("model config: ", field, " must be finite, got ", value);
  }
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
  require_positive("num_hidden_layers", num_layers, kMaxNumLayers);
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
  require_finite_positive("rms_norm_eps", rms_norm_eps);
  require_finite_positive("rope_theta", rope_theta);
  const std::string& rope = rope_scaling.rope_type;
  if (rope != "default" && rope != "linear" && rope != "llama3") {
    raise<InvalidArgument>("model config: rope_scaling type '", rope,
                           "' is not supported (supported: default, linear, llama3)");
  }
  if (rope != "default") require_finite_positive("rope_scaling factor", rope_scaling.factor);
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
  if (sliding_window > kMaxDim) {
    raise<InvalidArgument>("model config: sliding_window = ", sliding_window, " exceeds the limit ",
                           kMaxDim);
  }
  weight_values();
}

int64_t ModelConfig::weight_values() const {
  constexpr std::string_view what = "model config: weight values";
  const int64_t h = hidden_size;
  const int64_t q_out = checked_mul(num_attention_heads, head_dim, "model config: q_proj rows");
  const int64_t kv_out = checked_mul(num_kv_heads, head_dim, "model config: k_proj rows");
  const int64_t qkv_out = checked_add(q_out, checked_mul(2, kv_out, what), what);
  int64_t layer = checked_mul(2, h, what);  // the two norms
  layer = checked_add(layer, checked_mul(qkv_out, h, "model config: qkv_proj values"), what);
  layer = checked_add(layer, checked_mul(h, q_out, "model config: o_proj values"), what);
  const int64_t mlp = checked_product({3, intermediate_size, h}, "model config: MLP values");
  layer = checked_add(layer, mlp, what);
  if (attention_bias) {
    layer = checked_add(layer, qkv_out, what);
    if (architecture == "LlamaForCausalLM") layer = checked_add(layer, h, what);
  }
  const int64_t embed = checked_mul(vocab_size, h, "model config: embed_tokens values");
  int64_t total = checked_mul(tie_word_embeddings ? 1 : 2, embed, what);
  total = checked_add(total, h, what);
  return checked_add(total, checked_mul(num_layers, layer, what), what);
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

LoraTarget ModelConfig::lora_target() const {
  LoraTarget target;
  target.architecture = architecture;
  target.num_layers = num_layers;
  target.hidden_size = hidden_size;
  target.vocab_size = vocab_size;
  for (int32_t id : lora_module_ids()) target.dims[id] = lora_module_dims(id);
  return target;
}

}  // namespace lorart

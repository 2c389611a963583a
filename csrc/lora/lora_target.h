// LoraTarget: what the LoRA format needs to know of the model an adapter is for (its family,
// layer count and each module's A/B sizes), so lora/ never depends on the model layer.
// ModelConfig::lora_target() builds one; the validation here takes it. Plain value type.
#pragma once

#include <array>
#include <cstdint>
#include <string>

#include "lora/module_ids.h"

namespace lorart {

struct LoraModuleDims {
  int64_t in = 0;   // Hi: columns of A
  int64_t out = 0;  // Ho: rows of B
};

struct LoraTarget {
  std::string architecture;  // for messages
  int64_t num_layers = 0;
  int64_t hidden_size = 0;  // columns of the embedding tables
  int64_t vocab_size = 0;   // the base vocabulary; an adapter's may only be larger
  std::array<LoraModuleDims, lora_module::kCount> dims{};  // {0, 0}: the model has no such module

  bool has_module(int32_t module_id) const {
    return module_id >= 0 && module_id < lora_module::kCount && dims[module_id].in > 0;
  }
  // "attn_qkv, attn_q, ..." (the modules it has, ascending) for messages.
  std::string module_names() const {
    std::string out;
    for (int32_t id = 0; id < lora_module::kCount; ++id) {
      if (has_module(id)) out += (out.empty() ? "" : ", ") + std::string(lora_module_name(id));
    }
    return out;
  }
};

}  // namespace lorart

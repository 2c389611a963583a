#include "lora/module_ids.h"

namespace lorart {

const std::array<LoraModuleInfo, lora_module::kCount>& lora_module_table() {
  static const std::array<LoraModuleInfo, lora_module::kCount> table = {{
      {0, "attn_qkv", "qkv_proj", TpSplit::kColumn, "combined qkv adapter"},
      {1, "attn_q", "q_proj", TpSplit::kColumn, "q adapter"},
      {2, "attn_k", "k_proj", TpSplit::kColumn, "k adapter"},
      {3, "attn_v", "v_proj", TpSplit::kColumn, "v adapter"},
      {4, "attn_dense", "o_proj", TpSplit::kRow, "adapter for the dense layer in attention"},
      {5, "mlp_h_to_4h", "gate_proj", TpSplit::kColumn,
       "gated MLP: the activated branch (HF gate_proj)"},
      {6, "mlp_4h_to_h", "down_proj", TpSplit::kRow, "gated MLP: down projection (HF down_proj)"},
      {7, "mlp_gate", "up_proj", TpSplit::kColumn, "gated MLP: the linear branch (HF up_proj)"},
      {8, "cross_attn_qkv", "", TpSplit::kColumn, "combined qkv adapter for cross attention"},
      {9, "cross_attn_q", "", TpSplit::kColumn, "q adapter for cross attention"},
      {10, "cross_attn_k", "", TpSplit::kColumn, "k adapter for cross attention"},
      {11, "cross_attn_v", "", TpSplit::kColumn, "v adapter for cross attention"},
      {12, "cross_attn_dense", "", TpSplit::kRow, "adapter for the dense layer in cross attention"},
      {13, "moe_h_to_4h", "", TpSplit::kColumn, "MoE expert MLP: up projection"},
      {14, "moe_4h_to_h", "", TpSplit::kRow, "MoE expert MLP: down projection"},
      {15, "moe_gate", "", TpSplit::kColumn, "MoE expert MLP: gate"},
      {16, "moe_router", "", TpSplit::kReplicated, "MoE expert router"},
      {17, "mlp_router", "", TpSplit::kReplicated, "Qwen2-MoE shared expert gate"},
  }};
  return table;
}

const LoraModuleInfo* find_lora_module(int32_t id) {
  if (id < 0 || id >= lora_module::kCount) return nullptr;
  return &lora_module_table()[id];
}

const LoraModuleInfo* find_lora_module(std::string_view name) {
  for (const LoraModuleInfo& info : lora_module_table()) {
    if (name == info.name) return &info;
  }
  return nullptr;
}

const char* lora_module_name(int32_t id) {
  const LoraModuleInfo* info = find_lora_module(id);
  return info ? info->name : "unknown";
}

const char* tp_split_name(TpSplit split) {
  switch (split) {
    case TpSplit::kColumn:
      return "column";
    case TpSplit::kRow:
      return "row";
    case TpSplit::kReplicated:
      return "replicated";
  }
  return "unknown";
}

}  // namespace lorart

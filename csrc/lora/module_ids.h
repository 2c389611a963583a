// The LoRA module-id table of the seed documents (TensorRT-LLM's numbering), in one place. Python
// reads it through lorart._core.lora_modules(); nothing else may hard-code these ids.
#pragma once

#include <array>
#include <cstdint>
#include <string_view>

namespace lorart {

// How tensor parallelism splits a module's LoRA pair (seed: "LoRA with tensor parallel").
enum class TpSplit : int8_t {
  kColumn,      // ColumnLinear: every rank keeps all of A, B is split by rows (outputs)
  kRow,         // RowLinear: A is split by columns (inputs), every rank keeps all of B
  kReplicated,  // not split (routers): every rank keeps A and B whole
};

struct LoraModuleInfo {
  int32_t id;
  const char* name;     // TensorRT-LLM name, e.g. "attn_q"
  const char* hf_name;  // Llama-family HF projection ("q_proj"), "" where the family has none
  TpSplit tp_split;
  const char* description;
};

namespace lora_module {
constexpr int32_t kAttnQkv = 0;
constexpr int32_t kAttnQ = 1;
constexpr int32_t kAttnK = 2;
constexpr int32_t kAttnV = 3;
constexpr int32_t kAttnDense = 4;
constexpr int32_t kMlpHTo4H = 5;  // HF gate_proj (the activated branch)
constexpr int32_t kMlp4HToH = 6;  // HF down_proj
constexpr int32_t kMlpGate = 7;   // HF up_proj
constexpr int32_t kCount = 18;
}  // namespace lora_module

const std::array<LoraModuleInfo, lora_module::kCount>& lora_module_table();
// nullptr when the id or name is unknown.
const LoraModuleInfo* find_lora_module(int32_t id);
const LoraModuleInfo* find_lora_module(std::string_view name);
// Name for messages: "attn_q", or "unknown" for an id outside the table.
const char* lora_module_name(int32_t id);
const char* tp_split_name(TpSplit split);

}  // namespace lorart

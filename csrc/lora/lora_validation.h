// The checks an adapter must pass before it may enter the LoRA cache (DESIGN.md, "Validation at
// enqueue"). Pure functions of their arguments; called by the executor at enqueue and by
// lorart.lora.validate. Every failure is a LoraError naming the row, the field, the value and
// the limit.
#pragma once

#include <cstdint>
#include <optional>

#include "lora/lora_target.h"
#include "lora/lora_tensors.h"

namespace lorart {

struct LoraLimits {
  int64_t max_lora_rank = 64;
  std::optional<DType> dtype;  // a dtype the weights must have; unset = accept any float dtype
};

// `weights` or `config` may be null (a request that carries only one of them): that is an error
// too. Checks, in order: both present; row counts agree; at least one row; dtype matches (when
// limits.dtype is set); per row: module id known and present in the model,
// 0 <= layer_idx < num_layers, 0 < adapter_size <= max_lora_rank, no (module, layer) twice, the
// row is long enough for r*Hi + Ho*r values, and those values are finite.
void validate_lora(const LoraWeights* weights, const LoraConfig* config, const LoraTarget& model,
                   const LoraLimits& limits);

// Values of row `row` actually used by its adapter: r*Hi + Ho*r.
int64_t lora_row_values(const LoraTarget& model, const LoraConfigRow& row);

}  // namespace lorart

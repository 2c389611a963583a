// DoRA's per-row scales of an adapter against the base model: for each DoRA row of `config`
// (module m of layer l, in row order), magnitude[o] / ||W[o, :] + B[o, :] @ A|| for the
// module's out rows, W being the module's rows of the base matrix (ModelWeights::module_rows)
// and B carrying the scaling. W + B A is formed in float32 and its squared norm accumulated in
// float64 (PEFT takes the norm in the weight's dtype, detached). Computed once when an adapter
// enters the LoRA cache, or when a LoraAdapter is built for a Python Model; LoraAdapter stores
// them. Pure function of its arguments; safe to call from any thread while the model runs (it only
// reads the weights).
#pragma once

#include <vector>

#include "kernels/exec_context.h"
#include "lora/lora_tensors.h"
#include "model/model_weights.h"

namespace lorart {

// Rows must have passed validate_lora against base.config(). Empty when no row is a DoRA row.
// Throws LoraError naming the row when a norm is 0 or a scale is not finite.
std::vector<float> dora_scales(const ExecContext& ctx, const ModelWeights& base,
                               const LoraWeights& weights, const LoraConfig& config);

}  // namespace lorart

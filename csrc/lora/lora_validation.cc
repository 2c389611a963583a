#include "lora/lora_validation.h"

#include <cmath>
#include <map>
#include <utility>

#include "core/errors.h"
#include "lora/module_ids.h"

namespace lorart {

int64_t lora_row_values(const LoraTarget& model, const LoraConfigRow& row) {
  if (!model.has_module(row.module_id)) {
    raise<LoraError>("module_id ", row.module_id, " (", lora_module_name(row.module_id),
                     ") is not a LoRA module of ", model.architecture,
                     " (supported: ", model.module_names(), ")");
  }
  const LoraModuleDims dims = model.dims[row.module_id];
  return static_cast<int64_t>(row.adapter_size) * (dims.in + dims.out);
}

namespace {

void check_row(const LoraTarget& model, const LoraLimits& limits, int64_t i,
               const LoraConfigRow& row) {
  if (find_lora_module(row.module_id) == nullptr) {
    raise<LoraError>("lora_config row ", i, ": module_id ", row.module_id,
                     " is unknown (valid ids are 0..", lora_module::kCount - 1, ")");
  }
  if (!model.has_module(row.module_id)) {
    raise<LoraError>("lora_config row ", i, ": module_id ", row.module_id, " (",
                     lora_module_name(row.module_id), ") is not a LoRA module of ",
                     model.architecture, " (supported: ", model.module_names(), ")");
  }
  if (row.layer_idx < 0 || row.layer_idx >= model.num_layers) {
    raise<LoraError>("lora_config row ", i, ": layer_idx ", row.layer_idx, " is out of range [0, ",
                     model.num_layers, ") (num_layers = ", model.num_layers, ")");
  }
  if (row.adapter_size <= 0 || row.adapter_size > limits.max_lora_rank) {
    raise<LoraError>("lora_config row ", i, ": adapter_size ", row.adapter_size,
                     " must be in [1, max_lora_rank = ", limits.max_lora_rank, "]");
  }
}

const char* describe_value(float v) { return std::isnan(v) ? "nan" : "inf"; }

}  // namespace

void validate_lora(const LoraWeights* weights, const LoraConfig* config, const LoraTarget& model,
                   const LoraLimits& limits) {
  if (weights == nullptr || config == nullptr) {
    raise<LoraError>(weights == nullptr ? "lora_weights" : "lora_config",
                     " is missing: a LoRA adapter needs both lora_weights and lora_config");
  }
  if (weights->num_rows() != config->num_rows()) {
    raise<LoraError>("lora_weights has ", weights->num_rows(), " rows but lora_config has ",
                     config->num_rows(), "; they must describe the same rows");
  }
  if (config->num_rows() == 0) {
    raise<LoraError>("lora_config has no rows: a LoRA adapter adapts at least one (module, layer)");
  }
  if (limits.dtype && weights->dtype() != *limits.dtype) {
    raise<LoraError>("lora_weights dtype ", dtype_name(weights->dtype()),
                     " does not match the model dtype ", dtype_name(*limits.dtype),
                     "; convert the adapter to ", dtype_name(*limits.dtype), " first");
  }
  std::map<std::pair<int32_t, int32_t>, int64_t> seen;  // (module, layer) -> first row
  for (int64_t i = 0; i < config->num_rows(); ++i) {
    const LoraConfigRow row = config->row(i);
    check_row(model, limits, i, row);
    const auto [it, inserted] = seen.emplace(std::make_pair(row.module_id, row.layer_idx), i);
    if (!inserted) {
      raise<LoraError>("lora_config rows ", it->second, " and ", i, " both adapt ",
                       lora_module_name(row.module_id), " of layer ", row.layer_idx,
                       "; each (module, layer) may appear once");
    }
    const LoraModuleDims dims = model.dims[row.module_id];
    const int64_t needed = lora_row_values(model, row);
    if (needed > weights->row_size()) {
      raise<LoraError>("lora_weights row ", i, " (", lora_module_name(row.module_id), ", layer ",
                       row.layer_idx, "): adapter_size ", row.adapter_size, " needs ", needed,
                       " values (", row.adapter_size, "*", dims.in, " in + ", dims.out, "*",
                       row.adapter_size, " out) but rows hold ", weights->row_size());
    }
    for (int64_t j = 0; j < needed; ++j) {
      const float v = weights->value(i, j);
      if (!std::isfinite(v)) {
        raise<LoraError>("lora_weights row ", i, " (", lora_module_name(row.module_id), ", layer ",
                         row.layer_idx, "): value at column ", j, " is ", describe_value(v),
                         "; LoRA weights must be finite");
      }
    }
  }
}

}  // namespace lorart

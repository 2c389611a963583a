#include "model/dora.h"

#include <cmath>

#include "core/errors.h"
#include "kernels/ops.h"
#include "lora/module_ids.h"

namespace lorart {

std::vector<float> dora_scales(const ExecContext& ctx, const ModelWeights& base,
                               const LoraWeights& weights, const LoraConfig& config) {
  const ModelConfig& model = base.config();
  int64_t total = 0;
  for (int64_t i = 0; i < config.num_rows(); ++i) {
    const LoraConfigRow row = config.row(i);
    if (row.is_dora != 0) total += model.lora_module_dims(row.module_id).out;
  }
  std::vector<float> scales(static_cast<size_t>(total));
  const DType dtype = weights.dtype();
  const size_t size = dtype_size(dtype);
  int64_t offset = 0;
  for (int64_t i = 0; i < config.num_rows(); ++i) {
    const LoraConfigRow row = config.row(i);
    if (row.is_dora == 0) continue;
    const LoraModuleDims dims = model.lora_module_dims(row.module_id);
    const int64_t rank = row.adapter_size;
    // The row: A [r, in], B [out, r], magnitude [out].
    auto* values = static_cast<char*>(weights.tensor().data()) + i * weights.row_size() * size;
    const Tensor a(values, dtype, {rank, dims.in});
    const Tensor b(values + rank * dims.in * size, dtype, {dims.out, rank});
    const Tensor magnitude(values + rank * (dims.in + dims.out) * size, dtype, {dims.out});
    const Tensor out(scales.data() + offset, DType::kFloat32, {dims.out});
    const auto [w, row_offset] = base.module_rows(row.layer_idx, row.module_id);
    ops::dora_scales(ctx, w, base.matrix_layout(), row_offset, a, b, magnitude, out);
    for (int64_t o = 0; o < dims.out; ++o) {
      if (!std::isfinite(scales[offset + o])) {
        raise<LoraError>("lora_config row ", i, " (", lora_module_name(row.module_id), ", layer ",
                         row.layer_idx, ", DoRA): magnitude / ||W + B A|| at output ", o, " is ",
                         scales[offset + o], " (the row norm of the adapted weight is ",
                         "0 or the magnitude too large); DoRA needs a finite scale");
      }
    }
    offset += dims.out;
  }
  return scales;
}

}  // namespace lorart

#include "lora/lora_tensors.h"

#include <cstring>

#include "core/buffer.h"
#include "core/errors.h"

namespace lorart {

namespace {

// Checks the common form rules and returns the 2-D view. `field` names the argument.
Tensor as_rows(const Tensor& t, const char* field, const char* layout) {
  if (!t.device().is_cpu()) {
    raise<LoraError>(field, " must be in host memory, got a tensor on ", t.device().str());
  }
  if (t.dim() == 3) {
    if (t.size(0) != 1) {
      raise<LoraError>(field, " must be ", layout, " or [1, ", layout + 1, "; got ", t.shape_str(),
                       " (the leading dim of the 3-D form must be 1)");
    }
  } else if (t.dim() != 2) {
    raise<LoraError>(field, " must be ", layout, " or [1, ", layout + 1, "; got ", t.shape_str());
  }
  if (!t.is_contiguous()) raise<LoraError>(field, " must be contiguous (row-major)");
  return t.dim() == 3 ? t.reshape({t.size(1), t.size(2)}) : t;
}

}  // namespace

LoraConfig::LoraConfig(const Tensor& table, std::shared_ptr<const void> owner)
    : owner_(std::move(owner)) {
  if (table.dtype() != DType::kInt32) {
    raise<LoraError>("lora_config must have dtype int32, got ", dtype_name(table.dtype()));
  }
  table_ = as_rows(table, "lora_config", "[rows, 3]");
  if (table_.size(1) != kColumns && table_.size(1) != kDoraColumns) {
    raise<LoraError>("lora_config must have 3 columns [module_id, layer_idx, adapter_size] or 4 ",
                     "(is_dora appended), got ", table_.size(1), " (shape ", table.shape_str(),
                     ")");
  }
}

LoraConfig LoraConfig::from_rows(const std::vector<LoraConfigRow>& rows) {
  const int64_t n = static_cast<int64_t>(rows.size());
  bool dora = false;
  for (const LoraConfigRow& row : rows) dora = dora || row.is_dora != 0;
  const int64_t columns = dora ? kDoraColumns : kColumns;
  auto buffer = std::make_shared<Buffer>(Buffer::allocate(n * columns * sizeof(int32_t)));
  auto* out = static_cast<int32_t*>(buffer->data());
  for (int64_t i = 0; i < n; ++i) {
    out[i * columns + 0] = rows[i].module_id;
    out[i * columns + 1] = rows[i].layer_idx;
    out[i * columns + 2] = rows[i].adapter_size;
    if (dora) out[i * columns + 3] = rows[i].is_dora;
  }
  return LoraConfig(buffer->view(DType::kInt32, {n, columns}), buffer);
}

LoraConfig LoraConfig::copy_of(const Tensor& table) {
  const Tensor checked = LoraConfig(table, nullptr).tensor();
  auto buffer = std::make_shared<Buffer>(Buffer::copy_of(checked, Device::cpu()));
  return LoraConfig(buffer->view(DType::kInt32, {checked.size(0), checked.size(1)}), buffer);
}

LoraConfigRow LoraConfig::row(int64_t i) const {
  if (i < 0 || i >= num_rows()) {
    raise<InvalidArgument>("lora_config row ", i, " out of range [0, ", num_rows(), ")");
  }
  const int32_t* r = table_.data_as<const int32_t>() + i * num_columns();
  return {r[0], r[1], r[2], num_columns() == kDoraColumns ? r[3] : 0};
}

LoraWeights::LoraWeights(const Tensor& rows, std::shared_ptr<const void> owner,
                         std::shared_ptr<const LoraEmbeddings> embeddings)
    : owner_(std::move(owner)),
      embeddings_(embeddings && !embeddings->empty() ? std::move(embeddings) : nullptr) {
  if (!is_floating(rows.dtype())) {
    raise<LoraError>("lora_weights must have dtype float32, float16 or bfloat16, got ",
                     dtype_name(rows.dtype()));
  }
  rows_ = as_rows(rows, "lora_weights", "[rows, max_row]");
}

LoraWeights LoraWeights::copy_of(const Tensor& rows) {
  const Tensor checked = LoraWeights(rows, nullptr).tensor();
  auto buffer = std::make_shared<Buffer>(Buffer::copy_of(checked, Device::cpu()));
  return LoraWeights(buffer->view(checked.dtype(), {checked.size(0), checked.size(1)}), buffer);
}

LoraWeights LoraWeights::copy() const {
  LoraWeights out = copy_of(rows_);
  if (embeddings_) out.embeddings_ = std::make_shared<const LoraEmbeddings>(embeddings_->copy());
  return out;
}

size_t LoraWeights::nbytes() const {
  return rows_.nbytes() + (embeddings_ ? embeddings_->nbytes() : 0);
}

bool LoraWeights::same_as(const LoraWeights& other) const {
  const Tensor &a = rows_, &b = other.rows_;
  if (a.dtype() != b.dtype() || a.size(0) != b.size(0) || a.size(1) != b.size(1) ||
      (a.nbytes() > 0 && std::memcmp(a.data(), b.data(), a.nbytes()) != 0)) {
    return false;
  }
  if ((embeddings_ == nullptr) != (other.embeddings_ == nullptr)) return false;
  return embeddings_ == nullptr || embeddings_->same_as(*other.embeddings_);
}

float LoraWeights::value(int64_t i, int64_t j) const {
  return load_float(rows_.data(), dtype(), static_cast<size_t>(i * row_size() + j));
}

LoraWeights LoraWeights::to(DType dtype) const {
  if (!is_floating(dtype)) {
    raise<LoraError>("lora_weights can only be converted to float32, float16 or bfloat16, not ",
                     dtype_name(dtype));
  }
  auto buffer = std::make_shared<Buffer>(
      Buffer::allocate(static_cast<size_t>(rows_.numel()) * dtype_size(dtype)));
  convert_floats(rows_.data(), rows_.dtype(), buffer->data(), dtype, rows_.numel());
  std::shared_ptr<const LoraEmbeddings> parts;
  if (embeddings_) parts = std::make_shared<const LoraEmbeddings>(embeddings_->to(dtype));
  return LoraWeights(buffer->view(dtype, {num_rows(), row_size()}), buffer, std::move(parts));
}

}  // namespace lorart

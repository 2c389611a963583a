#include "model/lora_adapter.h"

#include <algorithm>
#include <cstring>
#include <utility>

#include "core/checked_math.h"
#include "core/errors.h"
#include "lora/lora_validation.h"
#include "lora/module_ids.h"

namespace lorart {

namespace {

// Validates before any copy is made; returns its argument for use in a member initializer.
const LoraWeights& validated(const LoraWeights& weights, const LoraConfig& lora_config,
                             const ModelConfig& config, int64_t max_lora_rank) {
  validate_lora(&weights, &lora_config, config.lora_target(),
                LoraLimits{max_lora_rank, std::nullopt});
  return weights;
}

// dst [rank, out] = src [out, rank]^T for elements of `size` bytes (2 or 4).
void transpose(const char* src, int64_t out, int64_t rank, size_t size, char* dst) {
  for (int64_t o = 0; o < out; ++o) {
    for (int64_t r = 0; r < rank; ++r) {
      std::memcpy(dst + (r * out + o) * size, src + (o * rank + r) * size, size);
    }
  }
}

LoraAdapter::ModelShape validated_shape(const ModelConfig& config) {
  config.validate();  // bounds num_layers before table_ is sized by it
  return LoraAdapter::shape_of(config);
}

}  // namespace

LoraAdapter::ModelShape LoraAdapter::shape_of(const ModelConfig& config) {
  return {config.num_layers,
          config.hidden_size,
          config.intermediate_size,
          config.num_attention_heads * config.head_dim,
          config.num_kv_heads * config.head_dim,
          config.vocab_size};
}

std::ostream& operator<<(std::ostream& out, const LoraAdapter::ModelShape& shape) {
  return out << shape.num_layers << " layers, hidden " << shape.hidden << ", intermediate "
             << shape.intermediate << ", q " << shape.q_out << ", kv " << shape.kv_out << ", vocab "
             << shape.vocab;
}

LoraAdapter::LoraAdapter(const LoraWeights& weights, const LoraConfig& lora_config,
                         const ModelConfig& config, int64_t max_lora_rank,
                         const std::vector<float>* dora_scales)
    : LoraAdapter(validated(weights, lora_config, config, max_lora_rank), lora_config, config,
                  dora_scales) {}

LoraAdapter LoraAdapter::from_validated(const LoraWeights& weights, const LoraConfig& lora_config,
                                        const ModelConfig& config,
                                        const std::vector<float>* dora_scales) {
  return LoraAdapter(weights, lora_config, config, dora_scales);
}

LoraAdapter LoraAdapter::on_pages(const ModelConfig& config, std::vector<LoraPair> table,
                                  DType dtype, Device device) {
  return LoraAdapter(config, std::move(table), dtype, device);
}

LoraAdapter::LoraAdapter(const ModelConfig& config, std::vector<LoraPair> table, DType dtype,
                         Device device)
    : shape_(validated_shape(config)),
      table_(std::move(table)),
      dtype_(dtype),
      pairs_device_(device) {
  if (static_cast<int64_t>(table_.size()) != config.num_layers * lora_module::kCount) {
    raise<InvalidArgument>("LoraAdapter::on_pages: a table of ", table_.size(), " pairs for ",
                           config.num_layers, " layers of ", lora_module::kCount, " modules");
  }
  for (const LoraPair& pair : table_) {
    max_rank_ = std::max<int64_t>(max_rank_, pair.rank);
    has_dora_ = has_dora_ || (pair.rank > 0 && pair.dora_scale != nullptr);
  }
}

int64_t LoraAdapter::storage_bytes(const LoraWeights& weights, const LoraConfig& lora_config,
                                   const ModelConfig& config) {
  int64_t bytes = storage_bytes(lora_config, config, weights.dtype());
  if (const LoraEmbeddings* e = weights.embeddings()) {
    bytes = checked_add(bytes, static_cast<int64_t>(e->nbytes()), "LoRA adapter storage bytes");
  }
  return bytes;
}

size_t LoraAdapter::nbytes() const {
  size_t total = storage_.size() + dora_.size() * sizeof(float);
  for (const Buffer* b : {&embed_tokens_buf_, &lm_head_buf_, &embed_a_t_buf_, &embed_b_buf_,
                          &head_a_buf_, &head_b_t_buf_}) {
    total += b->size();
  }
  return total;
}

int64_t LoraAdapter::storage_bytes(const LoraConfig& lora_config, const ModelConfig& config,
                                   DType dtype) {
  int64_t dora_values = 0;
  for (int64_t i = 0; i < lora_config.num_rows(); ++i) {
    const LoraConfigRow row = lora_config.row(i);
    if (row.is_dora != 0)
      dora_values += config.lora_module_dims(row.module_id).out;  // <= 2^31 each
  }
  return checked_add(
      pair_bytes(lora_config, config, dtype),
      checked_mul(dora_values, int64_t{sizeof(float)}, "LoRA adapter DoRA scale bytes"),
      "LoRA adapter storage bytes");
}

int64_t LoraAdapter::pair_bytes(const LoraConfig& lora_config, const ModelConfig& config,
                                DType dtype) {
  constexpr std::string_view what = "LoRA adapter storage values";
  int64_t elements = 0;
  for (int64_t i = 0; i < lora_config.num_rows(); ++i) {
    // lora_row_values, checked: rank * (in + out).
    const LoraConfigRow row = lora_config.row(i);
    const LoraModuleDims dims = config.lora_module_dims(row.module_id);
    const int64_t values =
        checked_mul(row.adapter_size, checked_add(dims.in, dims.out, what), what);
    elements = checked_add(elements, values, what);
  }
  return checked_mul(elements, static_cast<int64_t>(dtype_size(dtype)),
                     "LoRA adapter storage bytes");
}

LoraAdapter::LoraAdapter(const LoraWeights& weights, const LoraConfig& lora_config,
                         const ModelConfig& config, const std::vector<float>* dora_scales)
    : shape_(validated_shape(config)),
      // The pairs only: DoRA's scales live in dora_.
      storage_(Buffer::allocate(pair_bytes(lora_config, config, weights.dtype()), Device::cpu(),
                                "LoRA adapter storage")),
      table_(static_cast<size_t>(config.num_layers) * lora_module::kCount),
      dtype_(weights.dtype()) {
  const size_t size = dtype_size(dtype_);
  const auto* rows = static_cast<const char*>(weights.tensor().data());
  char* dst = static_cast<char*>(storage_.data());
  int64_t dora_values = 0;
  for (int64_t i = 0; i < lora_config.num_rows(); ++i) {
    const LoraConfigRow row = lora_config.row(i);
    if (row.is_dora != 0) dora_values += config.lora_module_dims(row.module_id).out;
  }
  if (dora_values > 0) {
    if (dora_scales == nullptr || static_cast<int64_t>(dora_scales->size()) != dora_values) {
      raise<LoraError>("the adapter has DoRA rows: it needs their ", dora_values,
                       " scales (magnitude / ||W + B A||, computed against the base weights by ",
                       "the model), got ", dora_scales == nullptr ? 0 : dora_scales->size());
    }
    dora_ = *dora_scales;
    has_dora_ = true;
  }
  int64_t dora_offset = 0;
  for (int64_t i = 0; i < lora_config.num_rows(); ++i) {
    const LoraConfigRow row = lora_config.row(i);
    const LoraModuleDims dims = config.lora_module_dims(row.module_id);
    const int64_t rank = row.adapter_size;
    const char* a = rows + i * weights.row_size() * size;  // A [rank, in] then B [out, rank]
    LoraPair& pair = table_[row.layer_idx * lora_module::kCount + row.module_id];
    pair.a = dst;
    std::memcpy(dst, a, rank * dims.in * size);
    dst += rank * dims.in * size;
    pair.b_t = dst;
    transpose(a + rank * dims.in * size, dims.out, rank, size, dst);
    dst += rank * dims.out * size;
    pair.dtype = dtype_;
    pair.rank = row.adapter_size;
    if (row.is_dora != 0) {
      pair.dora_scale = dora_.data() + dora_offset;
      dora_offset += dims.out;
    }
    max_rank_ = std::max<int64_t>(max_rank_, rank);
  }
  if (const LoraEmbeddings* parts = weights.embeddings()) lay_out_embeddings(*parts);
}

LoraAdapter LoraAdapter::to_device(Device device) const {
  if (has_dora_ || has_embedding_parts()) {
    raise<LoraError>("the adapter has ", has_dora_ ? "DoRA rows" : "embedding-side parts",
                     ", which cannot run on ", device.str(), " yet");
  }
  LoraAdapter out;
  out.shape_ = shape_;
  out.dtype_ = dtype_;
  out.max_rank_ = max_rank_;
  out.pairs_device_ = device;
  out.storage_ = Buffer::allocate(std::max<size_t>(storage_.size(), 1), device,
                                  "the adapter's LoRA pairs on the device");
  if (storage_.size() > 0) {
    copy_bytes(out.storage_.data(), device, storage_.data(), Device::cpu(), storage_.size());
  }
  // The same layout at another base address.
  const auto* from = static_cast<const char*>(storage_.data());
  auto* to = static_cast<char*>(out.storage_.data());
  out.table_ = table_;
  for (LoraPair& pair : out.table_) {
    if (pair.rank == 0) continue;
    pair.a = to + (static_cast<const char*>(pair.a) - from);
    pair.b_t = to + (static_cast<const char*>(pair.b_t) - from);
  }
  return out;
}

void LoraAdapter::lay_out_embeddings(const LoraEmbeddings& e) {
  using P = LoraEmbeddings;
  auto copy = [](const Tensor& t, Buffer& dst) {
    dst = Buffer::copy_of(t, Device::cpu());
    return dst.view(t.dtype(), {t.size(0), t.size(1)});
  };
  // [rows, cols] -> [cols, rows]
  auto transposed = [](const Tensor& t, Buffer& dst) {
    const int64_t rows = t.size(0), cols = t.size(1);
    const size_t size = dtype_size(t.dtype());
    dst = Buffer::allocate(t.nbytes(), Device::cpu(), "LoRA adapter embedding-side part");
    transpose(static_cast<const char*>(t.data()), rows, cols, size, static_cast<char*>(dst.data()));
    return dst.view(t.dtype(), {cols, rows});
  };
  vocab_size_ = e.vocab_size();
  if (e.has(P::kEmbedTokens)) {
    embed_tokens_ = copy(e.part(P::kEmbedTokens), embed_tokens_buf_);
  }
  if (e.lm_head_is_embed_tokens()) {
    lm_head_ = embed_tokens_;  // kept tied: one copy
  } else if (e.has(P::kLmHead)) {
    lm_head_ = copy(e.part(P::kLmHead), lm_head_buf_);
  }
  if (e.has(P::kEmbedLoraA)) {
    embed_a_t_ = transposed(e.part(P::kEmbedLoraA), embed_a_t_buf_);  // [r, V] -> [V, r]
    embed_b_ = copy(e.part(P::kEmbedLoraB), embed_b_buf_);
    max_rank_ = std::max(max_rank_, embed_a_t_.size(1));
  }
  if (e.has(P::kLmHeadLoraA)) {
    const Tensor a = copy(e.part(P::kLmHeadLoraA), head_a_buf_);
    const Tensor b_t = transposed(e.part(P::kLmHeadLoraB), head_b_t_buf_);  // [V, r] -> [r, V]
    lm_head_pair_ = LoraPair{a.data(), b_t.data(), a.dtype(), static_cast<int32_t>(a.size(0))};
    max_rank_ = std::max<int64_t>(max_rank_, a.size(0));
  }
}

const LoraPair& LoraAdapter::pair(int64_t layer, int32_t module_id) const {
  return table_[layer * lora_module::kCount + module_id];
}

}  // namespace lorart

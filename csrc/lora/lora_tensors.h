// LoraWeights and LoraConfig: the two tensors that describe one LoRA adapter (TensorRT-LLM format,
// see DESIGN.md). Each holds a host Tensor view plus a shared owner that keeps the memory alive
// (an owning Buffer, or an array lent by the binding layer without a copy). Immutable after
// construction; safe to share across threads.
//
//   LoraConfig  [rows, 3] int32: [module_id, layer_idx, adapter_size r] per row, or
//               [rows, 4] with TensorRT-LLM's is_dora column (0 or 1) appended
//   LoraWeights [rows, max_row] float: row i = flatten(A_i [r, Hi]) ++ flatten(B_i [Ho, r])
//               (++ magnitude_i [Ho] for a DoRA row) ++ pad
//
// Both also accept TensorRT-LLM's 3-D form with a leading batch dim of 1 and store it as 2-D.
// LoraWeights may also carry the adapter's embedding-side parts (lora/lora_embeddings.h); an
// adapter made only of those has zero rows.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "core/tensor.h"
#include "lora/lora_embeddings.h"

namespace lorart {

struct LoraConfigRow {
  int32_t module_id;
  int32_t layer_idx;
  int32_t adapter_size;
  int32_t is_dora = 0;  // the 4th column as given (validation allows 0 or 1); 0 for 3 columns
};

class LoraConfig {
 public:
  static constexpr int64_t kColumns = 3;
  static constexpr int64_t kDoraColumns = 4;

  // `table`: host, contiguous, int32, [rows, 3 or 4] or [1, rows, 3 or 4]. Throws LoraError
  // otherwise.
  LoraConfig(const Tensor& table, std::shared_ptr<const void> owner);
  // Four columns when any row is a DoRA row, else three.
  static LoraConfig from_rows(const std::vector<LoraConfigRow>& rows);
  // An owning, contiguous copy of `table` (same accepted forms).
  static LoraConfig copy_of(const Tensor& table);

  int64_t num_rows() const { return table_.size(0); }
  int64_t num_columns() const { return table_.size(1); }
  LoraConfigRow row(int64_t i) const;
  const Tensor& tensor() const { return table_; }  // always 2-D [rows, 3 or 4]
  const std::shared_ptr<const void>& owner() const { return owner_; }

 private:
  Tensor table_;
  std::shared_ptr<const void> owner_;
};

class LoraWeights {
 public:
  // `rows`: host, contiguous, float32/float16/bfloat16, [rows, max_row] or [1, rows, max_row].
  // `embeddings`: the adapter's embedding-side parts, or null (an empty one is stored as null).
  LoraWeights(const Tensor& rows, std::shared_ptr<const void> owner,
              std::shared_ptr<const LoraEmbeddings> embeddings = nullptr);
  // An owning, contiguous copy of `rows` (same accepted forms), without embedding-side parts.
  static LoraWeights copy_of(const Tensor& rows);
  // An owning copy of everything: the rows and the embedding-side parts.
  LoraWeights copy() const;

  int64_t num_rows() const { return rows_.size(0); }
  int64_t row_size() const { return rows_.size(1); }  // max_row
  DType dtype() const { return rows_.dtype(); }
  const Tensor& tensor() const { return rows_; }  // always 2-D [rows, max_row]
  const std::shared_ptr<const void>& owner() const { return owner_; }
  // Null when the adapter brings no embedding-side parts.
  const LoraEmbeddings* embeddings() const { return embeddings_.get(); }
  const std::shared_ptr<const LoraEmbeddings>& shared_embeddings() const { return embeddings_; }
  // The rows' bytes plus the embedding-side parts'.
  size_t nbytes() const;
  // Element j of row i as float, whatever the storage dtype.
  float value(int64_t i, int64_t j) const;
  // An owning copy, rows and parts converted to `dtype` (round-to-nearest-even for fp16/bf16).
  LoraWeights to(DType dtype) const;
  // Same rows (dtype, shape, bytes) and same embedding-side parts.
  bool same_as(const LoraWeights& other) const;

 private:
  Tensor rows_;
  std::shared_ptr<const void> owner_;
  std::shared_ptr<const LoraEmbeddings> embeddings_;
};

}  // namespace lorart

// LoraWeights and LoraConfig: the two tensors that describe one LoRA adapter (TensorRT-LLM format,
// see DESIGN.md). Each holds a host Tensor view plus a shared owner that keeps the memory alive
// (an owning Buffer, or an array lent by the binding layer without a copy). Immutable after
// construction; safe to share across threads.
//
//   LoraConfig  [rows, 3] int32: [module_id, layer_idx, adapter_size r] per row
//   LoraWeights [rows, max_row] float: row i = flatten(A_i [r, Hi]) ++ flatten(B_i [Ho, r]) ++ pad
//
// Both also accept TensorRT-LLM's 3-D form with a leading batch dim of 1 and store it as 2-D.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "core/tensor.h"

namespace lorart {

struct LoraConfigRow {
  int32_t module_id;
  int32_t layer_idx;
  int32_t adapter_size;
};

class LoraConfig {
 public:
  static constexpr int64_t kColumns = 3;

  // `table`: host, contiguous, int32, [rows, 3] or [1, rows, 3]. Throws LoraError otherwise.
  LoraConfig(const Tensor& table, std::shared_ptr<const void> owner);
  static LoraConfig from_rows(const std::vector<LoraConfigRow>& rows);
  // An owning, contiguous copy of `table` (same accepted forms).
  static LoraConfig copy_of(const Tensor& table);

  int64_t num_rows() const { return table_.size(0); }
  LoraConfigRow row(int64_t i) const;
  const Tensor& tensor() const { return table_; }  // always 2-D [rows, 3]
  const std::shared_ptr<const void>& owner() const { return owner_; }

 private:
  Tensor table_;
  std::shared_ptr<const void> owner_;
};

class LoraWeights {
 public:
  // `rows`: host, contiguous, float32/float16/bfloat16, [rows, max_row] or [1, rows, max_row].
  LoraWeights(const Tensor& rows, std::shared_ptr<const void> owner);
  // An owning, contiguous copy of `rows` (same accepted forms).
  static LoraWeights copy_of(const Tensor& rows);

  int64_t num_rows() const { return rows_.size(0); }
  int64_t row_size() const { return rows_.size(1); }  // max_row
  DType dtype() const { return rows_.dtype(); }
  const Tensor& tensor() const { return rows_; }  // always 2-D [rows, max_row]
  const std::shared_ptr<const void>& owner() const { return owner_; }
  size_t nbytes() const { return rows_.nbytes(); }
  // Element j of row i as float, whatever the storage dtype.
  float value(int64_t i, int64_t j) const;
  // An owning copy converted to `dtype` (round-to-nearest-even for fp16/bf16).
  LoraWeights to(DType dtype) const;

 private:
  Tensor rows_;
  std::shared_ptr<const void> owner_;
};

}  // namespace lorart

// KvCache: the preallocated paged KV pool of one model, on the model's device. Layout
// [num_layers, 2 (K, V), num_blocks, block_size, num_kv_heads, head_dim] in its dtype (float32,
// float16 or bfloat16; paged_attention rounds to it on write and widens on read). It owns memory
// only; which blocks belong to which sequence is the caller's business (block tables).
#pragma once

#include <cstdint>

#include "core/buffer.h"
#include "model/model_config.h"

namespace lorart {

class KvCache {
 public:
  static constexpr int64_t kMaxBlocks = 2147483647;  // block tables hold int32 block ids
  static constexpr int64_t kMaxBlockSize = 1024;

  // Throws InvalidArgument (see checked_bytes) before allocating.
  KvCache(const ModelConfig& config, int64_t num_blocks, int64_t block_size,
          Device device = Device::cpu(), DType dtype = DType::kFloat32);
  // Bytes of a pool of `num_blocks` blocks of `block_size` tokens; allocates nothing. Throws
  // InvalidArgument naming the field and the limit: an invalid config, num_blocks outside
  // [1, kMaxBlocks], block_size outside [1, kMaxBlockSize], a size that overflows int64, or one
  // over the memory of `device` (check_allocation), a dtype other than float32 / float16 /
  // bfloat16.
  static size_t checked_bytes(const ModelConfig& config, int64_t num_blocks, int64_t block_size,
                              Device device = Device::cpu(), DType dtype = DType::kFloat32);

  int64_t num_blocks() const { return num_blocks_; }
  int64_t block_size() const { return block_size_; }
  int64_t num_layers() const { return num_layers_; }
  int64_t kv_width() const { return kv_width_; }  // num_kv_heads * head_dim
  size_t nbytes() const { return buffer_.size(); }
  DType dtype() const { return dtype_; }
  void* keys(int64_t layer) const { return base(layer, 0); }
  void* values(int64_t layer) const { return base(layer, 1); }
  // Layer `layer`'s keys / values as [num_blocks, block_size, num_kv_heads, head_dim] of dtype().
  Tensor key_view(int64_t layer) const { return layer_view(layer, 0); }
  Tensor value_view(int64_t layer) const { return layer_view(layer, 1); }
  Device device() const { return buffer_.device(); }
  // Bytes one cached token takes across all layers (K and V); throws InvalidArgument on overflow
  // or a dtype other than float32 / float16 / bfloat16.
  static size_t bytes_per_token(const ModelConfig& config, DType dtype = DType::kFloat32);

 private:
  void* base(int64_t layer, int kv) const;
  Tensor layer_view(int64_t layer, int kv) const;

  int64_t num_layers_ = 0, num_blocks_ = 0, block_size_ = 0, kv_width_ = 0;
  int64_t num_kv_heads_ = 0, head_dim_ = 0;
  DType dtype_ = DType::kFloat32;
  Buffer buffer_;
};

}  // namespace lorart

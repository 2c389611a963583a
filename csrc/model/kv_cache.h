// KvCache: the preallocated paged KV pool of one model, on the model's device. Layout
// [num_layers, 2 (K, V), num_blocks, block_size, num_kv_heads, head_dim] float32. It owns memory
// only; which blocks belong to which sequence is the caller's business (block tables).
#pragma once

#include <cstdint>

#include "core/buffer.h"
#include "model/model_config.h"

namespace lorart {

class KvCache {
 public:
  KvCache(const ModelConfig& config, int64_t num_blocks, int64_t block_size,
          Device device = Device::cpu());

  int64_t num_blocks() const { return num_blocks_; }
  int64_t block_size() const { return block_size_; }
  int64_t num_layers() const { return num_layers_; }
  int64_t kv_width() const { return kv_width_; }  // num_kv_heads * head_dim
  size_t nbytes() const { return buffer_.size(); }
  float* keys(int64_t layer) const { return base(layer, 0); }
  float* values(int64_t layer) const { return base(layer, 1); }
  Device device() const { return buffer_.device(); }
  // Bytes one cached token takes across all layers (K and V).
  static size_t bytes_per_token(const ModelConfig& config);

 private:
  float* base(int64_t layer, int kv) const;

  int64_t num_layers_, num_blocks_, block_size_, kv_width_;
  Buffer buffer_;
};

}  // namespace lorart

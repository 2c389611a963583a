#include "model/kv_cache.h"

#include "core/errors.h"

namespace lorart {

KvCache::KvCache(const ModelConfig& config, int64_t num_blocks, int64_t block_size, Device device)
    : num_layers_(config.num_layers),
      num_blocks_(num_blocks),
      block_size_(block_size),
      kv_width_(config.num_kv_heads * config.head_dim) {
  if (num_blocks <= 0) raise<InvalidArgument>("num_kv_blocks must be > 0, got ", num_blocks);
  if (block_size <= 0 || block_size > 1024) {
    raise<InvalidArgument>("block_size must be in [1, 1024], got ", block_size);
  }
  buffer_ = Buffer::allocate(
      static_cast<size_t>(num_layers_) * 2 * num_blocks_ * block_size_ * kv_width_ * sizeof(float),
      device);
  buffer_.zero();
}

size_t KvCache::bytes_per_token(const ModelConfig& config) {
  return static_cast<size_t>(config.num_layers) * 2 * config.num_kv_heads * config.head_dim *
         sizeof(float);
}

float* KvCache::base(int64_t layer, int kv) const {
  const int64_t per = num_blocks_ * block_size_ * kv_width_;
  return static_cast<float*>(buffer_.data()) + (layer * 2 + kv) * per;
}

}  // namespace lorart

#include "model/kv_cache.h"

#include <string>

#include "core/checked_math.h"
#include "core/errors.h"

namespace lorart {

namespace {

std::string describe(int64_t num_blocks, int64_t block_size) {
  return "the KV cache (num_kv_blocks = " + std::to_string(num_blocks) +
         ", block_size = " + std::to_string(block_size) + ")";
}

}  // namespace

KvCache::KvCache(const ModelConfig& config, int64_t num_blocks, int64_t block_size, Device device,
                 DType dtype) {
  const size_t bytes = checked_bytes(config, num_blocks, block_size, device, dtype);
  num_layers_ = config.num_layers;
  num_blocks_ = num_blocks;
  block_size_ = block_size;
  kv_width_ = config.num_kv_heads * config.head_dim;
  num_kv_heads_ = config.num_kv_heads;
  head_dim_ = config.head_dim;
  dtype_ = dtype;
  buffer_ = Buffer::allocate(bytes, device, describe(num_blocks, block_size));
  buffer_.zero();
}

size_t KvCache::checked_bytes(const ModelConfig& config, int64_t num_blocks, int64_t block_size,
                              Device device, DType dtype) {
  config.validate();
  if (num_blocks <= 0 || num_blocks > kMaxBlocks) {
    raise<InvalidArgument>("num_kv_blocks must be in [1, ", kMaxBlocks,
                           "] (block ids are int32), got ", num_blocks);
  }
  if (block_size <= 0 || block_size > kMaxBlockSize) {
    raise<InvalidArgument>("block_size must be in [1, ", kMaxBlockSize, "], got ", block_size);
  }
  const int64_t per_token = static_cast<int64_t>(bytes_per_token(config, dtype));
  const auto bytes = static_cast<size_t>(
      checked_product({num_blocks, block_size, per_token},
                      "KV cache bytes (num_kv_blocks * block_size * bytes per token)"));
  check_allocation(bytes, device, describe(num_blocks, block_size));
  return bytes;
}

size_t KvCache::bytes_per_token(const ModelConfig& config, DType dtype) {
  if (dtype != DType::kFloat32 && dtype != DType::kFloat16 && dtype != DType::kBFloat16) {
    raise<InvalidArgument>("the KV cache dtype must be float32, float16 or bfloat16, got ",
                           dtype_name(dtype));
  }
  return static_cast<size_t>(checked_product(
      {config.num_layers, 2, config.num_kv_heads, config.head_dim,
       static_cast<int64_t>(dtype_size(dtype))},
      "KV cache bytes per token (num_hidden_layers * 2 * num_key_value_heads * head_dim * "
      "dtype size)"));
}

void* KvCache::base(int64_t layer, int kv) const {
  const int64_t per = num_blocks_ * block_size_ * kv_width_ * int64_t(dtype_size(dtype_));
  return static_cast<char*>(buffer_.data()) + (layer * 2 + kv) * per;
}

Tensor KvCache::layer_view(int64_t layer, int kv) const {
  const int64_t shape[4] = {num_blocks_, block_size_, num_kv_heads_, head_dim_};
  const int64_t strides[4] = {block_size_ * kv_width_, kv_width_, head_dim_, 1};
  return Tensor(base(layer, kv), dtype_, 4, shape, strides, buffer_.device());
}

}  // namespace lorart

#include "executor/kv_cache_manager.h"

#include <algorithm>

#include "core/errors.h"

namespace lorart {

KvCacheManager::KvCacheManager(int64_t num_blocks, int64_t block_size)
    : num_blocks_(num_blocks), block_size_(block_size) {
  if (num_blocks <= 0 || num_blocks > INT32_MAX) {
    raise<InvalidArgument>("num_kv_blocks must be in [1, 2^31), got ", num_blocks);
  }
  if (block_size <= 0) raise<InvalidArgument>("block_size must be > 0, got ", block_size);
  free_.resize(num_blocks);
  for (int64_t i = 0; i < num_blocks; ++i) free_[i] = static_cast<int32_t>(num_blocks - 1 - i);
}

int64_t KvCacheManager::shortfall(const std::vector<int32_t>& table, int64_t tokens) const {
  return std::max<int64_t>(0, blocks_for(tokens) - static_cast<int64_t>(table.size()));
}

bool KvCacheManager::reserve(std::vector<int32_t>& table, int64_t tokens) {
  const int64_t extra = shortfall(table, tokens);
  if (extra > free_blocks()) return false;
  for (int64_t i = 0; i < extra; ++i) {
    table.push_back(free_.back());
    free_.pop_back();
  }
  return true;
}

void KvCacheManager::release(std::vector<int32_t>& table) {
  for (auto it = table.rbegin(); it != table.rend(); ++it) free_.push_back(*it);
  table.clear();
}

}  // namespace lorart

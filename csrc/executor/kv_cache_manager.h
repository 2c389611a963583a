// KvCacheManager: hands out the blocks of the paged KV pool (csrc/model/kv_cache.h) to sequences.
// It owns only indices: a free list, and the block tables live with the sequences. Used by the
// scheduler on the executor's loop thread; not thread-safe.
#pragma once

#include <cstdint>
#include <vector>

namespace lorart {

class KvCacheManager {
 public:
  KvCacheManager(int64_t num_blocks, int64_t block_size);

  int64_t num_blocks() const { return num_blocks_; }
  int64_t block_size() const { return block_size_; }
  int64_t free_blocks() const { return static_cast<int64_t>(free_.size()); }
  // Blocks needed to hold `tokens` positions.
  int64_t blocks_for(int64_t tokens) const { return (tokens + block_size_ - 1) / block_size_; }
  // Extra blocks `table` needs to cover `tokens` positions.
  int64_t shortfall(const std::vector<int32_t>& table, int64_t tokens) const;
  // Grows `table` to cover `tokens` positions. All or nothing: returns false, changing nothing,
  // when the free list is too short.
  bool reserve(std::vector<int32_t>& table, int64_t tokens);
  // Returns every block of `table` to the free list and clears it.
  void release(std::vector<int32_t>& table);

 private:
  int64_t num_blocks_, block_size_;
  std::vector<int32_t> free_;  // a stack: the most recently freed block is reused first
};

}  // namespace lorart

#include "runtime/memory_plan.h"

#include <algorithm>
#include <cmath>

#include "core/errors.h"

namespace lorart {

namespace {

void non_negative(const char* name, int64_t value) {
  if (value < 0) raise<InvalidArgument>("KV pool sizing: ", name, " must be >= 0, got ", value);
}

constexpr int64_t kMaxBlockIds = 2147483647;  // block tables hold int32 ids

}  // namespace

KvPoolPlan plan_kv_pool(const KvPoolSizing& s) {
  non_negative("free_bytes", s.free_bytes);
  non_negative("weights_bytes", s.weights_bytes);
  non_negative("lora_cache_bytes", s.lora_cache_bytes);
  non_negative("workspace_bytes", s.workspace_bytes);
  non_negative("max_blocks", s.max_blocks);
  if (!(s.fraction > 0.0 && s.fraction <= 1.0)) {
    raise<InvalidArgument>("KV pool sizing: kv_cache.free_gpu_memory_fraction must be in (0, 1], ",
                           "got ", s.fraction);
  }
  if (s.block_bytes <= 0) {
    raise<InvalidArgument>("KV pool sizing: block_bytes must be > 0, got ", s.block_bytes);
  }
  if (s.min_blocks < 1 || (s.max_blocks > 0 && s.min_blocks > s.max_blocks)) {
    raise<InvalidArgument>("KV pool sizing: min_blocks (", s.min_blocks, ") must be >= 1 and ",
                           "at most max_blocks (", s.max_blocks, ")");
  }
  int64_t reserved = 0;
  const bool overflow = __builtin_add_overflow(s.weights_bytes, s.lora_cache_bytes, &reserved) ||
                        __builtin_add_overflow(reserved, s.workspace_bytes, &reserved);
  if (overflow || reserved >= s.free_bytes) {
    raise<InvalidArgument>(
        "KV pool sizing: the weights (", s.weights_bytes,
        " bytes), the device LoRA cache (lora_cache.device_cache_bytes = ", s.lora_cache_bytes,
        ") and the workspace (", s.workspace_bytes, " bytes) leave nothing of the ", s.free_bytes,
        " bytes of free device memory for the KV pool");
  }
  KvPoolPlan plan;
  plan.available_bytes = s.free_bytes - reserved;
  // long double holds any int64 exactly; the product is below available_bytes (fraction <= 1).
  plan.budget_bytes = std::min(plan.available_bytes,
                               static_cast<int64_t>(std::floor(
                                   static_cast<long double>(plan.available_bytes) * s.fraction)));
  int64_t blocks = plan.budget_bytes / s.block_bytes;
  if (s.max_blocks > 0) blocks = std::min(blocks, s.max_blocks);
  blocks = std::min(blocks, kMaxBlockIds);
  if (blocks < s.min_blocks) {
    raise<InvalidArgument>(
        "KV pool sizing: kv_cache.free_gpu_memory_fraction ", s.fraction, " of the ",
        plan.available_bytes, " bytes left after weights, LoRA cache and workspace is ",
        plan.budget_bytes, " bytes: ", blocks, " KV blocks of ", s.block_bytes,
        " bytes, fewer than the ", s.min_blocks,
        " of one max_seq_len sequence; raise the fraction, or lower max_seq_len or "
        "lora_cache.device_cache_bytes");
  }
  plan.num_blocks = blocks;
  plan.pool_bytes = blocks * s.block_bytes;  // <= budget_bytes: no overflow
  return plan;
}

}  // namespace lorart

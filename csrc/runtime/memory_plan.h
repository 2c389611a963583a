// Sizing of a CUDA runner's KV pool from free device memory (TensorRT-LLM's
// free_gpu_memory_fraction): pure arithmetic on numbers the caller measured (cudaMemGetInfo) and
// computed (weights, the device LoRA cache, the model's workspace), so it is tested on the CPU
// with injected figures. Nothing is allocated or queried here.
#pragma once

#include <cstdint>

namespace lorart {

// What the KV pool is sized from; bytes unless said otherwise.
struct KvPoolSizing {
  int64_t free_bytes = 0;  // free device memory when measured
  // Allocations still to come besides the pool (0 for what is already allocated, and so already
  // outside free_bytes): weights, LoraCacheConfig.device_cache_bytes, the model's workspace.
  int64_t weights_bytes = 0;
  int64_t lora_cache_bytes = 0;
  int64_t workspace_bytes = 0;
  // KvCacheConfig.free_gpu_memory_fraction: the share of what is left after the three above that
  // the pool may take (the rest is headroom: CUDA graphs, library workspaces, fragmentation).
  double fraction = 0.9;
  int64_t block_bytes = 0;  // one KV block: every layer's K and V (KvCache::checked_bytes of 1)
  int64_t min_blocks = 1;   // blocks of one max_seq_len sequence: fewer is an error
  int64_t max_blocks = 0;   // a cap (e.g. from KvCacheConfig.max_tokens); 0 = none
};

struct KvPoolPlan {
  int64_t available_bytes = 0;  // free_bytes - weights - LoRA cache - workspace
  int64_t budget_bytes = 0;     // floor(available_bytes * fraction)
  int64_t num_blocks = 0;       // min(budget / block_bytes, max_blocks, 2^31 - 1)
  int64_t pool_bytes = 0;       // num_blocks * block_bytes
};

// Throws InvalidArgument naming the field for a malformed input (negative bytes, block_bytes <=
// 0, fraction outside (0, 1], min_blocks < 1 or above max_blocks), and naming the figures when
// nothing fits: the other allocations exceed free memory, or the budget holds fewer than
// min_blocks blocks.
KvPoolPlan plan_kv_pool(const KvPoolSizing& sizing);

}  // namespace lorart

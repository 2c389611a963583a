// LoraCacheConfig: the sizes of the LoRA cache's two levels, apart from the cache itself so that
// ExecutorConfig (plain data) does not pull in the cache, the adapters and the model config.
#pragma once

#include <cstdint>

namespace lorart {

struct LoraCacheConfig {
  int64_t host_cache_bytes = int64_t{1} << 30;  // validated LoraWeights copies (cache of record)
  int64_t device_cache_bytes = int64_t{256} << 20;  // LoraAdapters laid out on the model's device
};

}  // namespace lorart

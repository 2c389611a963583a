// How an Executor is sized (names as in DESIGN.md, "Public API"), the limits every size is checked
// against, and the CPU count the executor's threads default to. Plain data; copied freely.
#pragma once

#include <cstdint>
#include <limits>
#include <string>

#include "core/device.h"
#include "executor/lora_cache_config.h"
#include "model/kv_cache.h"
#include "model/model_config.h"

namespace lorart {

struct KvCacheConfig {
  int64_t block_size = 16;
  int64_t max_tokens = 16384;  // pool capacity in tokens (rounded up to whole blocks)
  // Storage dtype of cached keys / values: "float32", "float16", "bfloat16" (rounded to nearest
  // even on write, widened to float32 on read), or "auto" (float32 on the CPU, bfloat16 on CUDA);
  // resolve() turns "auto" into the concrete name.
  std::string dtype = "float32";
  // CUDA: the share of the device memory left free after the weights, the device LoRA cache and
  // the workspace that the KV pool may take (TensorRT-LLM's name), in (0, 1]; the pool is the
  // smaller of this and max_tokens (runtime/memory_plan.h). The CPU backend ignores it.
  double free_gpu_memory_fraction = 0.9;
};

// The KV cache dtype a resolved KvCacheConfig::dtype names ("float32" / "float16" / "bfloat16").
DType kv_cache_dtype(const KvCacheConfig& kv);

struct ExecutorConfig {
  // "cpu", or "cuda" / "cuda:N" (CUDA device N, 0 by default) in a build with the CUDA backend.
  std::string device = "cpu";
  // Storage dtype of the weights: "auto" (the checkpoint's), "float32", "float16", "bfloat16".
  // The loader reads it; an executor checks it against its model's weights.
  std::string dtype = "auto";
  // Matmul precision: "float32" (exact, bitwise the float32 path) or "bfloat16" (activations
  // rounded to bf16, bf16 dot products with float32 sums).
  std::string precision = "float32";
  int64_t max_batch_size = 8;
  int64_t max_num_tokens = 2048;  // tokens one step may run (prefill chunks + decodes)
  // Prompt + generated, per request. 0 = the model's max_position_embeddings, capped at the KV
  // pool's capacity; an explicit value above max_position_embeddings is refused.
  int64_t max_seq_len = 0;
  int64_t max_lora_rank = 64;
  // CPU threads of the executor's forward. 0 = available_cpus() (OMP_NUM_THREADS when set).
  int64_t num_threads = 0;
  LoraCacheConfig lora_cache;
  KvCacheConfig kv_cache;

  // Checks every field on its own (range, and overflow of the sizes derived from it); throws
  // InvalidArgument naming the field and its limit.
  void validate() const;
  // validate(), then the checks that need the model (max_seq_len against its positions, the KV
  // pool and the logits scratch against this machine's memory, the device against this build and
  // machine: DeviceError naming it when there is no CUDA backend or no such GPU). Returns the
  // config an executor runs with: max_seq_len and num_threads resolved (never 0). Nothing is
  // allocated.
  ExecutorConfig resolve(const ModelConfig& model) const;
};

// Limits of ExecutorConfig's fields. Token offsets, positions and block ids are int32 in the
// step's flat arrays and the kernels.
inline constexpr int64_t kMaxInt32 = std::numeric_limits<int32_t>::max();
inline constexpr int64_t kMaxBatchSize = int64_t{1} << 16;
// The KV pool's own limit, so a config it would refuse fails here, before weights load.
inline constexpr int64_t kMaxBlockSize = KvCache::kMaxBlockSize;
inline constexpr int64_t kMaxLoraRank = int64_t{1} << 16;
inline constexpr int64_t kMaxThreads = 1024;

// The Device `name` names ("cpu", "cuda", "cuda:N"); throws InvalidArgument naming `field` for
// anything else. Does not check that the device exists
// (require_device does).
Device parse_device(const std::string& name, const char* field = "ExecutorConfig.device");

// CPUs this process may run on: the affinity mask, capped by a cgroup CPU quota (v2 cpu.max or
// v1 cpu.cfs_quota_us) when one is set. At least 1.
int64_t available_cpus();
// Bytes of physical memory of this machine (the limit of any one host allocation).
int64_t physical_memory_bytes();

}  // namespace lorart

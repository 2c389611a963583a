// LoraCache: the two-level LoRA cache of the seed documents ("fixed size, 2-level LoRA cache …
// host … GPU"). Thread-safe (requests are enqueued from any thread; the scheduler acquires on the
// loop thread).
//
// - Host level (the cache of record): task_id -> the adapter's validated rows in the dtype they
//   arrived in (float32, float16 or bfloat16; never narrowed, so never rounded), bounded by
//   host_cache_bytes. A task is referenced while any queued or running request names it and is
//   then never evicted; otherwise least-recently-used entries are evicted to make room, and an
//   evicted task leaves the device level too.
// - Device level: task_id -> LoraAdapter (same dtype, indexed by layer and module) on the
//   model's device, bounded by device_cache_bytes; always a subset of the host level. On the CPU
//   backend this is a separate pool in host memory behind the same code path. A task is pinned
//   while a running request uses it; eviction takes the least recently used unpinned task; when
//   every resident task is pinned, acquire() says "not now" and the request waits. In-use weights
//   are never evicted.
// - Weights sent again under a cached task id: identical ones (dtype, shape and bytes of weights,
//   embedding-side parts and config) are the same adapter and keep both cached copies; different
//   ones replace the task on both levels when no request references it, and are refused while
//   one does.
// - An adapter's embedding-side parts (its own embed_tokens / lm_head tables, which for a 13B
//   model with a 55,296-token vocabulary are 283 M values each) count in both levels' bytes like
//   its rows; one larger than a whole level is refused with both sizes in the message.
// - DoRA rows: their per-row scales are computed once, at put(), against the base weights (the
//   DoraScales function the owner gives), kept on the host level (counted in its bytes) and
//   copied into each device-level adapter.
#pragma once

#include <cstdint>
#include <functional>
#include <list>
#include <memory>
#include <mutex>
#include <optional>
#include <unordered_map>
#include <vector>

#include "executor/lora_cache_config.h"
#include "lora/lora_tensors.h"
#include "model/lora_adapter.h"
#include "model/model_config.h"

namespace lorart {

struct LoraCacheStats {
  int64_t hits = 0;    // acquire() found the task resident on the device level
  int64_t misses = 0;  // acquire() had to load it from the host level
  int64_t device_evictions = 0;
  int64_t host_evictions = 0;
  int64_t host_bytes = 0;    // bytes held by the host level
  int64_t device_bytes = 0;  // bytes held by the device level
  int64_t host_tasks = 0;
  int64_t device_tasks = 0;
  int64_t replacements = 0;      // tasks whose weights were replaced by different ones
  int64_t referenced_tasks = 0;  // host tasks named by a queued or running request
  int64_t pinned_tasks = 0;      // device tasks in use by a running request
};

class LoraCache {
 public:
  // DoRA's per-row scales of validated rows against the base weights (model/dora.h).
  using DoraScales = std::function<std::vector<float>(const LoraWeights&, const LoraConfig&)>;

  // Without `dora_scales`, adapters with DoRA rows are refused.
  LoraCache(const ModelConfig& model, const LoraCacheConfig& config, int64_t max_lora_rank,
            DoraScales dora_scales = nullptr);

  // Validates (every rule of validate_lora) and stores the task on the host level; for a task
  // already cached, see "Weights sent again" above. With `reference`, also ref()s the task in the
  // same critical section, so no other put() can replace it in between. Throws LoraError when
  // invalid, when the adapter is larger than a whole level (both sizes in the message), when the
  // host level is full of referenced tasks, or when different weights meet a referenced task.
  void put(uint64_t task_id, const LoraWeights& weights, const LoraConfig& config,
           bool reference = false);
  // A queued/running request names the task: keep it on the host level. Throws LoraError
  // "LoRA task <id> not found in cache; …" when the host level does not hold it.
  void ref(uint64_t task_id);
  void unref(uint64_t task_id);

  // Makes the task resident on the device level and pins it. Returns null when the device level
  // has no room that eviction of unpinned tasks could make (the caller retries later).
  std::shared_ptr<const LoraAdapter> acquire(uint64_t task_id);
  void unpin(uint64_t task_id);

  bool contains(uint64_t task_id) const;  // host level
  // The vocabulary of a cached task's requests: its adapter's, or 0 when it keeps the model's.
  // Throws LoraError "not found in cache" when the host level does not hold it.
  int64_t vocab_size(uint64_t task_id) const;
  bool is_on_device(uint64_t task_id) const;  // device level
  LoraCacheStats stats() const;

 private:
  struct HostEntry {
    LoraWeights weights;
    LoraConfig config;
    std::shared_ptr<const std::vector<float>> dora_scales;  // null without DoRA rows
    int64_t bytes;
    int64_t device_bytes;  // LoraAdapter::storage_bytes of these rows
    int64_t refs = 0;
    std::list<uint64_t>::iterator lru;
  };
  struct DeviceEntry {
    std::shared_ptr<const LoraAdapter> adapter;
    int64_t bytes;
    int64_t pins = 0;
    std::list<uint64_t>::iterator lru;
  };
  // Reuses the cached entry when it holds exactly these weights (touch, and ref when asked):
  // reuse_if_unchanged compares outside the lock; reuse_if_same is for callers holding it.
  bool reuse_if_unchanged(uint64_t task_id, const LoraWeights& weights, const LoraConfig& config,
                          bool reference);
  bool reuse_if_same(uint64_t task_id, const LoraWeights& weights, const LoraConfig& config,
                     bool reference);
  bool make_host_room(int64_t bytes);    // evicts LRU unreferenced host entries (and their
                                         // device copies)
  bool make_device_room(int64_t bytes);  // evicts LRU unpinned device entries
  void erase_device(uint64_t task_id);   // drops an unpinned device copy, if any

  const ModelConfig model_;
  const LoraCacheConfig config_;
  const int64_t max_lora_rank_;
  const DoraScales dora_scales_;
  mutable std::mutex mutex_;
  std::unordered_map<uint64_t, HostEntry> host_;
  std::unordered_map<uint64_t, DeviceEntry> device_;
  std::list<uint64_t> host_lru_, device_lru_;  // front = least recently used
  LoraCacheStats stats_;
};

}  // namespace lorart

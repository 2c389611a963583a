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
// - Paged device level (LoraDeviceLevel::paged; what a CUDA executor uses): one allocation of
//   device_cache_bytes / page_bytes pages on the device (LoraPagePool, lora_page_pool.h), each
//   task's pairs packed into its pages, staged in pinned host memory and copied on a copy stream
//   of the cache's own (CopyStream); make_wait() makes the compute stream wait for those copies
//   before the step that reads them. The adapter acquire() returns points into the pages (no
//   storage of its own). A task needing more pages than the pool is refused at put() with both
//   sizes; when the pages it needs cannot be freed by evicting unpinned tasks, acquire() evicts
//   nothing and says "not now". Adapters with embedding-side parts or DoRA rows are refused at
//   put() ("not supported on CUDA yet"). The same level on the CPU (pages in host memory, copies
//   at once) is the stand-in its CPU tests drive.
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

#include "core/buffer.h"
#include "core/copy_stream.h"
#include "core/device.h"
#include "executor/lora_cache_config.h"
#include "executor/lora_page_pool.h"
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

// Where and how the device level keeps its adapters.
struct LoraDeviceLevel {
  // false: each adapter a LoraAdapter of its own in host memory (the CPU backend); true: pages
  // of one allocation on `device` (see "Paged device level" above).
  bool paged = false;
  Device device = Device::cpu();
};

class LoraCache {
 public:
  // DoRA's per-row scales of validated rows against the base weights (model/dora.h).
  using DoraScales = std::function<std::vector<float>(const LoraWeights&, const LoraConfig&)>;

  // Without `dora_scales`, adapters with DoRA rows are refused. A paged `level` allocates its
  // pages here: throws InvalidArgument when device_cache_bytes holds no page (both sizes named),
  // DeviceError / Error when the device or the allocation fails.
  LoraCache(const ModelConfig& model, const LoraCacheConfig& config, int64_t max_lora_rank,
            DoraScales dora_scales = nullptr, LoraDeviceLevel level = {});

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
  // Paged: the adapter's pairs are being copied to its pages on the copy stream; the
  // compute stream must make_wait() before it reads them.
  std::shared_ptr<const LoraAdapter> acquire(uint64_t task_id);
  void unpin(uint64_t task_id);
  // Paged on CUDA: `compute_stream` (a cudaStream_t; null = the legacy default stream) waits, on
  // the device, for every page copy acquire() has queued; the host goes on. A no-op otherwise.
  // Call it before running a step with adapters acquired since the last call.
  void make_wait(void* compute_stream);
  // The paged level (all zero when not paged): its pages' size, its pool's counts, a resident
  // task's pages (empty when not resident) and where page `page` starts on the device.
  int64_t page_bytes() const { return paged_ ? paged_->layout.page_bytes : 0; }
  LoraPagePoolStats page_stats() const;
  std::vector<int32_t> task_pages(uint64_t task_id) const;
  const void* page_address(int32_t page) const;

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
    int64_t device_bytes;  // LoraAdapter::storage_bytes of these rows; paged: of their pages
    LoraPagePlan plan;     // paged: where the rows' pairs go in the task's pages
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
  // acquire() of a task not resident on the paged level.
  std::shared_ptr<const LoraAdapter> acquire_paged(uint64_t task_id, const HostEntry& host);
  void drop_device_entry(uint64_t task_id);  // the entry alone (its pages already freed)

  struct Paged {
    Paged(const LoraPageLayout& layout, int64_t num_pages, Device device);
    LoraPageLayout layout;
    LoraPagePool pool;
    Device device;
    Buffer pages;           // pool.num_pages() * page_bytes on `device`
    StagingBuffer staging;  // the task being copied, page by page; grows to the largest one
    CopyStream copies;
  };

  const ModelConfig model_;
  const LoraCacheConfig config_;
  const int64_t max_lora_rank_;
  const DoraScales dora_scales_;
  std::unique_ptr<Paged> paged_;  // null unless the level is paged
  mutable std::mutex mutex_;
  std::unordered_map<uint64_t, HostEntry> host_;
  std::unordered_map<uint64_t, DeviceEntry> device_;
  std::list<uint64_t> host_lru_, device_lru_;  // front = least recently used
  LoraCacheStats stats_;
};

}  // namespace lorart

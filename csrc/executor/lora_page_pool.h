// The device level of the LoRA cache as a pool of fixed-size pages (the idea of TensorRT-LLM's
// paged PEFT cache): one allocation of num_pages * page_bytes on the model's device, carved into
// pages; a task (adapter) holds a set of pages, any pages, so the pool has no external
// fragmentation, and eviction of one task frees pages another of any size can use.
//
// - LoraPageLayout: the page size for a model and max_lora_rank, and where an adapter's pairs go.
//   A page holds the largest pair the cache can meet (max_lora_rank, float32, the widest module,
//   with DoRA scales), so every pair (A [rank, in] then B^T [rank, out], then its DoRA scales) is
//   contiguous inside one page, as the LoRA kernels read it through one pointer pair. Pairs start
//   on kAlignment-byte boundaries; an adapter's pairs are packed into its pages first-fit
//   decreasing, so mixed ranks and modules share pages and waste is the page tails (below one
//   page per adapter in practice) plus the alignment padding.
// - LoraPagePool: which task holds which pages; LRU eviction of unpinned tasks; pins while
//   requests use a task; refusal when the pool cannot make room. Holds no memory itself (the
//   owner keeps the buffer and places data at offset(page)); not thread-safe (the LoraCache's
//   mutex guards it).
#pragma once

#include <cstdint>
#include <list>
#include <unordered_map>
#include <vector>

#include "core/dtype.h"
#include "kernels/params.h"
#include "lora/lora_target.h"
#include "lora/lora_tensors.h"

namespace lorart {

class ModelConfig;

struct LoraPageLayout {
  static constexpr int64_t kAlignment = 256;  // a pair's start: 16-byte loads, whole sectors

  int64_t page_bytes = 0;  // a multiple of kAlignment

  // Bytes one pair takes in a page: rank * (in + out) values of `dtype`, plus out float32 DoRA
  // scales, rounded up to kAlignment. Throws InvalidArgument on overflow.
  static int64_t pair_bytes(int64_t rank, LoraModuleDims dims, DType dtype, bool dora);
  // Pages that fit the largest pair of any module in `modules` at `max_lora_rank`.
  static LoraPageLayout for_modules(const std::vector<LoraModuleDims>& modules,
                                    int64_t max_lora_rank);
  static LoraPageLayout for_model(const ModelConfig& config, int64_t max_lora_rank);
};

// Where pair i of an adapter goes: the index into the task's page list and the byte offset in it.
struct LoraPairPlacement {
  int32_t page = 0;
  int64_t offset = 0;
};

struct LoraPagePlan {
  int64_t num_pages = 0;
  int64_t used_bytes = 0;                     // sum of the pairs' (aligned) bytes
  std::vector<LoraPairPlacement> placements;  // one per input pair, in input order
};

// Packs pairs of these sizes (each a multiple of kAlignment) into pages of `page_bytes`, largest
// first, each into the first of the task's pages it fits. Throws LoraError naming the pair when
// one is larger than a page.
LoraPagePlan plan_lora_pages(const std::vector<int64_t>& pair_bytes, int64_t page_bytes);
// The plan of a validated adapter's pairs: one placement per row of `lora_config`, in row order,
// each pair_bytes(rank, the row's module dims, dtype, is_dora).
LoraPagePlan plan_lora_pages(const LoraConfig& lora_config, const ModelConfig& config, DType dtype,
                             const LoraPageLayout& layout);

// Writes a validated adapter's pairs in the paged layout and returns its pair table
// ([num_layers * lora_module::kCount], indexed by layer * kCount + module, rank 0 where the
// adapter leaves a module alone) pointing into the task's pages on the device.
// - `staging`: host memory mirroring the task's pages (page j at staging + j * page_bytes,
//   plan.num_pages pages), which the caller then copies to the pages (CopyStream);
// - `device_pages[j]`: the device address of the task's page j (pool base + offset(page)).
// Pair i goes at its placement: A [rank, in] then B^T [rank, out] in the weights' dtype, then,
// for a DoRA row, its `out` float32 scales (from `dora_scales`, in row order, as
// LoraAdapter takes them). Throws LoraError when DoRA rows lack their scales.
std::vector<LoraPair> stage_lora_pages(const LoraWeights& weights, const LoraConfig& lora_config,
                                       const ModelConfig& config,
                                       const std::vector<float>* dora_scales,
                                       const LoraPagePlan& plan, int64_t page_bytes, char* staging,
                                       const std::vector<char*>& device_pages);

struct LoraPagePoolStats {
  int64_t num_pages = 0;
  int64_t used_pages = 0;
  int64_t used_bytes = 0;     // used_pages * page_bytes: what the tasks hold of the pool
  int64_t payload_bytes = 0;  // what the tasks' data fill of those pages
  int64_t evictions = 0;
  int64_t tasks = 0;
  int64_t pinned_tasks = 0;
};

class LoraPagePool {
 public:
  // Throws InvalidArgument unless page_bytes > 0 and 0 < num_pages < 2^31.
  LoraPagePool(int64_t page_bytes, int64_t num_pages);

  // Gives `task` (not resident) `pages` pages and pins it once. Makes room by evicting least
  // recently used unpinned tasks (their ids appended to `evicted`, so the owner drops their
  // data), but only when that makes enough room: otherwise evicts nothing and returns false
  // (every other task is pinned; the caller retries later). Throws LoraError when `pages`
  // exceeds the whole pool, InvalidArgument when the task is already resident or pages < 1.
  bool allocate(uint64_t task, int64_t pages, int64_t payload_bytes,
                std::vector<uint64_t>* evicted);
  // Pins a resident task and marks it most recently used; false when it is not resident.
  bool pin(uint64_t task);
  void unpin(uint64_t task);  // no-op when absent or unpinned
  // Frees an unpinned task's pages; false (nothing freed) when it is absent or pinned.
  bool release(uint64_t task);

  bool contains(uint64_t task) const { return tasks_.count(task) > 0; }
  int64_t pins(uint64_t task) const;
  // The task's pages, in the order the plan's page indices refer to. Throws when absent.
  const std::vector<int32_t>& pages(uint64_t task) const;
  int64_t offset(int32_t page) const { return static_cast<int64_t>(page) * page_bytes_; }
  int64_t page_bytes() const { return page_bytes_; }
  int64_t num_pages() const { return num_pages_; }
  int64_t free_pages() const { return static_cast<int64_t>(free_.size()); }
  LoraPagePoolStats stats() const;

 private:
  struct Task {
    std::vector<int32_t> pages;
    int64_t payload_bytes = 0;
    int64_t pins = 0;
    std::list<uint64_t>::iterator lru;
  };
  void free_task(std::unordered_map<uint64_t, Task>::iterator it);

  const int64_t page_bytes_;
  const int64_t num_pages_;
  std::vector<int32_t> free_;  // free page indices
  std::unordered_map<uint64_t, Task> tasks_;
  std::list<uint64_t> lru_;  // front = least recently used
  int64_t payload_bytes_ = 0;
  int64_t evictions_ = 0;
};

}  // namespace lorart

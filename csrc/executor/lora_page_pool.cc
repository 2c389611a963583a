#include "executor/lora_page_pool.h"

#include <algorithm>
#include <limits>
#include <numeric>

#include "core/checked_math.h"
#include "core/errors.h"
#include "model/model_config.h"

namespace lorart {

int64_t LoraPageLayout::pair_bytes(int64_t rank, LoraModuleDims dims, DType dtype, bool dora) {
  constexpr std::string_view what = "LoRA pair bytes";
  int64_t bytes = checked_mul(checked_mul(rank, checked_add(dims.in, dims.out, what), what),
                              static_cast<int64_t>(dtype_size(dtype)), what);
  if (dora) bytes = checked_add(bytes, checked_mul(dims.out, int64_t{sizeof(float)}, what), what);
  return checked_mul((checked_add(bytes, kAlignment - 1, what)) / kAlignment, kAlignment, what);
}

LoraPageLayout LoraPageLayout::for_modules(const std::vector<LoraModuleDims>& modules,
                                           int64_t max_lora_rank) {
  if (max_lora_rank < 1 || modules.empty()) {
    raise<InvalidArgument>("LoraPageLayout needs max_lora_rank >= 1 and at least one module, got ",
                           max_lora_rank, " and ", modules.size());
  }
  LoraPageLayout layout;
  for (const LoraModuleDims& dims : modules) {
    layout.page_bytes = std::max(layout.page_bytes,
                                 pair_bytes(max_lora_rank, dims, DType::kFloat32, /*dora=*/true));
  }
  return layout;
}

LoraPageLayout LoraPageLayout::for_model(const ModelConfig& config, int64_t max_lora_rank) {
  std::vector<LoraModuleDims> modules;
  for (int32_t id : config.lora_module_ids()) modules.push_back(config.lora_module_dims(id));
  return for_modules(modules, max_lora_rank);
}

LoraPagePlan plan_lora_pages(const std::vector<int64_t>& pair_bytes, int64_t page_bytes) {
  LoraPagePlan plan;
  plan.placements.resize(pair_bytes.size());
  std::vector<size_t> order(pair_bytes.size());
  std::iota(order.begin(), order.end(), size_t{0});
  // Largest first; ties in input order so a plan is a function of its input alone.
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return pair_bytes[a] > pair_bytes[b]; });
  std::vector<int64_t> used;  // bytes used of each of the task's pages
  for (size_t i : order) {
    const int64_t bytes = pair_bytes[i];
    if (bytes < 0 || bytes > page_bytes || bytes % LoraPageLayout::kAlignment != 0) {
      raise<LoraError>("LoRA pair ", i, " needs ", bytes, " bytes; a page holds ", page_bytes,
                       " (pairs are multiples of ", LoraPageLayout::kAlignment, " bytes)");
    }
    size_t page = 0;
    while (page < used.size() && used[page] + bytes > page_bytes) ++page;
    if (page == used.size()) used.push_back(0);
    plan.placements[i] = {static_cast<int32_t>(page), used[page]};
    used[page] += bytes;
    plan.used_bytes += bytes;
  }
  plan.num_pages = static_cast<int64_t>(used.size());
  return plan;
}

LoraPagePlan plan_lora_pages(const LoraConfig& lora_config, const ModelConfig& config, DType dtype,
                             const LoraPageLayout& layout) {
  std::vector<int64_t> bytes(static_cast<size_t>(lora_config.num_rows()));
  for (int64_t i = 0; i < lora_config.num_rows(); ++i) {
    const LoraConfigRow row = lora_config.row(i);
    bytes[i] = LoraPageLayout::pair_bytes(row.adapter_size, config.lora_module_dims(row.module_id),
                                          dtype, row.is_dora != 0);
  }
  return plan_lora_pages(bytes, layout.page_bytes);
}

LoraPagePool::LoraPagePool(int64_t page_bytes, int64_t num_pages)
    : page_bytes_(page_bytes), num_pages_(num_pages) {
  if (page_bytes <= 0 || num_pages <= 0 || num_pages > std::numeric_limits<int32_t>::max()) {
    raise<InvalidArgument>("LoraPagePool needs page_bytes > 0 and 0 < num_pages <= ",
                           std::numeric_limits<int32_t>::max(), ", got ", page_bytes, " and ",
                           num_pages);
  }
  free_.resize(static_cast<size_t>(num_pages));
  // Popped from the back: the lowest pages go first, so a fresh pool fills from its start.
  for (int64_t i = 0; i < num_pages; ++i) free_[i] = static_cast<int32_t>(num_pages - 1 - i);
}

bool LoraPagePool::allocate(uint64_t task, int64_t pages, int64_t payload_bytes,
                            std::vector<uint64_t>* evicted) {
  if (pages < 1 || contains(task)) {
    raise<InvalidArgument>("LoraPagePool::allocate: task ", task,
                           contains(task) ? " is already resident" : " asks for no pages");
  }
  if (pages > num_pages_) {
    raise<LoraError>("LoRA task ", task, " needs ", pages, " pages of ", page_bytes_,
                     " bytes, more than the whole device level (", num_pages_, " pages)");
  }
  // Evict only when it suffices: an eviction that still leaves the task out would drop a cached
  // adapter for nothing.
  int64_t reclaimable = free_pages();
  for (uint64_t id : lru_) {
    if (reclaimable >= pages) break;
    const Task& t = tasks_.at(id);
    if (t.pins == 0) reclaimable += static_cast<int64_t>(t.pages.size());
  }
  if (reclaimable < pages) return false;
  for (auto it = lru_.begin(); free_pages() < pages;) {
    auto entry = tasks_.find(*it);
    if (entry->second.pins > 0) {
      ++it;
      continue;
    }
    if (evicted != nullptr) evicted->push_back(*it);
    ++evictions_;
    ++it;  // free_task erases the entry's lru node
    free_task(entry);
  }
  Task t;
  t.pages.assign(free_.end() - pages, free_.end());
  std::reverse(t.pages.begin(), t.pages.end());
  free_.resize(free_.size() - static_cast<size_t>(pages));
  t.payload_bytes = payload_bytes;
  t.pins = 1;
  lru_.push_back(task);
  t.lru = std::prev(lru_.end());
  payload_bytes_ += payload_bytes;
  tasks_.emplace(task, std::move(t));
  return true;
}

void LoraPagePool::free_task(std::unordered_map<uint64_t, Task>::iterator it) {
  free_.insert(free_.end(), it->second.pages.rbegin(), it->second.pages.rend());
  payload_bytes_ -= it->second.payload_bytes;
  lru_.erase(it->second.lru);
  tasks_.erase(it);
}

bool LoraPagePool::pin(uint64_t task) {
  auto it = tasks_.find(task);
  if (it == tasks_.end()) return false;
  ++it->second.pins;
  lru_.splice(lru_.end(), lru_, it->second.lru);
  return true;
}

void LoraPagePool::unpin(uint64_t task) {
  auto it = tasks_.find(task);
  if (it != tasks_.end() && it->second.pins > 0) --it->second.pins;
}

bool LoraPagePool::release(uint64_t task) {
  auto it = tasks_.find(task);
  if (it == tasks_.end() || it->second.pins > 0) return false;
  free_task(it);
  return true;
}

int64_t LoraPagePool::pins(uint64_t task) const {
  auto it = tasks_.find(task);
  return it == tasks_.end() ? 0 : it->second.pins;
}

const std::vector<int32_t>& LoraPagePool::pages(uint64_t task) const {
  auto it = tasks_.find(task);
  if (it == tasks_.end()) raise<InvalidArgument>("LoraPagePool: task ", task, " is not resident");
  return it->second.pages;
}

LoraPagePoolStats LoraPagePool::stats() const {
  LoraPagePoolStats s;
  s.num_pages = num_pages_;
  s.used_pages = num_pages_ - free_pages();
  s.used_bytes = s.used_pages * page_bytes_;
  s.payload_bytes = payload_bytes_;
  s.evictions = evictions_;
  s.tasks = static_cast<int64_t>(tasks_.size());
  for (const auto& [id, t] : tasks_) s.pinned_tasks += t.pins > 0;
  return s;
}

}  // namespace lorart

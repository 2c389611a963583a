#include "executor/lora_page_pool.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <numeric>

#include "core/checked_math.h"
#include "core/errors.h"
#include "lora/module_ids.h"
#include "model/model_config.h"

namespace lorart {

int64_t LoraPageLayout::pair_bytes(int64_t rank, LoraModuleDims dims, DType dtype, bool dora) {
  constexpr std::string_view what = "LoRA pair bytes";
  int64_t bytes = checked_mul(checked_mul(rank, checked_add(dims.in, dims.out, what), what),
                              static_cast<int64_t>(dtype_size(dtype)), what);
  if (dora) {  // float32 scales after B^T, 4-byte aligned
    bytes = checked_add((checked_add(bytes, 3, what)) / 4 * 4,
                        checked_mul(dims.out, int64_t{sizeof(float)}, what), what);
  }
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

std::vector<LoraPair> stage_lora_pages(const LoraWeights& weights, const LoraConfig& lora_config,
                                       const ModelConfig& config,
                                       const std::vector<float>* dora_scales,
                                       const LoraPagePlan& plan, int64_t page_bytes, char* staging,
                                       const std::vector<char*>& device_pages) {
  if (static_cast<int64_t>(plan.placements.size()) != lora_config.num_rows() ||
      static_cast<int64_t>(device_pages.size()) != plan.num_pages) {
    raise<InvalidArgument>("stage_lora_pages: a plan of ", plan.placements.size(), " pairs on ",
                           plan.num_pages, " pages for ", lora_config.num_rows(), " rows on ",
                           device_pages.size(), " pages");
  }
  int64_t dora_values = 0;
  for (int64_t i = 0; i < lora_config.num_rows(); ++i) {
    const LoraConfigRow row = lora_config.row(i);
    if (row.is_dora != 0) dora_values += config.lora_module_dims(row.module_id).out;
  }
  if (dora_values > 0 &&
      (dora_scales == nullptr || static_cast<int64_t>(dora_scales->size()) != dora_values)) {
    raise<LoraError>("the adapter has DoRA rows: it needs their ", dora_values, " scales, got ",
                     dora_scales == nullptr ? 0 : dora_scales->size());
  }
  const DType dtype = weights.dtype();
  const size_t size = dtype_size(dtype);
  const auto* rows = static_cast<const char*>(weights.tensor().data());
  std::vector<LoraPair> table(static_cast<size_t>(config.num_layers) * lora_module::kCount);
  int64_t dora_offset = 0;
  for (int64_t i = 0; i < lora_config.num_rows(); ++i) {
    const LoraConfigRow row = lora_config.row(i);
    const LoraModuleDims dims = config.lora_module_dims(row.module_id);
    const int64_t rank = row.adapter_size;
    const LoraPairPlacement& at = plan.placements[i];
    const int64_t bytes = LoraPageLayout::pair_bytes(rank, dims, dtype, row.is_dora != 0);
    if (at.page < 0 || at.page >= plan.num_pages || at.offset < 0 ||
        at.offset + bytes > page_bytes) {
      raise<InvalidArgument>("stage_lora_pages: pair ", i, " placed outside its page");
    }
    char* dst = staging + at.page * page_bytes + at.offset;
    char* device = device_pages[at.page] + at.offset;
    const char* a = rows + i * weights.row_size() * size;  // A [rank, in] then B [out, rank]
    const size_t a_bytes = static_cast<size_t>(rank * dims.in) * size;
    const size_t b_bytes = static_cast<size_t>(rank * dims.out) * size;
    std::memcpy(dst, a, a_bytes);
    const char* b = a + a_bytes;
    char* b_t = dst + a_bytes;
    for (int64_t o = 0; o < dims.out; ++o) {  // B^T [rank, out] = B [out, rank]^T
      for (int64_t r = 0; r < rank; ++r) {
        std::memcpy(b_t + (r * dims.out + o) * size, b + (o * rank + r) * size, size);
      }
    }
    LoraPair& pair = table[row.layer_idx * lora_module::kCount + row.module_id];
    pair.a = device;
    pair.b_t = device + a_bytes;
    pair.dtype = dtype;
    pair.rank = row.adapter_size;
    if (row.is_dora != 0) {
      // float32 scales right after B^T, 4-byte aligned (the pair starts 256-byte aligned and
      // a_bytes + b_bytes is a multiple of the element size; round up for 16-bit elements).
      const size_t scale_at = (a_bytes + b_bytes + 3) / 4 * 4;
      std::memcpy(dst + scale_at, dora_scales->data() + dora_offset,
                  static_cast<size_t>(dims.out) * sizeof(float));
      pair.dora_scale = reinterpret_cast<const float*>(device + scale_at);
      dora_offset += dims.out;
    }
  }
  return table;
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

#include "executor/lora_cache.h"

#include <algorithm>
#include <cstring>
#include <utility>

#include "core/errors.h"
#include "lora/lora_validation.h"

namespace lorart {

namespace {

[[noreturn]] void not_found(uint64_t task_id) {
  raise<LoraError>("LoRA task ", task_id,
                   " not found in cache; send lora_weights and lora_config with the request");
}

// Evicts the least recently used entries that `in_use(id, entry)` does not protect until `bytes`
// more fit within `budget`; true when they fit. `on_evict(id)` runs before each erase. One rule
// for both levels. `used <= budget` always holds, so `budget - used` cannot overflow.
template <class Entries, class InUse, class OnEvict>
bool evict_lru(Entries& entries, std::list<uint64_t>& lru, int64_t& used, int64_t budget,
               int64_t bytes, int64_t& evictions, InUse in_use, OnEvict on_evict) {
  for (auto it = lru.begin(); bytes > budget - used && it != lru.end();) {
    const auto& entry = entries.at(*it);
    if (in_use(*it, entry)) {
      ++it;
      continue;
    }
    used -= entry.bytes;
    ++evictions;
    on_evict(*it);
    entries.erase(*it);
    it = lru.erase(it);
  }
  return bytes <= budget - used;
}

bool same_bytes(const Tensor& a, const Tensor& b) {
  return a.dtype() == b.dtype() && a.dim() == b.dim() && a.size(0) == b.size(0) &&
         a.size(1) == b.size(1) &&
         (a.nbytes() == 0 || std::memcmp(a.data(), b.data(), a.nbytes()) == 0);
}

bool has_dora_rows(const LoraConfig& config) {
  for (int64_t i = 0; i < config.num_rows(); ++i) {
    if (config.row(i).is_dora != 0) return true;
  }
  return false;
}

// What the paged level cannot hold yet: the CUDA forward reads its pairs alone, and DoRA's
// scales are computed by an op with no CUDA kernel.
void refuse_on_paged_level(uint64_t task_id, const LoraWeights& weights, const LoraConfig& config) {
  if (weights.embeddings() != nullptr) {
    raise<LoraError>("LoRA task ", task_id, " brings embedding-side parts (its own embed_tokens / ",
                     "lm_head or an embedding / lm_head LoRA): not supported on CUDA yet");
  }
  if (has_dora_rows(config)) {
    raise<LoraError>("LoRA task ", task_id, " has DoRA rows: not supported on CUDA yet");
  }
}

}  // namespace

LoraCache::Paged::Paged(const LoraPageLayout& page_layout, int64_t num_pages, Device on)
    : layout(page_layout),
      pool(page_layout.page_bytes, num_pages),
      device(on),
      // num_pages * page_bytes <= device_cache_bytes: no overflow.
      pages(Buffer::allocate(static_cast<size_t>(num_pages * page_layout.page_bytes), on,
                             "the LoRA cache's device pages")),
      copies(on) {}

LoraCache::LoraCache(const ModelConfig& model, const LoraCacheConfig& config, int64_t max_lora_rank,
                     DoraScales dora_scales, LoraDeviceLevel level)
    : model_(model),
      config_(config),
      max_lora_rank_(max_lora_rank),
      dora_scales_(std::move(dora_scales)) {
  if (config.host_cache_bytes <= 0 || config.device_cache_bytes <= 0) {
    raise<InvalidArgument>("LoraCacheConfig: host_cache_bytes and device_cache_bytes must be > 0, ",
                           "got ", config.host_cache_bytes, " and ", config.device_cache_bytes);
  }
  if (level.paged) {
    const LoraPageLayout layout = LoraPageLayout::for_model(model, max_lora_rank);
    const int64_t num_pages = config.device_cache_bytes / layout.page_bytes;
    if (num_pages < 1) {
      raise<InvalidArgument>(
          "LoraCacheConfig.device_cache_bytes = ", config.device_cache_bytes,
          " holds no LoRA page of ", layout.page_bytes, " bytes (a page fits one float32 pair of ",
          "max_lora_rank = ", max_lora_rank, " for the widest module, with DoRA scales); raise ",
          "device_cache_bytes to at least ", layout.page_bytes);
    }
    paged_ = std::make_unique<Paged>(layout, num_pages, level.device);
  }
}

bool LoraCache::reuse_if_same(uint64_t task_id, const LoraWeights& weights,
                              const LoraConfig& config, bool reference) {
  auto it = host_.find(task_id);
  if (it == host_.end() || !it->second.weights.same_as(weights) ||
      !same_bytes(it->second.config.tensor(), config.tensor())) {
    return false;
  }
  if (reference) ++it->second.refs;
  host_lru_.splice(host_lru_.end(), host_lru_, it->second.lru);
  return true;
}

bool LoraCache::reuse_if_unchanged(uint64_t task_id, const LoraWeights& weights,
                                   const LoraConfig& config, bool reference) {
  std::optional<LoraWeights> cached;
  std::optional<LoraConfig> cached_config;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = host_.find(task_id);
    if (it == host_.end()) return false;
    cached = it->second.weights;  // shares the entry's memory
    cached_config = it->second.config;
  }
  // Compared outside the lock: an adapter's tables can be gigabytes, and the loop thread's
  // acquire() and unpin() take this lock every step.
  if (!cached->same_as(weights) || !same_bytes(cached_config->tensor(), config.tensor())) {
    return false;
  }
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = host_.find(task_id);
  if (it == host_.end() || it->second.weights.tensor().data() != cached->tensor().data()) {
    return false;  // evicted or replaced meanwhile: stored anew by the caller
  }
  if (reference) ++it->second.refs;
  host_lru_.splice(host_lru_.end(), host_lru_, it->second.lru);
  return true;
}

void LoraCache::put(uint64_t task_id, const LoraWeights& weights, const LoraConfig& config,
                    bool reference) {
  // Weights sent again, unchanged (every request of a client that always sends them).
  if (reuse_if_unchanged(task_id, weights, config, reference)) return;
  if (static_cast<int64_t>(weights.nbytes()) > config_.host_cache_bytes) {  // before any copy
    raise<LoraError>("LoRA task ", task_id, " needs at least ", weights.nbytes(),
                     " bytes, more than the whole host level (host_cache_bytes = ",
                     config_.host_cache_bytes, ")");
  }
  // Copy, then validate the copies, outside the lock (both are O(adapter size)); the caller's
  // arrays may change under a borrowed view once validated.
  LoraConfig config_copy = LoraConfig::copy_of(config.tensor());
  LoraWeights copy = weights.copy();
  validate_lora(&copy, &config_copy, model_.lora_target(),
                LoraLimits{max_lora_rank_, std::nullopt});
  LoraPagePlan plan;
  int64_t device_bytes = 0;
  if (paged_) {
    refuse_on_paged_level(task_id, copy, config_copy);
    // The layout and the pool's size are fixed at construction: read without the lock.
    const int64_t page_bytes = paged_->layout.page_bytes;
    const int64_t pool_pages = paged_->pool.num_pages();
    plan = plan_lora_pages(config_copy, model_, copy.dtype(), paged_->layout);
    if (plan.num_pages > pool_pages) {
      raise<LoraError>("LoRA task ", task_id, " needs ", plan.num_pages, " pages of ", page_bytes,
                       " bytes (", plan.num_pages * page_bytes, " bytes) on the device level, ",
                       "more than all of it (", pool_pages, " pages, ", pool_pages * page_bytes,
                       " bytes, from device_cache_bytes = ", config_.device_cache_bytes, ")");
    }
    device_bytes = plan.num_pages * page_bytes;  // <= the pool's bytes
  } else {
    device_bytes = LoraAdapter::storage_bytes(copy, config_copy, model_);
    if (device_bytes > config_.device_cache_bytes) {
      raise<LoraError>("LoRA task ", task_id, " needs ", device_bytes,
                       " bytes on the device level, more than all of it (device_cache_bytes = ",
                       config_.device_cache_bytes, ")");
    }
  }
  std::shared_ptr<const std::vector<float>> dora;
  if (has_dora_rows(config_copy)) {
    if (!dora_scales_) {
      raise<LoraError>("LoRA task ", task_id, " has DoRA rows, which this cache cannot compute ",
                       "(it has no base weights to take the row norms against)");
    }
    dora = std::make_shared<const std::vector<float>>(dora_scales_(copy, config_copy));
  }
  const auto host_bytes =
      static_cast<int64_t>(copy.nbytes() + (dora ? dora->size() * sizeof(float) : 0));
  if (host_bytes > config_.host_cache_bytes) {
    raise<LoraError>("LoRA task ", task_id, " needs ", host_bytes,
                     " bytes, more than the whole host level (host_cache_bytes = ",
                     config_.host_cache_bytes, ")");
  }

  std::lock_guard<std::mutex> lock(mutex_);
  if (reuse_if_same(task_id, copy, config_copy, reference)) return;  // another put() won
  auto it = host_.find(task_id);
  if (it != host_.end()) {
    auto resident = device_.find(task_id);
    const int64_t pins = resident == device_.end() ? 0 : resident->second.pins;
    if (it->second.refs > 0 || pins > 0) {
      raise<LoraError>("LoRA task ", task_id, " is in use by ", it->second.refs,
                       " queued or running request(s) with different weights; send these under "
                       "a new task id, or again once those requests finish");
    }
    // Nobody uses the old adapter: the new weights replace it on both levels.
    erase_device(task_id);
    stats_.host_bytes -= it->second.bytes;
    ++stats_.replacements;
    host_lru_.erase(it->second.lru);
    host_.erase(it);
  }
  if (!make_host_room(host_bytes)) {
    raise<LoraError>("LoRA task ", task_id, " needs ", host_bytes, " bytes but the host level (",
                     config_.host_cache_bytes, " bytes) is full of adapters that queued or ",
                     "running requests use; retry when they finish or raise host_cache_bytes");
  }
  host_lru_.push_back(task_id);
  host_.emplace(task_id, HostEntry{std::move(copy), std::move(config_copy), std::move(dora),
                                   host_bytes, device_bytes, std::move(plan), reference ? 1 : 0,
                                   std::prev(host_lru_.end())});
  stats_.host_bytes += host_bytes;
}

bool LoraCache::make_host_room(int64_t bytes) {
  return evict_lru(
      host_, host_lru_, stats_.host_bytes, config_.host_cache_bytes, bytes, stats_.host_evictions,
      [&](uint64_t id, const HostEntry& entry) {
        auto resident = device_.find(id);
        return entry.refs > 0 || (resident != device_.end() && resident->second.pins > 0);
      },
      [&](uint64_t id) { erase_device(id); });
}

void LoraCache::erase_device(uint64_t task_id) {
  auto it = device_.find(task_id);
  if (it == device_.end() || it->second.pins > 0) return;
  if (paged_) paged_->pool.release(task_id);
  drop_device_entry(task_id);
}

void LoraCache::drop_device_entry(uint64_t task_id) {
  auto it = device_.find(task_id);
  if (it == device_.end()) return;
  stats_.device_bytes -= it->second.bytes;
  ++stats_.device_evictions;
  device_lru_.erase(it->second.lru);
  device_.erase(it);
}

void LoraCache::ref(uint64_t task_id) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = host_.find(task_id);
  if (it == host_.end()) not_found(task_id);
  ++it->second.refs;
  host_lru_.splice(host_lru_.end(), host_lru_, it->second.lru);
}

void LoraCache::unref(uint64_t task_id) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = host_.find(task_id);
  if (it != host_.end() && it->second.refs > 0) --it->second.refs;
}

std::shared_ptr<const LoraAdapter> LoraCache::acquire(uint64_t task_id) {
  std::unique_lock<std::mutex> lock(mutex_);
  auto resident = device_.find(task_id);
  if (resident != device_.end()) {
    ++stats_.hits;
    ++resident->second.pins;
    device_lru_.splice(device_lru_.end(), device_lru_, resident->second.lru);
    if (paged_) paged_->pool.pin(task_id);
    return resident->second.adapter;
  }
  auto host = host_.find(task_id);
  if (host == host_.end()) not_found(task_id);
  if (paged_) return acquire_paged(task_id, host->second);
  const int64_t bytes = host->second.device_bytes;
  if (!make_device_room(bytes)) return nullptr;
  ++stats_.misses;
  // The host->device copy runs under the lock so the host entry cannot be replaced or evicted
  // meanwhile; it copies one adapter, the size of which put() already bounded.
  auto adapter = std::make_shared<const LoraAdapter>(LoraAdapter::from_validated(
      host->second.weights, host->second.config, model_, host->second.dora_scales.get()));
  device_lru_.push_back(task_id);
  device_.emplace(task_id, DeviceEntry{adapter, bytes, 1, std::prev(device_lru_.end())});
  stats_.device_bytes += bytes;
  return adapter;
}

std::shared_ptr<const LoraAdapter> LoraCache::acquire_paged(uint64_t task_id,
                                                            const HostEntry& host) {
  Paged& p = *paged_;
  const LoraPagePlan& plan = host.plan;
  std::vector<uint64_t> evicted;
  // The pool evicts only when that makes room; the ids it evicted leave the device level.
  if (!p.pool.allocate(task_id, plan.num_pages, plan.used_bytes, &evicted)) return nullptr;
  for (uint64_t id : evicted) drop_device_entry(id);
  ++stats_.misses;
  std::shared_ptr<const LoraAdapter> adapter;
  try {
    const std::vector<int32_t>& pages = p.pool.pages(task_id);
    const int64_t page_bytes = p.layout.page_bytes;
    const auto bytes = static_cast<size_t>(plan.num_pages * page_bytes);
    // The last task's copies read the staging memory: they must be done before it is rewritten.
    // The pages themselves are free: an evicted task was unpinned, so no sequence of the coming
    // step reads it, and the runner's previous step has finished (run() waits for its logits).
    p.copies.wait();
    if (p.staging.size() < bytes) {
      const size_t grown = std::min(std::max(bytes, p.staging.size() * 2), p.pages.size());
      p.staging = StagingBuffer();  // page-locked memory is scarce: free the old one first
      p.staging = StagingBuffer(grown, p.device);
    }
    char* staging = static_cast<char*>(p.staging.data());
    char* base = static_cast<char*>(p.pages.data());
    std::vector<char*> device_pages(pages.size());
    for (size_t j = 0; j < pages.size(); ++j) device_pages[j] = base + p.pool.offset(pages[j]);
    std::vector<LoraPair> table =
        stage_lora_pages(host.weights, host.config, model_, host.dora_scales.get(), plan,
                         page_bytes, staging, device_pages);
    // Pages the pool handed out in a row (a fresh pool's are) go over in one copy.
    for (size_t j = 0; j < pages.size();) {
      size_t end = j + 1;
      while (end < pages.size() && pages[end] == pages[end - 1] + 1) ++end;
      p.copies.copy(device_pages[j], staging + j * page_bytes, (end - j) * page_bytes);
      j = end;
    }
    p.copies.record();
    adapter = std::make_shared<const LoraAdapter>(
        LoraAdapter::on_pages(model_, std::move(table), host.weights.dtype(), p.device));
  } catch (...) {
    p.pool.unpin(task_id);
    p.pool.release(task_id);
    throw;
  }
  device_lru_.push_back(task_id);
  device_.emplace(task_id,
                  DeviceEntry{adapter, host.device_bytes, 1, std::prev(device_lru_.end())});
  stats_.device_bytes += host.device_bytes;
  return adapter;
}

void LoraCache::make_wait(void* compute_stream) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (paged_) paged_->copies.make_wait(compute_stream);
}

LoraPagePoolStats LoraCache::page_stats() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return paged_ ? paged_->pool.stats() : LoraPagePoolStats{};
}

std::vector<int32_t> LoraCache::task_pages(uint64_t task_id) const {
  std::lock_guard<std::mutex> lock(mutex_);
  if (!paged_ || !paged_->pool.contains(task_id)) return {};
  return paged_->pool.pages(task_id);
}

const void* LoraCache::page_address(int32_t page) const {
  if (!paged_ || page < 0 || page >= paged_->pool.num_pages()) return nullptr;
  return static_cast<const char*>(paged_->pages.data()) + paged_->pool.offset(page);
}

bool LoraCache::make_device_room(int64_t bytes) {
  return evict_lru(
      device_, device_lru_, stats_.device_bytes, config_.device_cache_bytes, bytes,
      stats_.device_evictions, [](uint64_t, const DeviceEntry& entry) { return entry.pins > 0; },
      [](uint64_t) {});
}

void LoraCache::unpin(uint64_t task_id) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = device_.find(task_id);
  if (it != device_.end() && it->second.pins > 0) {
    --it->second.pins;
    if (paged_) paged_->pool.unpin(task_id);
  }
}

bool LoraCache::contains(uint64_t task_id) const {
  std::lock_guard<std::mutex> lock(mutex_);
  return host_.count(task_id) > 0;
}

int64_t LoraCache::vocab_size(uint64_t task_id) const {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = host_.find(task_id);
  if (it == host_.end()) not_found(task_id);
  const LoraEmbeddings* parts = it->second.weights.embeddings();
  return parts != nullptr ? parts->vocab_size() : 0;
}

bool LoraCache::is_on_device(uint64_t task_id) const {
  std::lock_guard<std::mutex> lock(mutex_);
  return device_.count(task_id) > 0;
}

LoraCacheStats LoraCache::stats() const {
  std::lock_guard<std::mutex> lock(mutex_);
  LoraCacheStats out = stats_;
  out.host_tasks = static_cast<int64_t>(host_.size());
  out.device_tasks = static_cast<int64_t>(device_.size());
  for (const auto& [id, entry] : host_) out.referenced_tasks += entry.refs > 0;
  for (const auto& [id, entry] : device_) out.pinned_tasks += entry.pins > 0;
  return out;
}

}  // namespace lorart

#include "executor/lora_cache.h"

#include <cstring>

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

}  // namespace

LoraCache::LoraCache(const ModelConfig& model, const LoraCacheConfig& config, int64_t max_lora_rank,
                     DoraScales dora_scales)
    : model_(model),
      config_(config),
      max_lora_rank_(max_lora_rank),
      dora_scales_(std::move(dora_scales)) {
  if (config.host_cache_bytes <= 0 || config.device_cache_bytes <= 0) {
    raise<InvalidArgument>("LoraCacheConfig: host_cache_bytes and device_cache_bytes must be > 0, ",
                           "got ", config.host_cache_bytes, " and ", config.device_cache_bytes);
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
  const int64_t device_bytes = LoraAdapter::storage_bytes(copy, config_copy, model_);
  if (device_bytes > config_.device_cache_bytes) {
    raise<LoraError>("LoRA task ", task_id, " needs ", device_bytes,
                     " bytes on the device level, more than all of it (device_cache_bytes = ",
                     config_.device_cache_bytes, ")");
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
  host_.emplace(task_id,
                HostEntry{std::move(copy), std::move(config_copy), std::move(dora), host_bytes,
                          device_bytes, reference ? 1 : 0, std::prev(host_lru_.end())});
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
    return resident->second.adapter;
  }
  auto host = host_.find(task_id);
  if (host == host_.end()) not_found(task_id);
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

bool LoraCache::make_device_room(int64_t bytes) {
  return evict_lru(
      device_, device_lru_, stats_.device_bytes, config_.device_cache_bytes, bytes,
      stats_.device_evictions, [](uint64_t, const DeviceEntry& entry) { return entry.pins > 0; },
      [](uint64_t) {});
}

void LoraCache::unpin(uint64_t task_id) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = device_.find(task_id);
  if (it != device_.end() && it->second.pins > 0) --it->second.pins;
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

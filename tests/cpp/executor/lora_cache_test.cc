#include "executor/lora_cache.h"

#include <gtest/gtest.h>

#include <limits>
#include <string>
#include <vector>

#include "core/errors.h"
#include "test_util.h"

namespace lorart {
namespace {

using testing_util::expect_error;

// hidden 8, 2 layers: an attn_q row of rank r holds r*8 + 8*r = 16r values.
ModelConfig tiny_model() { return testing_util::llama_config(16, 8, 16, 2, 2, 2, 4); }

struct Adapter {
  LoraWeights weights;
  LoraConfig config;
};

// One attn_q row of rank `rank` filled with `value`: 16 * rank floats = 64 * rank bytes.
Adapter adapter(int32_t rank, float value = 0.5f) {
  std::vector<float> values(16 * rank, value);
  LoraWeights w = LoraWeights::copy_of(
      Tensor(values.data(), DType::kFloat32, {1, static_cast<int64_t>(values.size())}));
  return {w, LoraConfig::from_rows({{1, 0, rank}})};
}

// A cache whose device level holds exactly `device_adapters` rank-1 adapters (64 bytes each).
LoraCache cache(int64_t device_adapters, int64_t host_adapters = 100) {
  return LoraCache(tiny_model(), LoraCacheConfig{host_adapters * 64, device_adapters * 64}, 8);
}

TEST(LoraCacheTest, PutThenAcquireMissThenHit) {
  LoraCache c = cache(2);
  const Adapter a = adapter(1);
  c.put(7, a.weights, a.config);
  EXPECT_TRUE(c.contains(7));
  EXPECT_FALSE(c.is_on_device(7));
  auto first = c.acquire(7);
  ASSERT_NE(first, nullptr);
  EXPECT_TRUE(c.is_on_device(7));
  EXPECT_EQ(first->pair(0, 1).rank, 1);
  EXPECT_EQ(static_cast<const float*>(first->pair(0, 1).a)[3], 0.5f);
  EXPECT_EQ(first->pair(1, 1).rank, 0);
  auto second = c.acquire(7);
  EXPECT_EQ(second, first);
  const LoraCacheStats s = c.stats();
  EXPECT_EQ(s.misses, 1);
  EXPECT_EQ(s.hits, 1);
  EXPECT_EQ(s.device_bytes, 64);
  EXPECT_EQ(s.host_bytes, 64);
}

TEST(LoraCacheTest, EvictsLeastRecentlyUsedUnpinned) {
  LoraCache c = cache(2);
  for (uint64_t id : {1, 2, 3}) {
    const Adapter a = adapter(1, static_cast<float>(id));
    c.put(id, a.weights, a.config);
  }
  ASSERT_NE(c.acquire(1), nullptr);
  ASSERT_NE(c.acquire(2), nullptr);
  c.unpin(1);
  c.unpin(2);
  ASSERT_NE(c.acquire(1), nullptr);  // 1 becomes most recent; 2 is now the LRU
  c.unpin(1);
  ASSERT_NE(c.acquire(3), nullptr);
  EXPECT_TRUE(c.is_on_device(1));
  EXPECT_FALSE(c.is_on_device(2));
  EXPECT_TRUE(c.is_on_device(3));
  EXPECT_EQ(c.stats().device_evictions, 1);
  EXPECT_TRUE(c.contains(2));  // still on the host level
}

TEST(LoraCacheTest, PinnedTasksAreNeverEvictedAndNewOnesWait) {
  LoraCache c = cache(2);
  for (uint64_t id : {1, 2, 3}) {
    const Adapter a = adapter(1);
    c.put(id, a.weights, a.config);
  }
  auto one = c.acquire(1);
  auto two = c.acquire(2);
  EXPECT_EQ(c.acquire(3), nullptr);  // full of pinned tasks: wait
  EXPECT_TRUE(c.is_on_device(1));
  EXPECT_TRUE(c.is_on_device(2));
  EXPECT_EQ(c.stats().device_evictions, 0);
  c.unpin(2);
  ASSERT_NE(c.acquire(3), nullptr);
  EXPECT_FALSE(c.is_on_device(2));
  EXPECT_EQ(one->pair(0, 1).rank, 1);  // the pinned adapter's memory is intact
}

TEST(LoraCacheTest, UnknownTaskMessage) {
  LoraCache c = cache(2);
  const std::string message =
      "LoRA task 42 not found in cache; send lora_weights and lora_config with the request";
  expect_error<LoraError>([&] { c.acquire(42); }, message);
  expect_error<LoraError>([&] { c.ref(42); }, message);
}

TEST(LoraCacheTest, AdapterLargerThanALevelIsRejectedWithBothSizes) {
  LoraCache c = cache(2, 3);       // device 128 bytes, host 192 bytes
  const Adapter big = adapter(4);  // 256 bytes
  expect_error<LoraError>([&] { c.put(1, big.weights, big.config); },
                          "LoRA task 1 needs at least 256 bytes, more than the whole host level "
                          "(host_cache_bytes = 192)");
  LoraCache wide_host = cache(2, 10);
  const Adapter three = adapter(3);  // 192 bytes > 128 device bytes
  expect_error<LoraError>([&] { wide_host.put(1, three.weights, three.config); },
                          "needs 192 bytes on the device level, more than all of it "
                          "(device_cache_bytes = 128)");
  EXPECT_FALSE(wide_host.contains(1));
}

TEST(LoraCacheTest, InvalidAdapterIsRejectedAndNotStored) {
  LoraCache c = cache(2);
  std::vector<float> values(16, 0.5f);
  LoraWeights w = LoraWeights::copy_of(Tensor(values.data(), DType::kFloat32, {1, 16}));
  expect_error<LoraError>([&] { c.put(5, w, LoraConfig::from_rows({{1, 2, 1}})); },
                          "layer_idx 2 is out of range [0, 2)");
  EXPECT_FALSE(c.contains(5));
  EXPECT_EQ(c.stats().host_bytes, 0);
}

TEST(LoraCacheTest, HostLevelKeepsReferencedTasksAndEvictsTheRest) {
  LoraCache c = cache(1, 2);
  const Adapter a = adapter(1);
  c.put(1, a.weights, a.config);
  c.put(2, a.weights, a.config);
  c.ref(1);
  c.put(3, a.weights, a.config);  // evicts 2 (unreferenced), never 1
  EXPECT_TRUE(c.contains(1));
  EXPECT_FALSE(c.contains(2));
  EXPECT_TRUE(c.contains(3));
  EXPECT_EQ(c.stats().host_evictions, 1);
  c.ref(3);
  expect_error<LoraError>([&] { c.put(4, a.weights, a.config); },
                          "the host level (128 bytes) is full of adapters that queued or running "
                          "requests use");
  c.unref(3);
  c.put(4, a.weights, a.config);
  EXPECT_FALSE(c.contains(3));
}

// The case: a host level of one adapter. The idle task 1 (still on the device level) makes
// room for task 2 and leaves both levels; task 1 comes back the same way.
TEST(LoraCacheTest, IdleTaskLeavesAFullHostLevelWithItsDeviceCopy) {
  LoraCache c = cache(2, 1);
  const Adapter one = adapter(1, 1.0f), two = adapter(1, 2.0f);
  c.put(1, one.weights, one.config, /*reference=*/true);
  ASSERT_NE(c.acquire(1), nullptr);
  c.unpin(1);
  c.unref(1);  // the request finished
  EXPECT_TRUE(c.is_on_device(1));
  c.put(2, two.weights, two.config, true);
  EXPECT_FALSE(c.contains(1));
  EXPECT_FALSE(c.is_on_device(1));
  EXPECT_TRUE(c.contains(2));
  LoraCacheStats s = c.stats();
  EXPECT_EQ(s.host_evictions, 1);
  EXPECT_EQ(s.device_evictions, 1);
  EXPECT_EQ(s.host_bytes, 64);
  EXPECT_EQ(s.device_bytes, 0);
  EXPECT_EQ(s.host_tasks, 1);
  EXPECT_EQ(s.device_tasks, 0);
  EXPECT_EQ(s.referenced_tasks, 1);
  c.unref(2);
  c.put(1, one.weights, one.config);
  EXPECT_TRUE(c.contains(1));
  EXPECT_FALSE(c.contains(2));
  EXPECT_EQ(c.stats().referenced_tasks, 0);
}

TEST(LoraCacheTest, ReferencedOrPinnedTasksStayOnTheHostLevel) {
  LoraCache c = cache(2, 1);
  const Adapter one = adapter(1, 1.0f), two = adapter(1, 2.0f);
  c.put(1, one.weights, one.config);
  auto pinned = c.acquire(1);  // pinned without a reference: still in use
  expect_error<LoraError>([&] { c.put(2, two.weights, two.config); },
                          "is full of adapters that queued or running requests use");
  c.unpin(1);
  c.put(2, two.weights, two.config);
  EXPECT_FALSE(c.contains(1));
  EXPECT_EQ(static_cast<const float*>(pinned->pair(0, 1).a)[0], 1.0f);  // still valid memory
}

TEST(LoraCacheTest, DifferentWeightsReplaceAnIdleTaskOnBothLevels) {
  LoraCache c = cache(2);
  const Adapter old_one = adapter(1, 1.0f), new_one = adapter(2, 2.0f);
  c.put(7, old_one.weights, old_one.config);
  ASSERT_NE(c.acquire(7), nullptr);
  c.unpin(7);
  c.put(7, new_one.weights, new_one.config);
  EXPECT_FALSE(c.is_on_device(7));  // the old device copy went with it
  auto adapter7 = c.acquire(7);
  ASSERT_NE(adapter7, nullptr);
  EXPECT_EQ(adapter7->pair(0, 1).rank, 2);
  EXPECT_EQ(static_cast<const float*>(adapter7->pair(0, 1).a)[0], 2.0f);
  const LoraCacheStats s = c.stats();
  EXPECT_EQ(s.replacements, 1);
  EXPECT_EQ(s.misses, 2);
  EXPECT_EQ(s.host_bytes, 128);
  EXPECT_EQ(s.device_bytes, 128);
  EXPECT_EQ(s.host_tasks, 1);
  EXPECT_EQ(s.device_tasks, 1);
}

TEST(LoraCacheTest, IdenticalWeightsAreTheSameAdapterEvenInUse) {
  LoraCache c = cache(2);
  const Adapter a = adapter(1, 1.0f);
  c.put(7, a.weights, a.config, true);
  auto resident = c.acquire(7);
  const Adapter copy = adapter(1, 1.0f);  // equal bytes, other memory
  c.put(7, copy.weights, copy.config, true);
  EXPECT_EQ(c.acquire(7), resident);  // nothing replaced or reloaded
  LoraCacheStats s = c.stats();
  EXPECT_EQ(s.replacements, 0);
  EXPECT_EQ(s.misses, 1);
  EXPECT_EQ(s.hits, 1);
  // Different values, another rank or another dtype: refused while requests use the task.
  const Adapter other = adapter(1, 1.5f), wider = adapter(2, 1.0f);
  const std::string in_use =
      "LoRA task 7 is in use by 2 queued or running request(s) with different weights";
  expect_error<LoraError>([&] { c.put(7, other.weights, other.config); }, in_use);
  expect_error<LoraError>([&] { c.put(7, wider.weights, wider.config); }, in_use);
  expect_error<LoraError>([&] { c.put(7, a.weights.to(DType::kBFloat16), a.config); }, in_use);
  c.unpin(7);
  c.unpin(7);
  c.unref(7);
  c.unref(7);
  c.put(7, other.weights, other.config);  // idle now: replaced
  EXPECT_EQ(c.stats().replacements, 1);
  EXPECT_EQ(static_cast<const float*>(c.acquire(7)->pair(0, 1).a)[0], 1.5f);
}

TEST(LoraCacheTest, BudgetsUpToInt64MaxDoNotOverflow) {
  const int64_t max = std::numeric_limits<int64_t>::max();
  LoraCache c(tiny_model(), LoraCacheConfig{max, max}, 8);
  for (uint64_t id = 1; id <= 3; ++id) {
    const Adapter a = adapter(1, static_cast<float>(id));
    c.put(id, a.weights, a.config);
    ASSERT_NE(c.acquire(id), nullptr);
  }
  const LoraCacheStats s = c.stats();
  EXPECT_EQ(s.host_tasks, 3);
  EXPECT_EQ(s.device_tasks, 3);
  EXPECT_EQ(s.host_evictions + s.device_evictions, 0);
  EXPECT_EQ(s.pinned_tasks, 3);
}

// Adapters stay in the dtype they arrive in on both levels (never rounded), and the device level
// lays B out transposed.
TEST(LoraCacheTest, KeepsEachAdapterInItsOwnDtype) {
  LoraCache c(tiny_model(), LoraCacheConfig{1 << 20, 1 << 20}, 8);
  // attn_q rank 2: A [2, 8] then B [8, 2], values 0..31 exact in bfloat16.
  std::vector<uint16_t> words(32);
  for (int i = 0; i < 32; ++i) words[i] = float_to_bfloat16(static_cast<float>(i));
  c.put(9, LoraWeights::copy_of(Tensor(words.data(), DType::kBFloat16, {1, 32})),
        LoraConfig::from_rows({{1, 0, 2}}));
  c.put(10, adapter(2, 0.1f).weights, adapter(2, 0.1f).config);
  EXPECT_EQ(c.stats().host_bytes, 32 * 2 + 32 * 4);
  auto bf16 = c.acquire(9);
  auto fp32 = c.acquire(10);
  ASSERT_NE(bf16, nullptr);
  ASSERT_NE(fp32, nullptr);
  EXPECT_EQ(c.stats().device_bytes, 32 * 2 + 32 * 4);
  EXPECT_EQ(bf16->dtype(), DType::kBFloat16);
  const LoraPair& pair = bf16->pair(0, 1);
  EXPECT_EQ(pair.dtype, DType::kBFloat16);
  const auto* a = static_cast<const uint16_t*>(pair.a);
  const auto* b_t = static_cast<const uint16_t*>(pair.b_t);
  for (int i = 0; i < 16; ++i) EXPECT_EQ(a[i], words[i]) << "A " << i;
  for (int r = 0; r < 2; ++r) {
    for (int o = 0; o < 8; ++o) EXPECT_EQ(b_t[r * 8 + o], words[16 + o * 2 + r]) << r << "," << o;
  }
  EXPECT_EQ(fp32->pair(0, 1).dtype, DType::kFloat32);
  EXPECT_EQ(static_cast<const float*>(fp32->pair(0, 1).b_t)[5], 0.1f);
}

}  // namespace
}  // namespace lorart

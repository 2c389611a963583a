// plan_kv_pool: the KV pool from injected free-memory figures (no device needed).
#include "runtime/memory_plan.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "core/errors.h"
#include "test_util.h"

namespace lorart {
namespace {

using testing_util::expect_error;

constexpr int64_t kGiB = int64_t{1} << 30;
constexpr int64_t kMiB = int64_t{1} << 20;

// An H200-like card: 140 GiB free, a 7B bf16 model, 1 GiB of LoRA cache, 2 GiB of workspace,
// Llama-2-7B's 16-token bf16 blocks (32 layers x K,V x 32 heads x 128 x 2 bytes x 16 = 8 MiB).
KvPoolSizing h200() {
  KvPoolSizing s;
  s.free_bytes = 140 * kGiB;
  s.weights_bytes = 13 * kGiB;
  s.lora_cache_bytes = 1 * kGiB;
  s.workspace_bytes = 2 * kGiB;
  s.fraction = 0.9;
  s.block_bytes = 8 * kMiB;
  s.min_blocks = 256;  // one 4096-token sequence
  return s;
}

TEST(MemoryPlanTest, TheFractionOfWhatIsLeftBecomesWholeBlocks) {
  const KvPoolPlan plan = plan_kv_pool(h200());
  EXPECT_EQ(plan.available_bytes, 124 * kGiB);
  EXPECT_EQ(plan.budget_bytes, static_cast<int64_t>(std::floor(124.0L * kGiB * 0.9L)));
  EXPECT_EQ(plan.num_blocks, plan.budget_bytes / (8 * kMiB));  // 14284 blocks
  EXPECT_EQ(plan.num_blocks, 14284);
  EXPECT_EQ(plan.pool_bytes, plan.num_blocks * 8 * kMiB);
  EXPECT_LE(plan.pool_bytes, plan.budget_bytes);

  KvPoolSizing all = h200();
  all.fraction = 1.0;
  EXPECT_EQ(plan_kv_pool(all).num_blocks, 124 * 128);
  // Weights already resident are outside free_bytes: the same pool from the smaller figure.
  KvPoolSizing loaded = h200();
  loaded.free_bytes -= loaded.weights_bytes;
  loaded.weights_bytes = 0;
  EXPECT_EQ(plan_kv_pool(loaded).num_blocks, plan.num_blocks);
}

TEST(MemoryPlanTest, CapsApply) {
  KvPoolSizing s = h200();
  s.max_blocks = 1024;  // KvCacheConfig.max_tokens 16384 at block_size 16
  EXPECT_EQ(plan_kv_pool(s).num_blocks, 1024);
  EXPECT_EQ(plan_kv_pool(s).pool_bytes, 1024 * 8 * kMiB);
  // Block ids are int32: a huge card of tiny blocks stops at 2^31 - 1.
  KvPoolSizing tiny = h200();
  tiny.free_bytes = std::numeric_limits<int64_t>::max();
  tiny.block_bytes = 1;
  tiny.min_blocks = 1;
  EXPECT_EQ(plan_kv_pool(tiny).num_blocks, 2147483647);
}

TEST(MemoryPlanTest, NothingFitsSaysWhy) {
  KvPoolSizing s = h200();
  s.weights_bytes = 139 * kGiB;
  expect_error<InvalidArgument>(
      [&] { plan_kv_pool(s); },
      "the weights (149250113536 bytes), the device LoRA cache (lora_cache.device_cache_bytes = "
      "1073741824) and the workspace (2147483648 bytes) leave nothing of the 150323855360 bytes");
  s.weights_bytes = std::numeric_limits<int64_t>::max();  // the sum overflows: still refused
  expect_error<InvalidArgument>([&] { plan_kv_pool(s); }, "leave nothing");

  KvPoolSizing small = h200();
  small.free_bytes = 16 * kGiB + 2040 * kMiB;  // 2040 MiB left: 229 blocks at 0.9, 256 needed
  expect_error<InvalidArgument>(
      [&] { plan_kv_pool(small); },
      "kv_cache.free_gpu_memory_fraction 0.9 of the 2139095040 bytes left after weights, LoRA "
      "cache and workspace is 1925185536 bytes: 229 KV blocks of 8388608 bytes, fewer than the "
      "256 of one max_seq_len sequence");
  small.fraction = 1.0;  // 255 blocks: still one short
  expect_error<InvalidArgument>([&] { plan_kv_pool(small); }, "255 KV blocks");
  small.free_bytes += 8 * kMiB;
  EXPECT_EQ(plan_kv_pool(small).num_blocks, 256);
}

TEST(MemoryPlanTest, MalformedInputsNameTheField) {
  struct Case {
    void (*edit)(KvPoolSizing&);
    const char* message;
  };
  const Case cases[] = {
      {[](KvPoolSizing& s) { s.free_bytes = -1; }, "free_bytes must be >= 0, got -1"},
      {[](KvPoolSizing& s) { s.weights_bytes = -2; }, "weights_bytes must be >= 0, got -2"},
      {[](KvPoolSizing& s) { s.lora_cache_bytes = -3; }, "lora_cache_bytes must be >= 0, got -3"},
      {[](KvPoolSizing& s) { s.workspace_bytes = -4; }, "workspace_bytes must be >= 0, got -4"},
      {[](KvPoolSizing& s) { s.max_blocks = -5; }, "max_blocks must be >= 0, got -5"},
      {[](KvPoolSizing& s) { s.fraction = 0.0; },
       "kv_cache.free_gpu_memory_fraction must be in (0, 1], got 0"},
      {[](KvPoolSizing& s) { s.fraction = 1.01; },
       "kv_cache.free_gpu_memory_fraction must be in (0, 1], got 1.01"},
      {[](KvPoolSizing& s) { s.fraction = std::nan(""); },
       "kv_cache.free_gpu_memory_fraction must be in (0, 1], got nan"},
      {[](KvPoolSizing& s) { s.block_bytes = 0; }, "block_bytes must be > 0, got 0"},
      {[](KvPoolSizing& s) { s.min_blocks = 0; }, "min_blocks (0) must be >= 1"},
      {[](KvPoolSizing& s) { s.max_blocks = 100; },
       "min_blocks (256) must be >= 1 and at most max_blocks (100)"},
  };
  for (const Case& c : cases) {
    KvPoolSizing s = h200();
    c.edit(s);
    expect_error<InvalidArgument>([&] { plan_kv_pool(s); }, c.message);
  }
}

}  // namespace
}  // namespace lorart

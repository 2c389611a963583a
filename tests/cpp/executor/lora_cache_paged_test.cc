// The LoRA cache's paged device level (what a CUDA executor uses), driven on the CPU: the same
// code with the pages in host memory and the copies done at once, so the page accounting,
// eviction, refusals and the pair table the forward reads are checked without a GPU
// (tests/cpp/executor/cuda/lora_cache_test.cc checks the bytes on a device).
#include <gtest/gtest.h>

#include <cstring>
#include <memory>
#include <vector>

#include "core/dtype.h"
#include "core/errors.h"
#include "executor/executor_test_util.h"
#include "executor/lora_cache.h"
#include "executor/lora_test_adapters.h"
#include "lora/module_ids.h"
#include "model/kv_cache.h"
#include "model/lora_table.h"
#include "test_util.h"

namespace lorart {
namespace {

using testing_util::expect_error;

// hidden 8, intermediate 16, 2 layers, 2 heads of 4: q 8 -> 8, gate / up 8 -> 16, down 16 -> 8.
ModelConfig tiny_model() { return testing_util::llama_config(16, 8, 16, 2, 2, 2, 4); }

// max_lora_rank 8: the widest pair, the fused qkv's (8 x (8 + 24) float32 = 1024 bytes, then 96
// bytes of DoRA scales), rounds up to 1280-byte pages.
constexpr int64_t kPage = 1280;

LoraCache paged(const ModelConfig& model, int64_t device_bytes,
                LoraCache::DoraScales dora = nullptr) {
  return LoraCache(model, LoraCacheConfig{1 << 20, device_bytes}, 8, std::move(dora),
                   LoraDeviceLevel{true, Device::cpu()});
}

using testing_util::Adapter;
using testing_util::random_adapter;

// Every pair of `paged` matches the host adapter's (rank, dtype, A and B^T bytes) and lies in
// one of the task's pages.
void expect_pairs_in_pages(const LoraCache& cache, uint64_t task, const LoraAdapter& paged,
                           const LoraAdapter& host, const ModelConfig& model) {
  const std::vector<int32_t> pages = cache.task_pages(task);
  ASSERT_FALSE(pages.empty());
  auto in_a_page = [&](const void* p, size_t bytes) {
    for (int32_t page : pages) {
      const auto* start = static_cast<const char*>(cache.page_address(page));
      const auto* at = static_cast<const char*>(p);
      if (at >= start && at + bytes <= start + cache.page_bytes()) return true;
    }
    return false;
  };
  for (int64_t layer = 0; layer < model.num_layers; ++layer) {
    for (int32_t m = 0; m < lora_module::kCount; ++m) {
      const LoraPair& got = paged.pair(layer, m);
      const LoraPair& want = host.pair(layer, m);
      ASSERT_EQ(got.rank, want.rank) << layer << "," << m;
      if (want.rank == 0) continue;
      const LoraModuleDims d = model.lora_module_dims(m);
      const size_t size = dtype_size(want.dtype);
      const size_t a_bytes = static_cast<size_t>(want.rank * d.in) * size;
      const size_t b_bytes = static_cast<size_t>(want.rank * d.out) * size;
      EXPECT_EQ(got.dtype, want.dtype);
      EXPECT_TRUE(in_a_page(got.a, a_bytes + b_bytes)) << layer << "," << m;
      EXPECT_EQ(got.b_t, static_cast<const char*>(got.a) + a_bytes);
      EXPECT_EQ((static_cast<const char*>(got.a) -
                 static_cast<const char*>(cache.page_address(pages[0]))) %
                    LoraPageLayout::kAlignment,
                0);
      EXPECT_EQ(std::memcmp(got.a, want.a, a_bytes), 0) << "A of " << layer << "," << m;
      EXPECT_EQ(std::memcmp(got.b_t, want.b_t, b_bytes), 0) << "B^T of " << layer << "," << m;
    }
  }
}

TEST(LoraCachePagedTest, PageSizeAndPoolComeFromTheConfig) {
  ASSERT_EQ(LoraPageLayout::for_model(tiny_model(), 8).page_bytes, kPage);
  LoraCache c = paged(tiny_model(), 3 * kPage + 1000);  // the tail below a page is not used
  EXPECT_EQ(c.page_bytes(), kPage);
  EXPECT_EQ(c.page_stats().num_pages, 3);
  EXPECT_EQ(c.page_stats().used_pages, 0);
  // The CPU backend's cache has no pages.
  LoraCache host(tiny_model(), LoraCacheConfig{1 << 20, 1 << 20}, 8);
  EXPECT_EQ(host.page_bytes(), 0);
  EXPECT_EQ(host.page_stats().num_pages, 0);
}

TEST(LoraCachePagedTest, ABudgetBelowOnePageIsRefusedWithBothSizes) {
  expect_error<InvalidArgument>(
      [] { paged(tiny_model(), kPage - 1); },
      "LoraCacheConfig.device_cache_bytes = 1279 holds no LoRA page of 1280 bytes");
}

TEST(LoraCachePagedTest, AcquirePutsEachPairInTheTasksPagesWithTheAdaptersValues) {
  const ModelConfig model = tiny_model();
  LoraCache c = paged(model, 8 * kPage);
  using namespace lora_module;
  // float32 pairs of 256 (q r2), 512 (gate r3), 256 (down r1), 256 (v r4), 768 (up r8) bytes,
  // packed first-fit decreasing: {768, 512} and {256, 256, 256}; in bfloat16 (half the values,
  // each pair still a multiple of 256): {512, 256, 256, 256} and {256}. Mixed sizes and modules
  // share pages.
  const std::vector<LoraConfigRow> rows = {
      {kAttnQ, 0, 2}, {kMlpHTo4H, 1, 3}, {kMlp4HToH, 0, 1}, {kAttnV, 1, 4}, {kMlpGate, 0, 8}};
  for (DType dtype : {DType::kFloat32, DType::kBFloat16}) {
    const uint64_t task = dtype == DType::kFloat32 ? 1 : 2;
    const Adapter a = random_adapter(model, rows, dtype, 11 + static_cast<uint32_t>(task));
    c.put(task, a.weights, a.config);
    const LoraAdapter host(a.weights, a.config, model, 8);
    const auto got = c.acquire(task);
    ASSERT_NE(got, nullptr);
    EXPECT_EQ(got->dtype(), dtype);
    EXPECT_EQ(got->max_rank(), 8);
    EXPECT_EQ(got->nbytes(), 0u);  // the pages are the cache's
    EXPECT_FALSE(got->has_dora());
    EXPECT_FALSE(got->has_embedding_parts());
    expect_pairs_in_pages(c, task, *got, host, model);
    EXPECT_EQ(c.acquire(task), got);  // a hit: the same adapter, pinned twice
  }
  const LoraPagePoolStats pool = c.page_stats();
  const LoraCacheStats stats = c.stats();
  EXPECT_EQ(stats.device_bytes, pool.used_pages * kPage);
  EXPECT_EQ(stats.misses, 2);
  EXPECT_EQ(stats.hits, 2);
  EXPECT_EQ(pool.tasks, 2);
  EXPECT_EQ(pool.pinned_tasks, 2);
  const LoraPagePlan f32 = plan_lora_pages(LoraConfig::from_rows(rows), model, DType::kFloat32,
                                           LoraPageLayout::for_model(model, 8));
  const LoraPagePlan b16 = plan_lora_pages(LoraConfig::from_rows(rows), model, DType::kBFloat16,
                                           LoraPageLayout::for_model(model, 8));
  EXPECT_EQ(static_cast<int64_t>(c.task_pages(1).size()), f32.num_pages);
  EXPECT_EQ(static_cast<int64_t>(c.task_pages(2).size()), b16.num_pages);
  EXPECT_EQ(pool.used_pages, f32.num_pages + b16.num_pages);
  EXPECT_EQ(pool.payload_bytes, f32.used_bytes + b16.used_bytes);
  EXPECT_EQ(f32.num_pages, 2);
  EXPECT_EQ(f32.used_bytes, 2048);
  EXPECT_EQ(b16.num_pages, 2);
  EXPECT_EQ(b16.used_bytes, 1536);
}

// One gate row of rank 8 in float32 is 768 bytes: a page of its own (two do not fit one).
Adapter one_page_adapter(uint32_t seed) {
  return random_adapter(tiny_model(), {{lora_module::kMlpHTo4H, 0, 8}}, DType::kFloat32, seed);
}

TEST(LoraCachePagedTest, EvictsTheLeastRecentlyUsedUnpinnedTaskAndWaitsWhenAllArePinned) {
  const ModelConfig model = tiny_model();
  LoraCache c = paged(model, 2 * kPage);
  std::vector<Adapter> adapters;
  for (uint64_t id = 0; id < 3; ++id) {
    adapters.push_back(one_page_adapter(40 + static_cast<uint32_t>(id)));
    c.put(id, adapters[id].weights, adapters[id].config);
  }
  auto host = [&](uint64_t id) {
    return LoraAdapter(adapters[id].weights, adapters[id].config, model, 8);
  };
  auto zero = c.acquire(0);
  auto one = c.acquire(1);
  ASSERT_NE(zero, nullptr);
  ASSERT_NE(one, nullptr);
  EXPECT_EQ(c.acquire(2), nullptr);  // both pages pinned: wait, evicting nothing
  EXPECT_EQ(c.stats().device_evictions, 0);
  EXPECT_TRUE(c.is_on_device(0));
  EXPECT_TRUE(c.is_on_device(1));

  const std::vector<int32_t> pages_of_zero = c.task_pages(0);
  c.unpin(0);
  zero.reset();
  auto two = c.acquire(2);  // evicts 0, the only unpinned task, and reuses its page
  ASSERT_NE(two, nullptr);
  EXPECT_FALSE(c.is_on_device(0));
  EXPECT_TRUE(c.task_pages(0).empty());
  EXPECT_EQ(c.task_pages(2), pages_of_zero);
  EXPECT_TRUE(c.contains(0));  // still on the host level
  EXPECT_EQ(c.stats().device_evictions, 1);
  expect_pairs_in_pages(c, 2, *two, host(2), model);
  expect_pairs_in_pages(c, 1, *one, host(1), model);  // the pinned task is intact

  // Least recently used goes first: 1 was acquired before 2.
  c.unpin(1);
  c.unpin(2);
  one.reset();
  two.reset();
  auto back = c.acquire(0);  // a miss: staged again from the host level
  ASSERT_NE(back, nullptr);
  EXPECT_FALSE(c.is_on_device(1));
  EXPECT_TRUE(c.is_on_device(2));
  expect_pairs_in_pages(c, 0, *back, host(0), model);
  const LoraCacheStats s = c.stats();
  EXPECT_EQ(s.misses, 4);
  EXPECT_EQ(s.device_evictions, 2);
  EXPECT_EQ(s.device_tasks, 2);
  EXPECT_EQ(s.pinned_tasks, 1);
  EXPECT_EQ(s.device_bytes, 2 * kPage);
  EXPECT_EQ(c.page_stats().pinned_tasks, 1);
}

TEST(LoraCachePagedTest, ATaskLargerThanThePoolIsRefusedAtPutWithBothSizes) {
  const ModelConfig model = tiny_model();
  LoraCache c = paged(model, kPage + 500);
  using namespace lora_module;
  const Adapter two_pages =
      random_adapter(model, {{kMlpHTo4H, 0, 8}, {kMlpHTo4H, 1, 8}}, DType::kFloat32, 3);
  expect_error<LoraError>([&] { c.put(5, two_pages.weights, two_pages.config, true); },
                          "LoRA task 5 needs 2 pages of 1280 bytes (2560 bytes) on the device "
                          "level, more than all of it (1 pages, 1280 bytes, from "
                          "device_cache_bytes = 1780)");
  EXPECT_FALSE(c.contains(5));
  EXPECT_EQ(c.stats().referenced_tasks, 0);
  // Nothing else breaks: a task that fits is cached and acquired.
  const Adapter fits = one_page_adapter(4);
  c.put(6, fits.weights, fits.config);
  EXPECT_NE(c.acquire(6), nullptr);
}

TEST(LoraCachePagedTest, EmbeddingSidePartsAndDoraAreRefusedAtPut) {
  const ModelConfig model = tiny_model();
  int dora_calls = 0;
  LoraCache c = paged(model, 4 * kPage, [&](const LoraWeights&, const LoraConfig&) {
    ++dora_calls;
    return std::vector<float>(8, 1.0f);
  });
  // attn_q rank 1 with a DoRA magnitude: 8 + 8 + 8 values.
  std::vector<float> dora_row(24, 0.25f);
  const LoraWeights dora_w =
      LoraWeights::copy_of(Tensor(dora_row.data(), DType::kFloat32, {1, 24}));
  expect_error<LoraError>(
      [&] { c.put(3, dora_w, LoraConfig::from_rows({{lora_module::kAttnQ, 0, 1, 1}})); },
      "LoRA task 3 has DoRA rows: not supported on CUDA yet");
  EXPECT_EQ(dora_calls, 0);  // refused before the scales are computed
  EXPECT_FALSE(c.contains(3));

  const Adapter rows = random_adapter(model, {{lora_module::kAttnQ, 0, 1}}, DType::kFloat32, 8);
  using P = LoraEmbeddings;
  std::array<P::Input, P::kNumParts> parts;
  auto values = std::make_shared<std::vector<float>>(16 * 8, 0.5f);  // the model's 16 ids
  parts[P::kEmbedTokens] = {Tensor(values->data(), DType::kFloat32, {16, 8}), values};
  const LoraWeights with_table(rows.weights.tensor(), rows.weights.owner(),
                               std::make_shared<const LoraEmbeddings>(parts));
  expect_error<LoraError>([&] { c.put(4, with_table, rows.config); },
                          "LoRA task 4 brings embedding-side parts (its own embed_tokens / "
                          "lm_head or an embedding / lm_head LoRA): not supported on CUDA yet");
  EXPECT_FALSE(c.contains(4));
  EXPECT_EQ(c.stats().host_bytes, 0);
}

TEST(LoraCachePagedTest, ReplacementAndHostEvictionFreeTheTasksPages) {
  const ModelConfig model = tiny_model();
  // The host level holds one rank-8 gate row (192 floats = 768 bytes) at a time.
  LoraCache c(model, LoraCacheConfig{1000, 4 * kPage}, 8, nullptr,
              LoraDeviceLevel{true, Device::cpu()});
  const Adapter first = one_page_adapter(60), second = one_page_adapter(61);
  c.put(1, first.weights, first.config);
  ASSERT_NE(c.acquire(1), nullptr);
  c.unpin(1);
  EXPECT_EQ(c.page_stats().used_pages, 1);
  c.put(1, second.weights, second.config);  // different weights, nobody uses 1: replaced
  EXPECT_EQ(c.stats().replacements, 1);
  EXPECT_FALSE(c.is_on_device(1));
  EXPECT_EQ(c.page_stats().used_pages, 0);
  auto replaced = c.acquire(1);
  ASSERT_NE(replaced, nullptr);
  expect_pairs_in_pages(c, 1, *replaced, LoraAdapter(second.weights, second.config, model, 8),
                        model);
  c.unpin(1);
  replaced.reset();
  c.put(2, first.weights, first.config);  // the host level evicts 1 and its pages with it
  EXPECT_FALSE(c.contains(1));
  EXPECT_FALSE(c.is_on_device(1));
  EXPECT_EQ(c.page_stats().used_pages, 0);
  EXPECT_EQ(c.stats().host_evictions, 1);
}

// The forward reads a paged adapter as it reads the host one: bitwise the same logits.
TEST(LoraCachePagedTest, TheForwardReadsThePagesAsItReadsAHostAdapter) {
  const ModelConfig model_config = testing_util::executor_model_config();
  const auto model = testing_util::random_model(model_config, 64, 8);
  using namespace lora_module;
  const std::vector<LoraConfigRow> rows = {{kAttnQ, 0, 4},     {kAttnK, 0, 2},    {kAttnV, 1, 8},
                                           {kAttnDense, 1, 3}, {kMlpHTo4H, 0, 5}, {kMlpGate, 1, 6},
                                           {kMlp4HToH, 0, 7},  {kMlp4HToH, 1, 1}};
  LoraCache host_cache(model_config, LoraCacheConfig{1 << 22, 1 << 22}, 8);
  LoraCache paged_cache(model_config, LoraCacheConfig{1 << 22, 1 << 22}, 8, nullptr,
                        LoraDeviceLevel{true, Device::cpu()});
  for (DType dtype : {DType::kFloat32, DType::kBFloat16}) {
    const Adapter a = random_adapter(model_config, rows, dtype, 90);
    const uint64_t task = dtype == DType::kFloat32 ? 1 : 2;
    host_cache.put(task, a.weights, a.config);
    paged_cache.put(task, a.weights, a.config);
    const auto on_host = host_cache.acquire(task);
    const auto on_pages = paged_cache.acquire(task);
    ASSERT_NE(on_host, nullptr);
    ASSERT_NE(on_pages, nullptr);
    paged_cache.make_wait(nullptr);  // a no-op on the CPU; what the executor calls

    auto logits_with = [&](const LoraAdapter& adapter) {
      LoraTable table(model_config);
      table.add(adapter);
      // Two sequences of 3 and 2 tokens: the first with the adapter, the second base.
      std::vector<int32_t> ids = {3, 9, 27, 5, 11}, positions = {0, 1, 2, 0, 1}, starts = {0, 3, 5},
                           ctx = {0, 0}, tables = {0, 1}, slots = {0, -1}, picks = {0, 1, 2, 3, 4};
      auto v = [](std::vector<int32_t>& x) {
        return Tensor(x.data(), DType::kInt32, {static_cast<int64_t>(x.size())});
      };
      const ForwardBatch batch{
          v(ids),   v(positions), v(starts), v(ctx), Tensor(tables.data(), DType::kInt32, {2, 1}),
          v(slots), v(picks)};
      KvCache cache(model_config, 4, 16);
      std::vector<float> logits(5 * model_config.vocab_size);
      model->forward(ExecContext::cpu(1), batch, cache, table,
                     Tensor(logits.data(), DType::kFloat32, {5, model_config.vocab_size}));
      return logits;
    };
    const std::vector<float> want = logits_with(*on_host);
    const std::vector<float> got = logits_with(*on_pages);
    ASSERT_EQ(got.size(), want.size());
    EXPECT_EQ(std::memcmp(got.data(), want.data(), got.size() * sizeof(float)), 0)
        << dtype_name(dtype);
    // The adapter moves the first sequence's logits, so a misread layout would show.
    const LoraAdapter nothing = LoraAdapter::on_pages(
        model_config, std::vector<LoraPair>(static_cast<size_t>(model_config.num_layers) * kCount),
        dtype);
    const std::vector<float> base = logits_with(nothing);
    EXPECT_NE(std::memcmp(got.data(), base.data(), 3 * model_config.vocab_size * sizeof(float)), 0);
    EXPECT_EQ(std::memcmp(got.data() + 3 * model_config.vocab_size,
                          base.data() + 3 * model_config.vocab_size,
                          2 * model_config.vocab_size * sizeof(float)),
              0);  // the base sequence is untouched
  }
}

}  // namespace
}  // namespace lorart

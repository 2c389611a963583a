#include "executor/lora_page_pool.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <set>
#include <vector>

#include "core/errors.h"
#include "lora/module_ids.h"
#include "model/lora_adapter.h"
#include "model/model_config.h"
#include "test_util.h"

namespace lorart {
namespace {

using testing_util::expect_error;

constexpr int64_t kA = LoraPageLayout::kAlignment;

TEST(LoraPageLayoutTest, PairBytesAreAlignedAndCountDoraScales) {
  // rank 8 * (4096 + 1024) bf16 values = 81920 bytes, already aligned.
  EXPECT_EQ(LoraPageLayout::pair_bytes(8, {4096, 1024}, DType::kBFloat16, false), 81920);
  // + 1024 float32 scales.
  EXPECT_EQ(LoraPageLayout::pair_bytes(8, {4096, 1024}, DType::kBFloat16, true), 81920 + 4096);
  // rank 1 * (8 + 8) float32 = 64 bytes -> one alignment unit.
  EXPECT_EQ(LoraPageLayout::pair_bytes(1, {8, 8}, DType::kFloat32, false), kA);
  expect_error<InvalidArgument>(
      [] {
        LoraPageLayout::pair_bytes(int64_t{1} << 40, {int64_t{1} << 30, 1}, DType::kFloat32, false);
      },
      "LoRA pair bytes");
}

TEST(LoraPageLayoutTest, PageHoldsTheLargestPairAtMaxRank) {
  // Llama-7B-like: q 4096->4096, gate 4096->11008, down 11008->4096.
  const std::vector<LoraModuleDims> modules{{4096, 4096}, {4096, 11008}, {11008, 4096}};
  const LoraPageLayout layout = LoraPageLayout::for_modules(modules, 64);
  EXPECT_EQ(layout.page_bytes,
            LoraPageLayout::pair_bytes(64, {4096, 11008}, DType::kFloat32, true));
  EXPECT_EQ(layout.page_bytes % kA, 0);
  const ModelConfig config = testing_util::llama_config(16, 8, 16, 2, 2, 2, 4);
  const LoraPageLayout model = LoraPageLayout::for_model(config, 8);
  for (int32_t id : config.lora_module_ids()) {
    EXPECT_LE(LoraPageLayout::pair_bytes(8, config.lora_module_dims(id), DType::kFloat32, true),
              model.page_bytes);
  }
  expect_error<InvalidArgument>([&] { LoraPageLayout::for_modules(modules, 0); },
                                "max_lora_rank >= 1");
}

TEST(LoraPagePlanTest, MixedRanksShareAPageAndEachPairStaysInside) {
  const std::vector<LoraModuleDims> modules{{4096, 4096}, {4096, 1024}, {4096, 14336}};
  const int64_t page = LoraPageLayout::for_modules(modules, 64).page_bytes;
  // An adapter of 32 layers x 3 modules, ranks 8 / 16 / 64 mixed, bf16.
  std::vector<int64_t> pairs;
  const int64_t ranks[] = {8, 16, 64};
  for (int layer = 0; layer < 32; ++layer) {
    for (size_t m = 0; m < modules.size(); ++m) {
      pairs.push_back(
          LoraPageLayout::pair_bytes(ranks[(layer + m) % 3], modules[m], DType::kBFloat16, false));
    }
  }
  const LoraPagePlan plan = plan_lora_pages(pairs, page);
  int64_t total = 0;
  for (int64_t b : pairs) total += b;
  EXPECT_EQ(plan.used_bytes, total);
  // First-fit decreasing: all but the last page are more than half full, so the waste is below
  // the data plus one page; here it is far less.
  const int64_t waste = plan.num_pages * page - total;
  EXPECT_LT(waste, page) << plan.num_pages << " pages of " << page;
  // Pairs never overlap and never cross their page.
  std::vector<std::vector<std::pair<int64_t, int64_t>>> by_page(plan.num_pages);
  for (size_t i = 0; i < pairs.size(); ++i) {
    const LoraPairPlacement& p = plan.placements[i];
    ASSERT_GE(p.page, 0);
    ASSERT_LT(p.page, plan.num_pages);
    EXPECT_EQ(p.offset % kA, 0);
    EXPECT_LE(p.offset + pairs[i], page);
    by_page[p.page].push_back({p.offset, p.offset + pairs[i]});
  }
  for (auto& spans : by_page) {
    std::sort(spans.begin(), spans.end());
    for (size_t i = 1; i < spans.size(); ++i) EXPECT_LE(spans[i - 1].second, spans[i].first);
  }
}

TEST(LoraPagePlanTest, RefusesAPairLargerThanAPage) {
  expect_error<LoraError>([] { plan_lora_pages({kA, 4 * kA}, 2 * kA); },
                          "LoRA pair 1 needs 1024 bytes; a page holds 512");
  EXPECT_EQ(plan_lora_pages({}, kA).num_pages, 0);
}

TEST(LoraPagePlanTest, AnAdaptersRowsArePlacedWithTheirModulesDimsAndDora) {
  const ModelConfig config = testing_util::llama_config(16, 8, 16, 2, 2, 2, 4);
  const LoraPageLayout layout = LoraPageLayout::for_model(config, 8);
  // q rank 8 (float16), gate rank 2 with DoRA, down rank 4.
  const LoraConfig rows = LoraConfig::from_rows({{lora_module::kAttnQ, 0, 8, 0},
                                                 {lora_module::kMlpGate, 1, 2, 1},
                                                 {lora_module::kMlp4HToH, 1, 4, 0}});
  const LoraPagePlan plan = plan_lora_pages(rows, config, DType::kFloat16, layout);
  ASSERT_EQ(plan.placements.size(), 3u);
  const int64_t q = LoraPageLayout::pair_bytes(8, config.lora_module_dims(lora_module::kAttnQ),
                                               DType::kFloat16, false);
  const int64_t gate = LoraPageLayout::pair_bytes(2, config.lora_module_dims(lora_module::kMlpGate),
                                                  DType::kFloat16, true);
  const int64_t down = LoraPageLayout::pair_bytes(
      4, config.lora_module_dims(lora_module::kMlp4HToH), DType::kFloat16, false);
  EXPECT_EQ(plan.used_bytes, q + gate + down);
  EXPECT_EQ(plan.num_pages, (q + gate + down + layout.page_bytes - 1) / layout.page_bytes);
}

// The paged layout holds the same pairs LoraAdapter lays out (A, B^T, DoRA scales), each inside
// its page at its placement, pointing at the task's device pages.
TEST(LoraPagePlanTest, StagedPagesHoldTheAdaptersPairs) {
  const ModelConfig config = testing_util::llama_config(16, 8, 16, 2, 2, 2, 4);
  const LoraPageLayout layout = LoraPageLayout::for_model(config, 8);
  const LoraConfig rows = LoraConfig::from_rows({{lora_module::kAttnQ, 0, 3, 0},
                                                 {lora_module::kMlpGate, 1, 8, 1},
                                                 {lora_module::kMlp4HToH, 1, 5, 0},
                                                 {lora_module::kAttnV, 0, 1, 1}});
  for (DType dtype : {DType::kFloat32, DType::kBFloat16}) {
    int64_t row_size = 0, dora_values = 0;
    for (int64_t i = 0; i < rows.num_rows(); ++i) {
      const LoraConfigRow r = rows.row(i);
      const LoraModuleDims d = config.lora_module_dims(r.module_id);
      row_size = std::max(row_size, r.adapter_size * (d.in + d.out) + (r.is_dora ? d.out : 0));
      if (r.is_dora) dora_values += d.out;
    }
    const size_t size = dtype_size(dtype);
    std::vector<uint16_t> bits(static_cast<size_t>(rows.num_rows() * row_size) * size / 2);
    for (size_t i = 0; i < bits.size(); ++i) bits[i] = static_cast<uint16_t>(0x3c00 + i % 977);
    const LoraWeights weights =
        LoraWeights::copy_of(Tensor(bits.data(), dtype, {rows.num_rows(), row_size}));
    std::vector<float> scales(static_cast<size_t>(dora_values));
    for (size_t i = 0; i < scales.size(); ++i) scales[i] = 0.5f + static_cast<float>(i);
    const LoraAdapter adapter = LoraAdapter::from_validated(weights, rows, config, &scales);

    const LoraPagePlan plan = plan_lora_pages(rows, config, dtype, layout);
    // A pool of 3 pages; the task got pages 2 and 0 (any pages, in any order).
    std::vector<char> pool(3 * layout.page_bytes, 0x5a),
        staging(plan.num_pages * layout.page_bytes);
    const std::vector<int32_t> pages = {2, 0};
    ASSERT_LE(plan.num_pages, 2);
    std::vector<char*> device_pages;
    for (int64_t j = 0; j < plan.num_pages; ++j) {
      device_pages.push_back(pool.data() + pages[j] * layout.page_bytes);
    }
    const std::vector<LoraPair> table = stage_lora_pages(
        weights, rows, config, &scales, plan, layout.page_bytes, staging.data(), device_pages);
    for (int64_t j = 0; j < plan.num_pages; ++j) {  // what the copy stream does on the device
      std::memcpy(device_pages[j], staging.data() + j * layout.page_bytes, layout.page_bytes);
    }
    ASSERT_EQ(table.size(), static_cast<size_t>(config.num_layers) * lora_module::kCount);
    int checked = 0;
    for (int64_t layer = 0; layer < config.num_layers; ++layer) {
      for (int32_t m = 0; m < lora_module::kCount; ++m) {
        const LoraPair& want = adapter.pair(layer, m);
        const LoraPair& got = table[layer * lora_module::kCount + m];
        ASSERT_EQ(got.rank, want.rank);
        if (want.rank == 0) continue;
        ++checked;
        const LoraModuleDims d = config.lora_module_dims(m);
        EXPECT_EQ(got.dtype, dtype);
        EXPECT_EQ(reinterpret_cast<uintptr_t>(got.a) % LoraPageLayout::kAlignment,
                  reinterpret_cast<uintptr_t>(pool.data()) % LoraPageLayout::kAlignment);
        EXPECT_EQ(std::memcmp(got.a, want.a, want.rank * d.in * size), 0);
        EXPECT_EQ(std::memcmp(got.b_t, want.b_t, want.rank * d.out * size), 0);
        ASSERT_EQ(got.dora_scale == nullptr, want.dora_scale == nullptr);
        if (want.dora_scale != nullptr) {
          EXPECT_EQ(std::memcmp(got.dora_scale, want.dora_scale, d.out * sizeof(float)), 0);
          EXPECT_EQ(reinterpret_cast<uintptr_t>(got.dora_scale) % 4, 0u);
        }
        // Inside one of the task's pages, never page 1 (not the task's).
        const auto* at = static_cast<const char*>(got.a);
        const int64_t page = (at - pool.data()) / layout.page_bytes;
        EXPECT_NE(page, 1);
        const char* end =
            reinterpret_cast<const char*>(got.dora_scale ? got.dora_scale + d.out : nullptr);
        if (end == nullptr) end = static_cast<const char*>(got.b_t) + want.rank * d.out * size;
        EXPECT_LE(end, pool.data() + (page + 1) * layout.page_bytes);
      }
    }
    EXPECT_EQ(checked, 4);
    // Page 1 was not written.
    EXPECT_EQ(
        std::count(pool.begin() + layout.page_bytes, pool.begin() + 2 * layout.page_bytes, 0x5a),
        layout.page_bytes);
  }
  expect_error<LoraError>(
      [&] {
        const LoraPagePlan plan = plan_lora_pages(rows, config, DType::kFloat32, layout);
        std::vector<char> staging(plan.num_pages * layout.page_bytes);
        std::vector<char*> pages(plan.num_pages, staging.data());
        const LoraWeights w = LoraWeights::copy_of(Tensor(staging.data(), DType::kFloat32, {4, 8}));
        stage_lora_pages(w, rows, config, nullptr, plan, layout.page_bytes, staging.data(), pages);
      },
      "DoRA rows");
}

TEST(LoraPagePoolTest, AllocatesPinsAndAccountsBytes) {
  LoraPagePool pool(1024, 8);
  std::vector<uint64_t> evicted;
  ASSERT_TRUE(pool.allocate(1, 3, 2500, &evicted));
  EXPECT_EQ(pool.pins(1), 1);
  EXPECT_EQ(pool.pages(1).size(), 3u);
  EXPECT_EQ(pool.free_pages(), 5);
  LoraPagePoolStats s = pool.stats();
  EXPECT_EQ(s.used_pages, 3);
  EXPECT_EQ(s.used_bytes, 3 * 1024);
  EXPECT_EQ(s.payload_bytes, 2500);
  EXPECT_EQ(s.tasks, 1);
  EXPECT_EQ(s.pinned_tasks, 1);
  pool.unpin(1);
  EXPECT_EQ(pool.stats().pinned_tasks, 0);
  EXPECT_TRUE(pool.release(1));
  s = pool.stats();
  EXPECT_EQ(s.used_bytes, 0);
  EXPECT_EQ(s.payload_bytes, 0);
  EXPECT_EQ(s.evictions, 0);  // a release is not an eviction
  EXPECT_TRUE(evicted.empty());
}

TEST(LoraPagePoolTest, EvictsLeastRecentlyUsedUnpinnedFirst) {
  LoraPagePool pool(1024, 4);
  std::vector<uint64_t> evicted;
  for (uint64_t t = 1; t <= 4; ++t) {
    ASSERT_TRUE(pool.allocate(t, 1, 1024, &evicted));
    pool.unpin(t);
  }
  ASSERT_TRUE(pool.pin(1));  // 1 becomes the most recently used
  pool.unpin(1);
  ASSERT_TRUE(pool.allocate(5, 2, 2048, &evicted));
  EXPECT_EQ(evicted, (std::vector<uint64_t>{2, 3}));
  EXPECT_FALSE(pool.contains(2));
  EXPECT_TRUE(pool.contains(1));
  EXPECT_EQ(pool.stats().evictions, 2);
  EXPECT_EQ(pool.stats().payload_bytes, 4 * 1024);
}

TEST(LoraPagePoolTest, PinnedPagesAreNeverEvictedAndRefusalEvictsNothing) {
  LoraPagePool pool(1024, 4);
  std::vector<uint64_t> evicted;
  ASSERT_TRUE(pool.allocate(1, 2, 0, &evicted));  // stays pinned
  ASSERT_TRUE(pool.allocate(2, 1, 0, &evicted));
  pool.unpin(2);
  // Needs 3 pages: 1 free + 1 unpinned is not enough, so task 2 is kept.
  EXPECT_FALSE(pool.allocate(3, 3, 0, &evicted));
  EXPECT_TRUE(evicted.empty());
  EXPECT_TRUE(pool.contains(2));
  EXPECT_EQ(pool.stats().evictions, 0);
  EXPECT_FALSE(pool.release(1));  // pinned
  // 2 pages fit after evicting 2; task 1's pages are not touched.
  const std::vector<int32_t> pinned = pool.pages(1);
  ASSERT_TRUE(pool.allocate(3, 2, 0, &evicted));
  EXPECT_EQ(evicted, (std::vector<uint64_t>{2}));
  for (int32_t p : pool.pages(3)) {
    EXPECT_EQ(std::count(pinned.begin(), pinned.end(), p), 0) << p;
  }
  EXPECT_FALSE(pool.allocate(4, 1, 0, &evicted));  // everything pinned: not now
}

TEST(LoraPagePoolTest, MixedSizesReuseScatteredPagesWithoutFragmentation) {
  // Interleave small tasks, evict every other one: the freed pages are scattered, and a task of
  // any size that fits the free count gets them (pages need not be adjacent).
  LoraPagePool pool(512, 10);
  std::vector<uint64_t> evicted;
  for (uint64_t t = 0; t < 10; ++t) {
    ASSERT_TRUE(pool.allocate(t, 1, 100 + t, &evicted));
    if (t % 2 == 1) pool.unpin(t);
  }
  ASSERT_TRUE(pool.allocate(100, 5, 2000, &evicted));
  EXPECT_EQ(evicted, (std::vector<uint64_t>{1, 3, 5, 7, 9}));
  std::set<int32_t> all;
  for (uint64_t t : {0, 2, 4, 6, 8, 100}) {
    for (int32_t p : pool.pages(t)) EXPECT_TRUE(all.insert(p).second) << "page " << p << " twice";
  }
  EXPECT_EQ(all.size(), 10u);
  EXPECT_EQ(pool.free_pages(), 0);
  EXPECT_EQ(pool.stats().payload_bytes, 100 + 102 + 104 + 106 + 108 + 2000);
  EXPECT_EQ(pool.offset(3), 3 * 512);
}

TEST(LoraPagePoolTest, RefusesATaskLargerThanThePoolAndBadArguments) {
  LoraPagePool pool(1024, 4);
  expect_error<LoraError>([&] { pool.allocate(7, 5, 0, nullptr); },
                          "LoRA task 7 needs 5 pages of 1024 bytes, more than the whole device "
                          "level (4 pages)");
  ASSERT_TRUE(pool.allocate(7, 1, 0, nullptr));
  expect_error<InvalidArgument>([&] { pool.allocate(7, 1, 0, nullptr); }, "already resident");
  expect_error<InvalidArgument>([&] { pool.allocate(8, 0, 0, nullptr); }, "asks for no pages");
  expect_error<InvalidArgument>([] { LoraPagePool(0, 4); }, "page_bytes > 0");
  expect_error<InvalidArgument>([&] { pool.pages(9); }, "task 9 is not resident");
}

}  // namespace
}  // namespace lorart

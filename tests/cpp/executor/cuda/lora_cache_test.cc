// GPU test of the LoRA cache's paged device level: adapters acquired on a CUDA device land in
// the pool's pages with exactly the host adapter's A and B^T bytes, also after eviction reuses
// a page (the staging buffer rewritten only once the previous copy has read it).
#include "executor/lora_cache.h"

#include <gtest/gtest.h>

#include <cstring>
#include <vector>

#include "core/buffer.h"
#include "executor/lora_test_adapters.h"
#include "kernels/cuda/cuda_test_util.h"
#include "lora/module_ids.h"

namespace lorart {
namespace {

using testing_util::Adapter;
using testing_util::random_adapter;

// hidden 32, intermediate 48, 2 layers, 4 heads / 2 KV heads of 8.
ModelConfig model_config() { return testing_util::llama_config(64, 32, 48, 2, 4, 2, 8); }

// Every pair of `got` (device pages) holds the host adapter's bytes, and lies in a page of the
// task's.
void expect_device_pairs(const LoraCache& cache, uint64_t task, const LoraAdapter& got,
                         const LoraAdapter& want, const ModelConfig& model) {
  const std::vector<int32_t> pages = cache.task_pages(task);
  ASSERT_FALSE(pages.empty());
  const int64_t page_bytes = cache.page_bytes();
  for (int64_t layer = 0; layer < model.num_layers; ++layer) {
    for (int32_t m = 0; m < lora_module::kCount; ++m) {
      const LoraPair& g = got.pair(layer, m);
      const LoraPair& w = want.pair(layer, m);
      ASSERT_EQ(g.rank, w.rank) << layer << "," << m;
      if (w.rank == 0) continue;
      const LoraModuleDims d = model.lora_module_dims(m);
      const size_t size = dtype_size(w.dtype);
      const size_t a_bytes = static_cast<size_t>(w.rank * d.in) * size;
      const size_t b_bytes = static_cast<size_t>(w.rank * d.out) * size;
      bool inside = false;
      for (int32_t page : pages) {
        const auto* start = static_cast<const char*>(cache.page_address(page));
        const auto* at = static_cast<const char*>(g.a);
        inside = inside || (at >= start && at + a_bytes + b_bytes <= start + page_bytes);
      }
      EXPECT_TRUE(inside) << layer << "," << m;
      std::vector<char> a(a_bytes), b_t(b_bytes);
      copy_bytes(a.data(), Device::cpu(), g.a, Device::cuda(0), a_bytes);
      copy_bytes(b_t.data(), Device::cpu(), g.b_t, Device::cuda(0), b_bytes);
      EXPECT_EQ(std::memcmp(a.data(), w.a, a_bytes), 0) << "A of " << layer << "," << m;
      EXPECT_EQ(std::memcmp(b_t.data(), w.b_t, b_bytes), 0) << "B^T of " << layer << "," << m;
    }
  }
}

TEST(CudaLoraCacheTest, AcquiredPairsAreTheAdaptersBytesInDevicePages) {
  LORART_REQUIRE_GPU();
  const ModelConfig model = model_config();
  const int64_t page = LoraPageLayout::for_model(model, 8).page_bytes;
  LoraCache c(model, LoraCacheConfig{1 << 24, 2 * page}, 8, nullptr,
              LoraDeviceLevel{true, Device::cuda(0)});
  using namespace lora_module;
  // Each adapter fills one page: a rank-8 gate pair (8 x 80 float32 = 2560 bytes) and small
  // ones beside it.
  std::vector<Adapter> adapters;
  for (uint64_t id = 0; id < 3; ++id) {
    adapters.push_back(random_adapter(model, {{kMlpHTo4H, 0, 8}, {kAttnQ, 1, 2}, {kAttnV, 0, 1}},
                                      id == 1 ? DType::kBFloat16 : DType::kFloat32,
                                      100 + static_cast<uint32_t>(id)));
    c.put(id, adapters[id].weights, adapters[id].config);
  }
  auto host = [&](uint64_t id) {
    return LoraAdapter(adapters[id].weights, adapters[id].config, model, 8);
  };
  auto zero = c.acquire(0);
  auto one = c.acquire(1);
  ASSERT_NE(zero, nullptr);
  ASSERT_NE(one, nullptr);
  c.make_wait(nullptr);  // the legacy default stream (copy_bytes') waits for the page copies
  expect_device_pairs(c, 0, *zero, host(0), model);
  expect_device_pairs(c, 1, *one, host(1), model);
  EXPECT_EQ(c.acquire(2), nullptr);  // every page pinned

  // 2 takes 0's page: staged into the same staging memory right after 1's copy.
  const std::vector<int32_t> pages_of_zero = c.task_pages(0);
  c.unpin(0);
  zero.reset();
  auto two = c.acquire(2);
  ASSERT_NE(two, nullptr);
  EXPECT_EQ(c.task_pages(2), pages_of_zero);
  c.make_wait(nullptr);
  expect_device_pairs(c, 2, *two, host(2), model);
  expect_device_pairs(c, 1, *one, host(1), model);
  EXPECT_EQ(c.stats().device_evictions, 1);
}

}  // namespace
}  // namespace lorart

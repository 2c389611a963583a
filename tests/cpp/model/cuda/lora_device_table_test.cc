// GPU test of the per-step LoRA slot table upload (one copy from pinned staging on the compute
// stream).
#include "model/lora_device_table.h"

#include <gtest/gtest.h>

#include <cstring>
#include <vector>

#include "kernels/cuda/cuda_test_util.h"

namespace lorart {
namespace {

TEST(CudaLoraDeviceTableTest, UploadsRunsAndPairsInOneCopy) {
  LORART_REQUIRE_GPU();
  LoraDeviceTable table(Device::cuda(0));
  for (int step = 0; step < 3; ++step) {  // grows, then reuses; each step's values differ
    const int32_t num_runs = 5 + 40 * step, slots = 3 + step;
    const int64_t per_slot = 37;
    std::vector<LoraRun> runs(num_runs);
    for (int32_t i = 0; i < num_runs; ++i) runs[i] = {i, i + 1, (i + step) % slots};
    std::vector<LoraPair> pairs(slots * per_slot);
    for (size_t i = 0; i < pairs.size(); ++i) {
      pairs[i].a = reinterpret_cast<const void*>(0x10000 + 64 * (i + step));
      pairs[i].rank = static_cast<int32_t>((i + step) % 7);
    }
    ops::LoraBatch batch;
    batch.runs = runs.data();
    batch.num_runs = num_runs;
    batch.pairs = pairs.data();
    batch.num_slots = slots;
    batch.pairs_per_slot = per_slot;
    table.upload(&batch);
    // Read back on the legacy default stream, the one the table's copy went on (it was given
    // no compute stream), so the read-back follows the copy.
    std::vector<LoraRun> runs_back(num_runs);
    copy_bytes(runs_back.data(), Device::cpu(), batch.device_runs, Device::cuda(0),
               num_runs * sizeof(LoraRun));
    std::vector<LoraPair> pairs_back(pairs.size());
    copy_bytes(pairs_back.data(), Device::cpu(), batch.device_pairs, Device::cuda(0),
               pairs.size() * sizeof(LoraPair));
    ASSERT_EQ(std::memcmp(runs_back.data(), runs.data(), num_runs * sizeof(LoraRun)), 0) << step;
    for (size_t i = 0; i < pairs.size(); ++i) {
      ASSERT_EQ(pairs_back[i].a, pairs[i].a) << step << " " << i;
      ASSERT_EQ(pairs_back[i].rank, pairs[i].rank) << step << " " << i;
    }
  }
  EXPECT_EQ(table.uploads(), 3);
}

}  // namespace
}  // namespace lorart

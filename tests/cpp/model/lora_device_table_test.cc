#include "model/lora_device_table.h"

#include <gtest/gtest.h>

#include <cstring>
#include <vector>

#include "core/errors.h"
#include "test_util.h"

namespace lorart {
namespace {

using testing_util::expect_error;

std::vector<LoraPair> pairs_of(int64_t n) {
  std::vector<LoraPair> pairs(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    pairs[i].a = reinterpret_cast<const void*>(0x1000 + 16 * i);
    pairs[i].b_t = reinterpret_cast<const void*>(0x9000 + 16 * i);
    pairs[i].dtype = i % 2 ? DType::kBFloat16 : DType::kFloat32;
    pairs[i].rank = static_cast<int32_t>(i % 5);
  }
  return pairs;
}

bool same(const LoraPair& a, const LoraPair& b) {
  return a.a == b.a && a.b_t == b.b_t && a.dtype == b.dtype && a.rank == b.rank &&
         a.dora_scale == b.dora_scale;
}

TEST(LoraDeviceTableTest, PacksRunsThenAlignedPairsInOneBlock) {
  EXPECT_EQ(LoraDeviceTable::pairs_offset(0), 0u);
  EXPECT_EQ(LoraDeviceTable::pairs_offset(1), 64u);   // 12 bytes of runs, aligned up
  EXPECT_EQ(LoraDeviceTable::pairs_offset(6), 128u);  // 72 bytes
  EXPECT_EQ(LoraDeviceTable::packed_bytes(6, 10), 128u + 10 * sizeof(LoraPair));
  expect_error<InvalidArgument>([] { LoraDeviceTable::packed_bytes(1, int64_t{1} << 62); },
                                "LoRA slot table bytes");
}

// On the CPU the same code packs and "uploads" into a host block: the device arrays are exact
// copies of the host ones, in one copy, and reused across steps until a larger one comes.
TEST(LoraDeviceTableTest, UploadCopiesRunsAndPairsAndReusesItsBuffers) {
  LoraDeviceTable table(Device::cpu());
  std::vector<LoraRun> runs = {{0, 3, 1}, {3, 4, 0}, {4, 9, 2}};
  std::vector<LoraPair> pairs = pairs_of(3 * 36);
  ops::LoraBatch batch;
  batch.runs = runs.data();
  batch.num_runs = 3;
  batch.pairs = pairs.data();
  batch.num_slots = 3;
  batch.pairs_per_slot = 36;
  table.upload(&batch);
  ASSERT_NE(batch.device_runs, nullptr);
  ASSERT_NE(batch.device_pairs, nullptr);
  EXPECT_NE(batch.device_runs, runs.data());
  EXPECT_EQ(reinterpret_cast<const char*>(batch.device_pairs) -
                reinterpret_cast<const char*>(batch.device_runs),
            static_cast<std::ptrdiff_t>(LoraDeviceTable::pairs_offset(3)));
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(batch.device_runs[i].begin, runs[i].begin);
    EXPECT_EQ(batch.device_runs[i].end, runs[i].end);
    EXPECT_EQ(batch.device_runs[i].slot, runs[i].slot);
  }
  for (size_t i = 0; i < pairs.size(); ++i) EXPECT_TRUE(same(batch.device_pairs[i], pairs[i])) << i;
  EXPECT_EQ(table.uploads(), 1);
  const size_t capacity = table.capacity();
  const LoraRun* first = batch.device_runs;

  // A smaller step reuses the block; the host arrays changing after upload do not matter.
  runs = {{0, 1, 0}};
  batch.num_runs = 1;
  batch.num_slots = 1;
  table.upload(&batch);
  runs[0].slot = 99;
  EXPECT_EQ(batch.device_runs, first);
  EXPECT_EQ(batch.device_runs[0].slot, 0);
  EXPECT_EQ(table.capacity(), capacity);
  EXPECT_EQ(table.uploads(), 2);

  // A larger one grows it.
  std::vector<LoraPair> more = pairs_of(8 * 36);
  batch.pairs = more.data();
  batch.num_slots = 8;
  table.upload(&batch);
  EXPECT_GT(table.capacity(), capacity);
  EXPECT_TRUE(same(batch.device_pairs[8 * 36 - 1], more.back()));
}

TEST(LoraDeviceTableTest, NoRunsMeansNoDeviceArraysAndBadBatchesAreRefused) {
  LoraDeviceTable table(Device::cpu());
  ops::LoraBatch batch;
  batch.device_runs = reinterpret_cast<const LoraRun*>(0x10);  // stale from an earlier step
  table.upload(&batch);
  EXPECT_EQ(batch.device_runs, nullptr);
  EXPECT_EQ(batch.device_pairs, nullptr);
  EXPECT_EQ(table.uploads(), 0);
  batch.num_runs = 2;
  expect_error<InvalidArgument>([&] { table.upload(&batch); }, "the batch has 2 runs but no host");
}

}  // namespace
}  // namespace lorart

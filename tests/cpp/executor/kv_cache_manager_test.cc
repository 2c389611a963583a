#include "executor/kv_cache_manager.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <set>
#include <vector>

#include "core/errors.h"
#include "test_util.h"

namespace lorart {
namespace {

using testing_util::expect_error;

TEST(KvCacheManagerTest, ReserveGrowsTablesWithDistinctBlocks) {
  KvCacheManager kv(8, 4);
  std::vector<int32_t> a, b;
  ASSERT_TRUE(kv.reserve(a, 5));   // 2 blocks
  ASSERT_TRUE(kv.reserve(b, 4));   // 1 block
  ASSERT_TRUE(kv.reserve(a, 12));  // grows to 3 blocks
  EXPECT_EQ(a.size(), 3u);
  EXPECT_EQ(b.size(), 1u);
  EXPECT_EQ(kv.free_blocks(), 4);
  std::set<int32_t> all(a.begin(), a.end());
  all.insert(b.begin(), b.end());
  EXPECT_EQ(all.size(), 4u);
  for (int32_t block : all) EXPECT_TRUE(block >= 0 && block < 8);
  ASSERT_TRUE(kv.reserve(a, 9));  // already covered: no change
  EXPECT_EQ(a.size(), 3u);
}

TEST(KvCacheManagerTest, ReserveIsAllOrNothing) {
  KvCacheManager kv(3, 16);
  std::vector<int32_t> a;
  ASSERT_TRUE(kv.reserve(a, 16));
  std::vector<int32_t> b = {};
  EXPECT_FALSE(kv.reserve(b, 48));  // needs 3, only 2 free
  EXPECT_TRUE(b.empty());
  EXPECT_EQ(kv.free_blocks(), 2);
  EXPECT_EQ(kv.shortfall(b, 48), 3);
  EXPECT_EQ(kv.blocks_for(33), 3);
}

TEST(KvCacheManagerTest, ReleaseReturnsEveryBlock) {
  KvCacheManager kv(4, 2);
  std::vector<int32_t> a, b;
  ASSERT_TRUE(kv.reserve(a, 4));
  ASSERT_TRUE(kv.reserve(b, 4));
  EXPECT_EQ(kv.free_blocks(), 0);
  const std::vector<int32_t> freed = a;
  kv.release(a);
  EXPECT_TRUE(a.empty());
  EXPECT_EQ(kv.free_blocks(), 2);
  std::vector<int32_t> c;
  ASSERT_TRUE(kv.reserve(c, 4));
  std::vector<int32_t> sorted_c = c, sorted_freed = freed;
  std::sort(sorted_c.begin(), sorted_c.end());
  std::sort(sorted_freed.begin(), sorted_freed.end());
  EXPECT_EQ(sorted_c, sorted_freed);  // exactly the freed blocks come back
}

TEST(KvCacheManagerTest, BadSizes) {
  expect_error<InvalidArgument>([] { KvCacheManager(0, 16); },
                                "num_kv_blocks must be in [1, 2^31), got 0");
  expect_error<InvalidArgument>([] { KvCacheManager(4, 0); }, "block_size must be > 0, got 0");
}

}  // namespace
}  // namespace lorart

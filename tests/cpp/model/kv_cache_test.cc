#include "model/kv_cache.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <initializer_list>
#include <string>

#include "core/errors.h"
#include "test_util.h"

namespace lorart {
namespace {

using testing_util::expect_error;

// The demo model's shape: 3 layers, 2 KV heads of 32 -> 3 * 2 * 64 * 4 = 1536 bytes per token.
ModelConfig demo_config() { return testing_util::llama_config(1024, 128, 256, 3, 4, 2, 32); }

TEST(KvCacheTest, SizesAndLayout) {
  const ModelConfig config = demo_config();
  EXPECT_EQ(KvCache::bytes_per_token(config), 1536u);
  EXPECT_EQ(KvCache::checked_bytes(config, 8, 16), 8u * 16 * 1536);
  const KvCache cache(config, 8, 16);
  EXPECT_EQ(cache.nbytes(), 8u * 16 * 1536);
  EXPECT_EQ(cache.num_blocks(), 8);
  EXPECT_EQ(cache.block_size(), 16);
  EXPECT_EQ(cache.num_layers(), 3);
  EXPECT_EQ(cache.kv_width(), 64);
  // [layers, K/V, blocks, block_size, kv_width]: the last layer's values end the buffer.
  EXPECT_EQ(static_cast<const float*>(cache.values(2)) + 8 * 16 * 64,
            static_cast<const float*>(cache.keys(0)) + cache.nbytes() / sizeof(float));
  for (size_t i = 0; i < cache.nbytes() / sizeof(float); ++i)
    ASSERT_EQ(static_cast<const float*>(cache.keys(0))[i], 0.0f);
}

// Issue 8: 2^51 blocks made the byte count wrap to 0 in size_t; the cache then "held" 2^51 blocks
// in an empty buffer and the next forward wrote through a null pointer.
TEST(KvCacheTest, BlockCountsPastInt32AreRefusedBeforeAllocating) {
  const ModelConfig config = demo_config();
  for (int64_t blocks : {int64_t{1} << 51, int64_t{1} << 31, int64_t{-1}, int64_t{0}}) {
    SCOPED_TRACE(blocks);
    const std::string needle = "num_kv_blocks must be in [1, 2147483647] (block ids are int32), " +
                               std::string("got ") + std::to_string(blocks);
    expect_error<InvalidArgument>([&] { KvCache(config, blocks, 16); }, needle);
    expect_error<InvalidArgument>([&] { KvCache::checked_bytes(config, blocks, 16); }, needle);
  }
  for (int64_t block_size : std::initializer_list<int64_t>{0, -16, 1025, int64_t{1} << 40}) {
    expect_error<InvalidArgument>(
        [&] { KvCache(config, 8, block_size); },
        "block_size must be in [1, 1024], got " + std::to_string(block_size));
  }
}

TEST(KvCacheTest, PoolsOverTheHostMemoryAreRefusedNamingTheSizes) {
  // 2^31 - 1 blocks of 1024 tokens at 1536 bytes: 3.4 PB, representable but no host has it.
  const int64_t blocks = KvCache::kMaxBlocks;
  const size_t bytes = static_cast<size_t>(blocks) * 1024 * 1536;
  const std::string needle =
      "cannot allocate the KV cache (num_kv_blocks = 2147483647, "
      "block_size = 1024): " +
      std::to_string(bytes) + " bytes";
  expect_error<InvalidArgument>([&] { KvCache::checked_bytes(demo_config(), blocks, 1024); },
                                needle);
  expect_error<InvalidArgument>([&] { KvCache(demo_config(), blocks, 1024); },
                                needle + " (" + std::to_string(bytes >> 20) +
                                    " MiB) exceed this host's memory limit of " +
                                    std::to_string(host_memory_limit()));
}

TEST(KvCacheTest, SixteenBitPoolsTakeHalfTheBytesAndViewTheirDtype) {
  const ModelConfig config = demo_config();
  for (DType dtype : {DType::kBFloat16, DType::kFloat16}) {
    EXPECT_EQ(KvCache::bytes_per_token(config, dtype), KvCache::bytes_per_token(config) / 2);
    const KvCache cache(config, 8, 16, Device::cpu(), dtype);
    EXPECT_EQ(cache.dtype(), dtype);
    EXPECT_EQ(cache.nbytes(), KvCache::checked_bytes(config, 8, 16, Device::cpu(), dtype));
    EXPECT_EQ(cache.key_view(1).dtype(), dtype);
    EXPECT_EQ(static_cast<const char*>(cache.values(1)) - static_cast<const char*>(cache.keys(1)),
              int64_t{8} * 16 * cache.kv_width() * 2);
  }
  expect_error<InvalidArgument>(
      [&] { KvCache(config, 8, 16, Device::cpu(), DType::kInt32); },
      "the KV cache dtype must be float32, float16 or bfloat16, got int32");
}

TEST(KvCacheTest, ByteCountsThatOverflowAreRefused) {
  // Every field within its limit, the bytes per token not (validate() refuses this config for
  // its weights already; bytes_per_token checks on its own all the same).
  ModelConfig wide = demo_config();
  wide.num_layers = ModelConfig::kMaxNumLayers;
  wide.num_kv_heads = wide.head_dim = 1 << 22;
  expect_error<InvalidArgument>(
      [&] { KvCache::bytes_per_token(wide); },
      "KV cache bytes per token (num_hidden_layers * 2 * num_key_value_heads * head_dim * dtype "
      "size) = "
      "65536 * 2 * 4194304 * 4194304 * 4 overflows int64");
  // Per token fits, the pool does not.
  ModelConfig deep = demo_config();
  deep.num_layers = ModelConfig::kMaxNumLayers;
  deep.num_kv_heads = deep.num_attention_heads = 1 << 15;
  deep.head_dim = 1 << 15;
  deep.hidden_size = 1;
  expect_error<InvalidArgument>(
      [&] { KvCache(deep, KvCache::kMaxBlocks, 1024); },
      "KV cache bytes (num_kv_blocks * block_size * bytes per token) = 2147483647 * 1024 * "
      "562949953421312 overflows int64");
  // An invalid config is refused before any size is computed from it.
  ModelConfig broken = demo_config();
  broken.num_kv_heads = -2;
  expect_error<InvalidArgument>([&] { KvCache(broken, 8, 16); },
                                "num_key_value_heads must be > 0, got -2");
}

}  // namespace
}  // namespace lorart

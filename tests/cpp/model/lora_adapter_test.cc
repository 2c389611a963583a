#include "model/lora_adapter.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <sstream>
#include <vector>

#include "core/errors.h"
#include "lora/module_ids.h"
#include "test_util.h"

namespace lorart {
namespace {

using testing_util::expect_error;

// hidden 32, intermediate 48, q 4 x 8 = 32, kv 2 x 8 = 16, 2 layers.
ModelConfig tiny_config() { return testing_util::llama_config(64, 32, 48, 2, 4, 2, 8); }

TEST(LoraAdapterTest, StorageBytesAreRankTimesInPlusOut) {
  const ModelConfig config = tiny_config();
  const LoraConfig rows =
      LoraConfig::from_rows({{lora_module::kAttnQ, 0, 2},
                             {lora_module::kMlp4HToH, 1, 4}});  // 2 * (32 + 32), 4 * (48 + 32)
  EXPECT_EQ(LoraAdapter::storage_bytes(rows, config, DType::kFloat32), (128 + 320) * 4);
  EXPECT_EQ(LoraAdapter::storage_bytes(rows, config, DType::kBFloat16), (128 + 320) * 2);

  const std::vector<float> values(2 * 320, 0.5f);
  const LoraAdapter adapter(
      LoraWeights::copy_of(Tensor(const_cast<float*>(values.data()), DType::kFloat32, {2, 320})),
      rows, config, 8);
  EXPECT_EQ(adapter.nbytes(), (128u + 320) * 4);
  EXPECT_EQ(adapter.max_rank(), 4);
  EXPECT_TRUE(adapter.fits(config));
  std::ostringstream shape;
  shape << adapter.model_shape();
  EXPECT_EQ(shape.str(), "2 layers, hidden 32, intermediate 48, q 32, kv 16, vocab 64");
  ModelConfig other = config;
  other.intermediate_size = 64;
  EXPECT_FALSE(adapter.fits(other));
}

TEST(LoraAdapterTest, StorageBytesThatOverflowAreRefused) {
  // Rows the LoRA cache would size before it lays them out: each 2^31 - 1 ranks of a module
  // whose in + out is near 2^32, so their sum overflows int64.
  ModelConfig config = tiny_config();
  config.hidden_size = config.intermediate_size = ModelConfig::kMaxDim;
  const int32_t rank = ModelConfig::kMaxDim;
  const LoraConfig rows = LoraConfig::from_rows({{lora_module::kMlp4HToH, 0, rank},
                                                 {lora_module::kMlp4HToH, 1, rank},
                                                 {lora_module::kMlpGate, 1, rank}});
  expect_error<InvalidArgument>([&] { LoraAdapter::storage_bytes(rows, config, DType::kFloat32); },
                                "LoRA adapter storage values = ");
}

}  // namespace
}  // namespace lorart

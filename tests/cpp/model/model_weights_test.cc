#include "model/model_weights.h"

#include <gtest/gtest.h>

#include <unistd.h>

#include <cstdint>
#include <fstream>
#include <string>
#include <utility>
#include <vector>

#include "core/errors.h"
#include "test_util.h"

namespace lorart {
namespace {

using testing_util::expect_error;

// The demo model's layer shape (hidden 128, intermediate 256, 4 heads, 2 KV heads of 32), with
// the 4000 layers the config.json claimed: 2.36 GB of float32 weights.
ModelConfig claimed_4000_layers() {
  return testing_util::llama_config(1024, 128, 256, 4000, 4, 2, 32);
}

// Resident bytes of this process now (not the peak).
size_t resident_bytes() {
  std::ifstream statm("/proc/self/statm");
  size_t pages = 0, resident = 0;
  statm >> pages >> resident;
  return resident * static_cast<size_t>(sysconf(_SC_PAGESIZE));
}

// Zero-valued checkpoint tensors, kept alive for the builder to read.
struct Tensors {
  std::vector<std::vector<float>> storage;
  void add(ModelWeightsBuilder& builder, const std::string& name, int64_t rows, int64_t cols = 0) {
    storage.emplace_back(rows * (cols > 0 ? cols : 1), 0.0f);
    float* data = storage.back().data();
    builder.add(name, cols > 0 ? Tensor(data, DType::kFloat32, {rows, cols})
                               : Tensor(data, DType::kFloat32, {rows}));
  }
  // Every tensor of layer `l` of claimed_4000_layers().
  void add_layer(ModelWeightsBuilder& builder, int64_t l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    add(builder, p + "input_layernorm.weight", 128);
    add(builder, p + "post_attention_layernorm.weight", 128);
    add(builder, p + "self_attn.q_proj.weight", 128, 128);
    add(builder, p + "self_attn.k_proj.weight", 64, 128);
    add(builder, p + "self_attn.v_proj.weight", 64, 128);
    add(builder, p + "self_attn.o_proj.weight", 128, 128);
    add(builder, p + "mlp.gate_proj.weight", 256, 128);
    add(builder, p + "mlp.up_proj.weight", 256, 128);
    add(builder, p + "mlp.down_proj.weight", 128, 256);
  }
};

// 2 norms + qkv [256, 128] + o [128, 128] + gate_up [512, 128] + down [128, 256], float32.
constexpr size_t kLayerBytes = (2 * 128 + 256 * 128 + 128 * 128 + 512 * 128 + 128 * 256) * 4;

// Issue 8: the builder allocated and zeroed every weight config.json claimed (2.36 GB here)
// before the first tensor arrived; now it allocates what the checkpoint fills.
TEST(ModelWeightsBuilderTest, AllocatesOnlyWhatTheCheckpointFills) {
  const ModelConfig config = claimed_4000_layers();
  ASSERT_EQ(config.weight_values() * 4,
            static_cast<int64_t>(4000 * kLayerBytes + 2 * 1024 * 128 * 4 + 128 * 4));
  const size_t before = resident_bytes();
  ModelWeightsBuilder builder(config);
  EXPECT_EQ(builder.allocated_bytes(), 0u);
  EXPECT_LT(resident_bytes(), before + (size_t{256} << 20)) << "the builder allocated ahead";

  Tensors tensors;
  tensors.add(builder, "model.embed_tokens.weight", 1024, 128);
  tensors.add(builder, "model.norm.weight", 128);
  tensors.add(builder, "lm_head.weight", 1024, 128);
  for (int64_t l = 0; l < 3; ++l) tensors.add_layer(builder, l);  // a 3-layer checkpoint
  EXPECT_EQ(builder.allocated_bytes(), 2 * 1024 * 128 * 4 + 128 * 4 + 3 * kLayerBytes);

  const std::vector<std::string> missing = builder.missing();
  EXPECT_EQ(missing.size(), 3997u * 9);
  EXPECT_NE(std::find(missing.begin(), missing.end(), "model.layers.3.input_layernorm.weight"),
            missing.end());
  expect_error<InvalidArgument>(
      [&] { ModelWeights weights(std::move(builder)); },
      "checkpoint is missing 35973 tensor(s), first: 'model.layers.3.input_layernorm.weight'");
}

TEST(ModelWeightsBuilderTest, FusedBuffersAreAllocatedOnceByTheirFirstPart) {
  ModelWeightsBuilder builder(claimed_4000_layers());
  Tensors tensors;
  tensors.add(builder, "model.layers.7.self_attn.k_proj.weight", 64, 128);
  EXPECT_EQ(builder.allocated_bytes(), 256u * 128 * 4);  // all of q, k and v rows
  tensors.add(builder, "model.layers.7.self_attn.q_proj.weight", 128, 128);
  tensors.add(builder, "model.layers.7.self_attn.qkv_proj.weight", 256, 128);
  EXPECT_EQ(builder.allocated_bytes(), 256u * 128 * 4);
  tensors.add(builder, "model.layers.7.mlp.up_proj.weight", 256, 128);
  EXPECT_EQ(builder.allocated_bytes(), (256u + 512) * 128 * 4);
  // A refused tensor allocates nothing.
  expect_error<InvalidArgument>(
      [&] { tensors.add(builder, "model.layers.8.mlp.down_proj.weight", 128, 255); },
      "has shape [128, 255], config.json implies [128, 256]");
  EXPECT_EQ(builder.allocated_bytes(), (256u + 512) * 128 * 4);
}

TEST(ModelWeightsBuilderTest, WeightsOverTheHostMemoryAreRefusedBeforeAnyTensor) {
  // 2 * 2^31 * 2^20 float32 embedding values: 16 PiB.
  ModelConfig config = testing_util::llama_config(ModelConfig::kMaxDim, 1 << 20, 16, 1, 4, 2, 32);
  const int64_t bytes = config.weight_values() * 4;
  expect_error<InvalidArgument>(
      [&] { ModelWeightsBuilder builder(config); },
      "cannot allocate the model's float32 weights (config.json's sizes): " +
          std::to_string(bytes) + " bytes");
  config.num_layers = 0;
  expect_error<InvalidArgument>([&] { ModelWeightsBuilder builder(config); },
                                "num_hidden_layers must be > 0, got 0");
}

}  // namespace
}  // namespace lorart

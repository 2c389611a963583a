#include "model/model_weights.h"

#include <gtest/gtest.h>

#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <fstream>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "core/buffer.h"
#include "core/errors.h"
#include "lora/module_ids.h"
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

namespace lorart {
namespace {

// Weights keep one storage dtype: a tensor of that dtype is copied bit for bit, one of another is
// converted (round to nearest even), and destination() is the tensor's place in the fused buffer.
TEST(ModelWeightsDtypeTest, TensorsAreStoredInTheBuildersDtype) {
  const ModelConfig config = testing_util::llama_config(16, 8, 12, 1, 2, 1, 4);
  ModelWeightsBuilder builder(config, DType::kBFloat16);
  EXPECT_EQ(builder.dtype(), DType::kBFloat16);
  // q_proj arrives as bfloat16 words (copied), k_proj as float32 (rounded), v_proj through
  // destination() (the caller writes the words).
  std::vector<uint16_t> q(8 * 8);
  for (size_t i = 0; i < q.size(); ++i) q[i] = float_to_bfloat16(0.01f * static_cast<float>(i));
  builder.add("model.layers.0.self_attn.q_proj.weight", Tensor(q.data(), DType::kBFloat16, {8, 8}));
  std::vector<float> k(4 * 8, 1.0f + 0x1p-9f);  // halfway between two bf16 values: rounds to even
  builder.add("model.layers.0.self_attn.k_proj.weight", Tensor(k.data(), DType::kFloat32, {4, 8}));
  const Tensor v = builder.destination("model.layers.0.self_attn.v_proj.weight");
  EXPECT_EQ(v.dtype(), DType::kBFloat16);
  EXPECT_EQ(v.shape_str(), "[4, 8]");
  for (int64_t i = 0; i < v.numel(); ++i) v.data_as<uint16_t>()[i] = float_to_bfloat16(-2.0f);
  // The rest, so the weights are complete.
  std::vector<float> zeros(12 * 16, 0.0f);
  for (const auto& [name, rows, cols] : std::vector<std::tuple<std::string, int64_t, int64_t>>{
           {"model.embed_tokens.weight", 16, 8},
           {"lm_head.weight", 16, 8},
           {"model.norm.weight", 8, 0},
           {"model.layers.0.input_layernorm.weight", 8, 0},
           {"model.layers.0.post_attention_layernorm.weight", 8, 0},
           {"model.layers.0.self_attn.o_proj.weight", 8, 8},
           {"model.layers.0.mlp.gate_proj.weight", 12, 8},
           {"model.layers.0.mlp.up_proj.weight", 12, 8},
           {"model.layers.0.mlp.down_proj.weight", 8, 12}}) {
    builder.add(name, cols > 0 ? Tensor(zeros.data(), DType::kFloat32, {rows, cols})
                               : Tensor(zeros.data(), DType::kFloat32, {rows}));
  }
  const ModelWeights weights(std::move(builder));
  EXPECT_EQ(weights.dtype(), DType::kBFloat16);
  const Tensor qkv = weights.layer(0).qkv;
  ASSERT_EQ(qkv.dtype(), DType::kBFloat16);
  ASSERT_EQ(qkv.shape_str(), "[16, 8]");
  const auto* words = qkv.data_as<const uint16_t>();
  EXPECT_EQ(0, std::memcmp(words, q.data(), q.size() * 2));
  for (int64_t i = 64; i < 96; ++i) EXPECT_EQ(bfloat16_to_float(words[i]), 1.0f) << i;
  for (int64_t i = 96; i < 128; ++i) EXPECT_EQ(bfloat16_to_float(words[i]), -2.0f) << i;
  EXPECT_FALSE(weights.layer(0).qkv_bias.defined());
  // Half the float32 bytes: 16-bit storage all the way.
  EXPECT_EQ(weights.nbytes(), static_cast<size_t>(config.weight_values()) * 2);
}

// A complete one-layer checkpoint of `config` in bfloat16, value i of each tensor = word i (so a
// relayout shows), `tied` leaving lm_head out.
ModelWeights ramp_weights(ModelConfig config, DType dtype, bool tied) {
  config.tie_word_embeddings = tied;
  ModelWeightsBuilder builder(config, dtype);
  const int64_t h = config.hidden_size, i = config.intermediate_size;
  const int64_t q = config.num_attention_heads * config.head_dim;
  const int64_t kv = config.num_kv_heads * config.head_dim;
  std::vector<std::tuple<std::string, int64_t, int64_t>> tensors = {
      {"model.embed_tokens.weight", config.vocab_size, h},
      {"model.norm.weight", h, 0},
      {"model.layers.0.input_layernorm.weight", h, 0},
      {"model.layers.0.post_attention_layernorm.weight", h, 0},
      {"model.layers.0.self_attn.q_proj.weight", q, h},
      {"model.layers.0.self_attn.k_proj.weight", kv, h},
      {"model.layers.0.self_attn.v_proj.weight", kv, h},
      {"model.layers.0.self_attn.o_proj.weight", h, q},
      {"model.layers.0.mlp.gate_proj.weight", i, h},
      {"model.layers.0.mlp.up_proj.weight", i, h},
      {"model.layers.0.mlp.down_proj.weight", h, i}};
  if (!tied) tensors.emplace_back("lm_head.weight", config.vocab_size, h);
  for (const auto& [name, rows, cols] : tensors) {
    const Tensor dst = builder.destination(name);
    for (int64_t v = 0; v < dst.numel(); ++v) {
      if (dtype == DType::kBFloat16) {
        dst.data_as<uint16_t>()[v] = static_cast<uint16_t>(v);
      } else {
        dst.data_as<float>()[v] = static_cast<float>(v);
      }
    }
  }
  return ModelWeights(std::move(builder));
}

// bfloat16 matrices are kept in the CPU's k32-interleaved layout (the embedding, and a tied
// lm_head with it, row-major: rows are gathered); float32 ones row-major.
TEST(ModelWeightsDtypeTest, Bfloat16MatricesTakeTheCpusInterleavedLayout) {
  const ModelConfig config = testing_util::llama_config(40, 32, 48, 1, 4, 2, 8);
  for (bool tied : {false, true}) {
    const ModelWeights w = ramp_weights(config, DType::kBFloat16, tied);
    EXPECT_EQ(w.matrix_layout(), WeightLayout::kK32Interleaved);
    EXPECT_EQ(w.lm_head_layout(), tied ? WeightLayout::kRowMajor : WeightLayout::kK32Interleaved);
    // qkv, o, gate_up [*, 32]: one interleaved block per row.
    for (const Tensor* m : {&w.layer(0).qkv, &w.layer(0).o, &w.layer(0).gate_up}) {
      const auto* v = m->data_as<const uint16_t>();
      EXPECT_EQ(v[32 + 1], 32 + 16) << m->shape_str();
      EXPECT_EQ(v[32 + 3], 32 + 17) << m->shape_str();
    }
    // down [32, 48]: per row, one interleaved block of 32, then 16 values in order.
    const auto* down = w.layer(0).down.data_as<const uint16_t>();
    EXPECT_EQ(down[48 + 0], 48 + 0);
    EXPECT_EQ(down[48 + 1], 48 + 16);
    EXPECT_EQ(down[48 + 2], 48 + 1);
    EXPECT_EQ(down[48 + 40], 48 + 40);
    const auto* embed = w.embed().data_as<const uint16_t>();
    for (int v = 0; v < 64; ++v) EXPECT_EQ(embed[v], v);
    const auto* lm_head = w.lm_head().data_as<const uint16_t>();
    EXPECT_EQ(lm_head[1], tied ? 1 : 16);
  }
  const ModelWeights f32 = ramp_weights(config, DType::kFloat32, false);
  EXPECT_EQ(f32.matrix_layout(), WeightLayout::kRowMajor);
  EXPECT_EQ(f32.lm_head_layout(), WeightLayout::kRowMajor);
  EXPECT_EQ(f32.layer(0).down.data_as<const float>()[1], 1.0f);
}

TEST(ModelWeightsDtypeTest, DestinationAndDtypeErrorsNameTheirSubject) {
  const ModelConfig config = testing_util::llama_config(16, 8, 12, 1, 2, 1, 4);
  expect_error<InvalidArgument>([&] { ModelWeightsBuilder builder(config, DType::kInt32); },
                                "weight dtype must be float32, float16 or bfloat16, got int32");
  ModelWeightsBuilder builder(config, DType::kFloat16);
  expect_error<InvalidArgument>(
      [&] { builder.destination("model.layers.3.mlp.up_proj.weight"); },
      "checkpoint tensor 'model.layers.3.mlp.up_proj.weight' is not part");
  EXPECT_EQ(builder.allocated_bytes(), 0u);
  // The 16-bit size is what the memory check counts.
  ModelConfig big = testing_util::llama_config(ModelConfig::kMaxDim, 1 << 20, 16, 1, 4, 2, 32);
  expect_error<InvalidArgument>(
      [&] { ModelWeightsBuilder b(big, DType::kBFloat16); },
      "cannot allocate the model's bfloat16 weights (config.json's sizes): " +
          std::to_string(big.weight_values() * 2) + " bytes");
}

// The matrix and first row each LoRA module adapts (DoRA's norms are taken over those rows).
TEST(ModelWeightsTest, ModuleRowsNameEachModulesMatrixAndFirstRow) {
  const ModelConfig c = testing_util::llama_config(64, 32, 48, 2, 4, 2, 8);
  ModelWeightsBuilder builder(c);
  std::vector<std::vector<float>> storage;
  testing_util::for_each_llama_param(c, [&](const std::string& name, std::vector<int64_t> shape,
                                            float lo, float hi) {
    storage.push_back(testing_util::random_floats(shape[0] * (shape.size() > 1 ? shape[1] : 1),
                                                  static_cast<uint32_t>(storage.size()), lo, hi));
    float* d = storage.back().data();
    builder.add(name, shape.size() == 1 ? Tensor(d, DType::kFloat32, {shape[0]})
                                        : Tensor(d, DType::kFloat32, {shape[0], shape[1]}));
  });
  const ModelWeights w(std::move(builder));
  for (int64_t l = 0; l < 2; ++l) {
    const LayerWeights& layer = w.layer(l);
    const std::vector<std::tuple<int32_t, const Tensor*, int64_t>> cases = {
        {lora_module::kAttnQkv, &layer.qkv, 0},      {lora_module::kAttnQ, &layer.qkv, 0},
        {lora_module::kAttnK, &layer.qkv, 32},       {lora_module::kAttnV, &layer.qkv, 48},
        {lora_module::kAttnDense, &layer.o, 0},      {lora_module::kMlpHTo4H, &layer.gate_up, 0},
        {lora_module::kMlpGate, &layer.gate_up, 48}, {lora_module::kMlp4HToH, &layer.down, 0}};
    for (const auto& [module, matrix, offset] : cases) {
      SCOPED_TRACE(lora_module_name(module));
      const auto [t, first] = w.module_rows(l, module);
      EXPECT_EQ(t.data(), matrix->data());
      EXPECT_EQ(t.size(0), matrix->size(0));
      EXPECT_EQ(t.size(1), matrix->size(1));
      EXPECT_EQ(first, offset);
    }
  }
  // Row 0 of k_proj of layer 1 is row 32 of its qkv (its values, not just the offset).
  const auto [qkv, k_row] = w.module_rows(1, lora_module::kAttnK);
  const std::vector<float>* k_proj = nullptr;
  size_t index = 0;
  testing_util::for_each_llama_param(
      c, [&](const std::string& name, std::vector<int64_t>, float, float) {
        if (name == "model.layers.1.self_attn.k_proj.weight") k_proj = &storage[index];
        ++index;
      });
  ASSERT_NE(k_proj, nullptr);
  EXPECT_EQ(0, std::memcmp(qkv.data_as<const float>() + k_row * 32, k_proj->data(), 32 * 4));
  expect_error<LoraError>([&] { w.module_rows(0, 9); },
                          "module_id 9 (cross_attn_q) is not a LoRA module of LlamaForCausalLM");
}

// Weights for a CUDA device this build or machine lacks are refused as a DeviceError naming it,
// before anything is uploaded (a complete checkpoint, so only the device is wrong).
TEST(ModelWeightsTest, AMissingCudaDeviceIsADeviceError) {
  const ModelConfig c = testing_util::llama_config(32, 8, 16, 1, 2, 1, 4);
  ModelWeightsBuilder builder(c);
  std::vector<std::vector<float>> storage;
  testing_util::for_each_llama_param(c, [&](const std::string& name, std::vector<int64_t> shape,
                                            float, float) {
    storage.emplace_back(shape[0] * (shape.size() > 1 ? shape[1] : 1), 0.5f);
    builder.add(name, shape.size() == 1
                          ? Tensor(storage.back().data(), DType::kFloat32, {shape[0]})
                          : Tensor(storage.back().data(), DType::kFloat32, {shape[0], shape[1]}));
  });
  const Device missing = Device::cuda(cuda_device_count());
  expect_error<DeviceError>([&] { ModelWeights(std::move(builder), missing); },
                            "device " + missing.str());
}

// On the CPU the weights stay where the builder put them, on the host.
TEST(ModelWeightsTest, CpuWeightsAreOnTheHost) {
  const ModelConfig c = testing_util::llama_config(32, 8, 16, 1, 2, 1, 4);
  ModelWeightsBuilder builder(c);
  std::vector<std::vector<float>> storage;
  testing_util::for_each_llama_param(c, [&](const std::string& name, std::vector<int64_t> shape,
                                            float, float) {
    storage.emplace_back(shape[0] * (shape.size() > 1 ? shape[1] : 1), 0.5f);
    builder.add(name, shape.size() == 1
                          ? Tensor(storage.back().data(), DType::kFloat32, {shape[0]})
                          : Tensor(storage.back().data(), DType::kFloat32, {shape[0], shape[1]}));
  });
  const ModelWeights w(std::move(builder));
  EXPECT_EQ(w.device(), Device::cpu());
  EXPECT_EQ(w.embed().device(), Device::cpu());
  EXPECT_EQ(w.layer(0).qkv.device(), Device::cpu());
}

}  // namespace
}  // namespace lorart

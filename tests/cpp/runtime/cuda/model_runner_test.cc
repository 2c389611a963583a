// The CUDA runner against the CPU runner on a tiny random model: the same steps (a mixed prefill,
// then a decode step that reads the prefill's KV cache) through ModelWeights on the device, the
// model's one-copy upload of the step and the logits' copy back. Skips without a GPU.
#include "runtime/model_runner.h"

#include <gtest/gtest.h>

#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "core/buffer.h"
#include "kernels/cuda/cuda_test_util.h"
#include "test_util.h"

namespace lorart {
namespace {

constexpr int64_t kVocab = 48, kBlocks = 8, kBlockSize = 4;

std::shared_ptr<LlamaModel> tiny_model(Device device, DType dtype) {
  const ModelConfig c = testing_util::llama_config(kVocab, 64, 96, 2, 4, 2, 16);
  ModelWeightsBuilder builder(c, dtype);
  std::vector<std::vector<float>> storage;
  uint32_t seed = 7;
  testing_util::for_each_llama_param(c, [&](const std::string& name, std::vector<int64_t> shape,
                                            float lo, float hi) {
    storage.push_back(
        testing_util::random_floats(shape[0] * (shape.size() > 1 ? shape[1] : 1), seed++, lo, hi));
    builder.add(name, shape.size() == 1
                          ? Tensor(storage.back().data(), DType::kFloat32, {shape[0]})
                          : Tensor(storage.back().data(), DType::kFloat32, {shape[0], shape[1]}));
  });
  return std::make_shared<LlamaModel>(c, ModelWeights(std::move(builder), device), 16, 8);
}

// Two sequences prefilling 3 and 2 tokens (logits of every token), then each decoding one.
struct Steps {
  std::vector<int32_t> ids = {3, 9, 27, 5, 11}, positions = {0, 1, 2, 0, 1}, starts = {0, 3, 5},
                       ctx = {0, 0}, tables = {0, 1}, slots = {-1, -1}, picks = {0, 1, 2, 3, 4};
  std::vector<int32_t> decode_ids = {14, 40}, decode_positions = {3, 2}, decode_starts = {0, 1, 2},
                       decode_ctx = {3, 2}, decode_tables = {0, 1}, decode_picks = {0, 1};
  std::vector<int32_t> sample_rows = {2, 4}, decode_rows = {0, 1};
  std::vector<SamplingParams> sampling = {{1, 1.0f, 0.0f}, {1, 1.0f, 0.0f}};  // greedy
  std::vector<uint64_t> rng = {11, 12};
  static Tensor v(std::vector<int32_t>& a) {
    return Tensor(a.data(), DType::kInt32, {static_cast<int64_t>(a.size())});
  }
  StepInput prefill(const LoraTable& lora) {
    StepInput in;
    in.batch = {
        v(ids),   v(positions), v(starts), v(ctx), Tensor(tables.data(), DType::kInt32, {2, 1}),
        v(slots), v(picks)};
    in.lora = &lora;
    in.sample_rows = v(sample_rows);
    in.sampling = sampling.data();
    in.rng_states = rng.data();
    return in;
  }
  StepInput decode(const LoraTable& lora) {
    StepInput in;
    in.batch = {v(decode_ids),
                v(decode_positions),
                v(decode_starts),
                v(decode_ctx),
                Tensor(decode_tables.data(), DType::kInt32, {2, 1}),
                v(slots),
                v(decode_picks)};
    in.lora = &lora;
    in.sample_rows = v(decode_rows);
    in.sampling = sampling.data();
    in.rng_states = rng.data();
    return in;
  }
};

std::vector<float> host_copy(const Tensor& t) {
  const float* p = t.data_as<const float>();
  return std::vector<float>(p, p + t.numel());
}

// Logits within `tol` of the CPU's (relative to the row's largest magnitude, at least 1) and the
// same greedy tokens. Both runners run Precision::kFloat32 and widen the same stored weights to
// float32, so only the order of the float32 sums may differ (K <= 96, two layers): about 1e-6
// relative; 1e-4 (float32) and 1e-3 (bf16 weights, larger logits) leave ample margin while a
// wrong row, a stale cache entry or a misplaced upload shows as O(1).
void compare_runners(DType dtype, float tol) {
  const auto cpu_model = tiny_model(Device::cpu(), dtype);
  const auto gpu_model = tiny_model(Device::cuda(0), dtype);
  ASSERT_EQ(gpu_model->device(), Device::cuda(0));
  ModelRunner cpu(cpu_model, kBlocks, kBlockSize, ExecContext::cpu(1));
  ExecContext cuda_ctx;
  cuda_ctx.device = Device::cuda(0);
  ModelRunner gpu(gpu_model, kBlocks, kBlockSize, cuda_ctx);
  ASSERT_NE(gpu.context().stream, nullptr);  // the runner made its own stream
  LoraTable lora(cpu_model->config());
  Steps cs, gs;
  for (int step = 0; step < 2; ++step) {
    const StepOutput c = cpu.run(step == 0 ? cs.prefill(lora) : cs.decode(lora));
    const std::vector<float> cl = host_copy(c.logits);
    const std::vector<int32_t> ct(c.tokens.data_as<const int32_t>(),
                                  c.tokens.data_as<const int32_t>() + c.tokens.numel());
    const StepOutput g = gpu.run(step == 0 ? gs.prefill(lora) : gs.decode(lora));
    ASSERT_EQ(g.logits.shape_str(), c.logits.shape_str());
    ASSERT_TRUE(g.logits.device().is_cpu());
    const std::vector<float> gl = host_copy(g.logits);
    const int64_t width = c.logits.size(1);
    for (int64_t r = 0; r < c.logits.size(0); ++r) {
      float scale = 0.0f;
      for (int64_t j = 0; j < width; ++j) scale = std::max(scale, std::fabs(cl[r * width + j]));
      for (int64_t j = 0; j < width; ++j) {
        ASSERT_NEAR(gl[r * width + j], cl[r * width + j], tol * std::max(scale, 1.0f))
            << "step " << step << " row " << r << " col " << j;
      }
    }
    for (size_t i = 0; i < ct.size(); ++i) {
      EXPECT_EQ(g.tokens.data_as<const int32_t>()[i], ct[i]) << "step " << step << " sample " << i;
    }
  }
}

TEST(CudaModelRunnerTest, Float32MatchesTheCpuRunner) {
  LORART_REQUIRE_GPU();
  compare_runners(DType::kFloat32, 1e-4f);
}

TEST(CudaModelRunnerTest, BFloat16MatchesTheCpuRunner) {
  LORART_REQUIRE_GPU();
  compare_runners(DType::kBFloat16, 1e-3f);
}

// The model's weights and KV pool live on the device; the runner's context is the model's.
TEST(CudaModelRunnerTest, WeightsAndKvPoolAreOnTheDevice) {
  LORART_REQUIRE_GPU();
  const auto model = tiny_model(Device::cuda(0), DType::kBFloat16);
  EXPECT_EQ(model->weights().layer(0).qkv.device(), Device::cuda(0));
  EXPECT_EQ(model->weights().matrix_layout(), WeightLayout::kRowMajor);
  ExecContext ctx;
  ctx.device = Device::cuda(0);
  ModelRunner runner(model, kBlocks, kBlockSize, ctx);
  EXPECT_EQ(runner.kv_cache().device(), Device::cuda(0));
}

}  // namespace
}  // namespace lorart

// The executor on a CUDA runner: its KV pool sized from free device memory
// (free_gpu_memory_fraction), a fraction too small for one max_seq_len sequence refused by name,
// and greedy generations equal to the CPU executor's on the same random model. Skips without a
// GPU.
#include "executor/executor.h"

#include <gtest/gtest.h>

#include <chrono>
#include <memory>
#include <stdexcept>
#include <vector>

#include "core/buffer.h"
#include "core/errors.h"
#include "executor/executor_test_util.h"
#include "kernels/cuda/cuda_test_util.h"
#include "model/kv_cache.h"
#include "test_util.h"

namespace lorart {
namespace {

std::shared_ptr<LlamaModel> model_on(Device device) {
  return testing_util::random_model(testing_util::executor_model_config(), 64, 8, 7, device);
}

ExecutorConfig config_on(const char* device) {
  ExecutorConfig c;
  c.device = device;
  c.max_batch_size = 4;
  c.max_num_tokens = 64;
  c.max_lora_rank = 8;
  c.kv_cache.block_size = 4;
  c.kv_cache.max_tokens = 1 << 20;  // the cap does not bind: free memory does
  return c;
}

std::vector<int32_t> generate(Executor& e, std::vector<int32_t> prompt) {
  InferenceRequest r;
  r.input_token_ids = std::move(prompt);
  r.max_new_tokens = 6;
  r.sampling_config.top_k = 1;
  const uint64_t id = e.enqueue_request(std::move(r));
  std::vector<int32_t> tokens;
  for (bool done = false; !done;) {
    const std::vector<Response> got = e.await_responses(id, std::chrono::milliseconds(60'000));
    if (got.empty()) throw std::runtime_error("no response within the timeout");
    for (const Response& resp : got) {
      EXPECT_TRUE(resp.error.empty()) << resp.error;
      tokens.insert(tokens.end(), resp.output_token_ids.begin(), resp.output_token_ids.end());
      done = done || resp.is_final;
    }
  }
  return tokens;
}

TEST(CudaExecutorTest, KvPoolIsSizedFromFreeDeviceMemory) {
  LORART_REQUIRE_GPU();
  const Device gpu = Device::cuda(0);
  auto model = model_on(gpu);
  ExecutorConfig c = config_on("cuda");
  c.kv_cache.free_gpu_memory_fraction = 0.001;
  const auto free_before = static_cast<double>(device_free_memory(gpu));
  Executor e(model, c);
  const int64_t blocks = e.stats().total_kv_blocks;
  const auto block_bytes =
      static_cast<double>(KvCache::checked_bytes(model->config(), 1, 4, gpu, DType::kFloat32));
  EXPECT_GT(blocks, 0);
  EXPECT_LT(blocks, c.kv_cache.max_tokens / 4);
  EXPECT_LE(static_cast<double>(blocks) * block_bytes, 0.001 * free_before);
  e.shutdown();
}

TEST(CudaExecutorTest, AFractionBelowOneSequenceIsRefusedByName) {
  LORART_REQUIRE_GPU();
  ExecutorConfig c = config_on("cuda");
  c.kv_cache.free_gpu_memory_fraction = 1e-12;
  EXPECT_THROW(Executor(model_on(Device::cuda(0)), c), InvalidArgument);
}

TEST(CudaExecutorTest, GreedyGenerationsEqualTheCpuExecutors) {
  LORART_REQUIRE_GPU();
  ExecutorConfig cpu_config = config_on("cpu");
  cpu_config.kv_cache.max_tokens = 1024;
  ExecutorConfig gpu_config = config_on("cuda");
  gpu_config.kv_cache.max_tokens = 1024;
  Executor cpu(model_on(Device::cpu()), cpu_config);
  Executor gpu(model_on(Device::cuda(0)), gpu_config);
  for (const std::vector<int32_t>& prompt :
       {std::vector<int32_t>{3, 14, 15, 9}, std::vector<int32_t>{1, 2},
        std::vector<int32_t>(20, 5)}) {
    EXPECT_EQ(generate(gpu, prompt), generate(cpu, prompt));
  }
  cpu.shutdown();
  gpu.shutdown();
}

}  // namespace
}  // namespace lorart

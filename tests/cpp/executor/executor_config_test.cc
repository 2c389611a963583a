#include "executor/executor_config.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <string>

#include "core/buffer.h"
#include "core/errors.h"
#include "executor_test_util.h"
#include "test_util.h"

namespace lorart {
namespace {

using testing_util::expect_error;

constexpr int64_t kInt64Max = std::numeric_limits<int64_t>::max();

TEST(ExecutorConfigTest, EveryFieldNamesItsLimit) {
  struct Case {
    void (*edit)(ExecutorConfig&);
    const char* message;
  };
  const Case cases[] = {
      {[](ExecutorConfig& c) { c.max_batch_size = 0; },
       "ExecutorConfig.max_batch_size must be in [1, 65536], got 0"},
      {[](ExecutorConfig& c) { c.max_batch_size = kInt64Max; },
       "ExecutorConfig.max_batch_size must be in [1, 65536], got 9223372036854775807"},
      {[](ExecutorConfig& c) { c.max_num_tokens = int64_t{1} << 31; },
       "ExecutorConfig.max_num_tokens must be in [1, 2147483647], got 2147483648"},
      {[](ExecutorConfig& c) { c.max_seq_len = -5; },
       "ExecutorConfig.max_seq_len must be 0 (the model's max_position_embeddings) or in [1, "
       "2147483647], got -5"},
      {[](ExecutorConfig& c) { c.max_lora_rank = 0; },
       "ExecutorConfig.max_lora_rank must be in [1, 65536], got 0"},
      {[](ExecutorConfig& c) { c.num_threads = 1025; },
       "ExecutorConfig.num_threads must be 0 (auto) or in [1, 1024], got 1025"},
      {[](ExecutorConfig& c) { c.kv_cache.block_size = 0; },
       "ExecutorConfig.kv_cache.block_size must be in [1, 1024], got 0"},
      {[](ExecutorConfig& c) { c.kv_cache.max_tokens = -1; },
       "ExecutorConfig.kv_cache.max_tokens must be > 0, got -1"},
      {[](ExecutorConfig& c) { c.kv_cache.dtype = "int8"; },
       "ExecutorConfig.kv_cache.dtype must be \"auto\", \"float32\", \"float16\" or "
       "\"bfloat16\", got \"int8\""},
      // ceil(max_tokens / block_size) is computed without the overflow of the usual formula.
      {[](ExecutorConfig& c) {
         c.kv_cache.block_size = 1;
         c.kv_cache.max_tokens = kInt64Max;
       },
       "ExecutorConfig.kv_cache.max_tokens (9223372036854775807) needs 9223372036854775807 "
       "blocks of 1 tokens, more than the 2147483647 block ids"},
      {[](ExecutorConfig& c) { c.kv_cache.free_gpu_memory_fraction = 0.0; },
       "ExecutorConfig.kv_cache.free_gpu_memory_fraction must be in (0, 1], got 0"},
      {[](ExecutorConfig& c) { c.kv_cache.free_gpu_memory_fraction = 1.5; },
       "ExecutorConfig.kv_cache.free_gpu_memory_fraction must be in (0, 1], got 1.5"},
      {[](ExecutorConfig& c) { c.kv_cache.free_gpu_memory_fraction = std::nan(""); },
       "ExecutorConfig.kv_cache.free_gpu_memory_fraction must be in (0, 1], got nan"},
      {[](ExecutorConfig& c) { c.lora_cache.device_cache_bytes = 0; },
       "ExecutorConfig.lora_cache.device_cache_bytes must be > 0, got 0"},
      {[](ExecutorConfig& c) { c.dtype = "int8"; },
       "ExecutorConfig.dtype must be 'auto' (the checkpoint's), 'float32', 'float16' or "
       "'bfloat16'; got 'int8'"},
      {[](ExecutorConfig& c) { c.precision = "float16"; },
       "ExecutorConfig.precision must be 'float32' (exact) or 'bfloat16'; got 'float16'"},
      {[](ExecutorConfig& c) {
         c.max_seq_len = 100;
         c.kv_cache.max_tokens = 99;
       },
       "ExecutorConfig.kv_cache.max_tokens (99) must hold at least one max_seq_len (100) "
       "sequence"},
  };
  for (const Case& c : cases) {
    ExecutorConfig config;
    c.edit(config);
    expect_error<InvalidArgument>([&] { config.validate(); }, c.message);
  }
  ExecutorConfig defaults;
  defaults.validate();
  EXPECT_EQ(defaults.kv_cache.free_gpu_memory_fraction, 0.9);
  defaults.kv_cache.free_gpu_memory_fraction = 1.0;  // the whole of what is left is allowed
  defaults.validate();
  // Budgets are bounds, not allocations: the largest is fine.
  defaults.lora_cache.host_cache_bytes = kInt64Max;
  defaults.validate();
}

TEST(ExecutorConfigTest, MaxSeqLenDefaultsToTheModelAndIsCappedByIt) {
  const ModelConfig model = testing_util::executor_model_config();  // 64 positions
  ExecutorConfig config;
  EXPECT_EQ(config.max_seq_len, 0);
  EXPECT_EQ(config.resolve(model).max_seq_len, 64);
  config.kv_cache.max_tokens = 40;
  EXPECT_EQ(config.resolve(model).max_seq_len, 40);  // never more than the KV pool holds
  config.kv_cache.max_tokens = 1024;
  config.max_seq_len = 64;
  EXPECT_EQ(config.resolve(model).max_seq_len, 64);
  config.max_seq_len = 65;
  expect_error<InvalidArgument>([&] { config.resolve(model); },
                                "ExecutorConfig.max_seq_len (65) exceeds the model's "
                                "max_position_embeddings (64); lower it, or leave it 0 for the "
                                "model's limit");
}

TEST(ExecutorConfigTest, KvCacheDtypeAutoResolvesToTheDevicesDefault) {
  const ModelConfig model = testing_util::executor_model_config();
  ExecutorConfig config;
  EXPECT_EQ(config.kv_cache.dtype, "float32");
  config.kv_cache.dtype = "auto";
  const ExecutorConfig resolved = config.resolve(model);
  EXPECT_EQ(resolved.kv_cache.dtype, "float32");  // the CPU
  EXPECT_EQ(kv_cache_dtype(resolved.kv_cache), DType::kFloat32);
  config.kv_cache.dtype = "bfloat16";
  EXPECT_EQ(kv_cache_dtype(config.resolve(model).kv_cache), DType::kBFloat16);
  config.kv_cache.dtype = "float16";
  EXPECT_EQ(kv_cache_dtype(config.resolve(model).kv_cache), DType::kFloat16);
}

TEST(ExecutorConfigTest, TheStepsBlockTableIsBounded) {
  ModelConfig model = testing_util::executor_model_config();
  model.max_position_embeddings = 1 << 20;
  ExecutorConfig config;
  config.max_batch_size = kMaxBatchSize;
  config.max_seq_len = 1 << 20;
  config.kv_cache.block_size = 16;
  config.kv_cache.max_tokens = 1 << 20;
  expect_error<InvalidArgument>([&] { config.resolve(model); },
                                "ExecutorConfig.max_batch_size (65536) x the 65536 KV blocks of "
                                "max_seq_len (1048576) at block_size 16 is more than the step's "
                                "2147483647 block-table entries");
  config.kv_cache.block_size = 64;
  EXPECT_EQ(config.resolve(model).max_seq_len, 1 << 20);
}

TEST(ExecutorConfigTest, ThreadsResolveToTheAvailableCpus) {
  ExecutorConfig config;
  config.num_threads = 3;
  EXPECT_EQ(config.resolve(testing_util::executor_model_config()).num_threads, 3);
  config.num_threads = 0;
  const char* env = std::getenv("OMP_NUM_THREADS");
  const int64_t expected = env != nullptr ? std::atoll(env) : available_cpus();
  EXPECT_EQ(config.resolve(testing_util::executor_model_config()).num_threads, expected);
  EXPECT_GE(available_cpus(), 1);
}

TEST(ExecutorConfigTest, AllocationsPastTheMachinesMemoryAreRefused) {
  ModelConfig model = testing_util::executor_model_config();
  model.max_position_embeddings = 1 << 20;
  // 2 layers x K,V x 2 heads x 8 x 4 bytes = 256 bytes per token.
  ExecutorConfig config;
  config.kv_cache.block_size = kMaxBlockSize;
  config.kv_cache.max_tokens = kMaxInt32 * kMaxBlockSize;  // the most blocks of the largest size
  const std::string memory = std::to_string(physical_memory_bytes());
  expect_error<InvalidArgument>(
      [&] { config.resolve(model); },
      "ExecutorConfig.kv_cache.max_tokens (2199023254528) needs 562949953159168 bytes of KV "
      "cache (256 bytes per token), more than this machine's memory (" +
          memory + " bytes)");
  // A product past int64 is reported as such, never wrapped.
  model.num_layers = int64_t{1} << 40;
  expect_error<InvalidArgument>([&] { config.resolve(model); }, "needs more than 2^63 bytes");
  model = testing_util::executor_model_config();
  config = ExecutorConfig{};
  config.max_num_tokens = kMaxInt32;
  model.vocab_size = int64_t{1} << 40;
  expect_error<InvalidArgument>([&] { config.resolve(model); },
                                "ExecutorConfig.max_num_tokens (2147483647) needs more than 2^63 "
                                "bytes of logits ([max_num_tokens, vocab_size 1099511627776] "
                                "float32), more than this machine's memory");
}

// "cpu", "cuda", "cuda:N" name a device; anything else is refused by validate(), naming the field.
TEST(ExecutorConfigTest, DeviceNamesParse) {
  EXPECT_EQ(parse_device("cpu"), Device::cpu());
  EXPECT_EQ(parse_device("cuda"), Device::cuda(0));
  EXPECT_EQ(parse_device("cuda:3"), Device::cuda(3));
  EXPECT_EQ(parse_device("cuda:9999"), Device::cuda(9999));
  for (const char* bad : {"gpu", "cuda:", "cuda:x", "cuda:-1", "cuda:10000", "CPU", "cuda:1 "}) {
    ExecutorConfig c;
    c.device = bad;
    expect_error<InvalidArgument>([&] { c.validate(); },
                                  std::string("ExecutorConfig.device must be 'cpu', 'cuda' or "
                                              "'cuda:N' (N the CUDA device ordinal, 0 to 9999), "
                                              "got '") +
                                      bad + "'");
  }
  ExecutorConfig c;
  c.device = "cuda:1";
  EXPECT_NO_THROW(c.validate());  // the name is fine; whether the GPU is there is resolve()'s
}

// A CUDA device this build or machine does not have is a DeviceError naming it, from resolve()
// (which the executor runs before it allocates, and Python before it reads a weight).
TEST(ExecutorConfigTest, AMissingCudaDeviceIsADeviceErrorAtResolve) {
  ExecutorConfig c;
  c.device = "cuda:" + std::to_string(cuda_device_count());  // one past the visible ones
  const std::string expected =
      cuda_backend_built() ? "device " + c.device + " is not available (" +
                                 std::to_string(cuda_device_count()) + " CUDA device(s) visible)"
                           : "device " + c.device + ": this lorart build has no CUDA backend";
  expect_error<DeviceError>([&] { c.resolve(testing_util::executor_model_config()); }, expected);
}

}  // namespace
}  // namespace lorart

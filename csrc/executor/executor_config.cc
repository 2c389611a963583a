#include "executor/executor_config.h"

#include "core/buffer.h"

#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <string>

#include "core/buffer.h"
#include "core/errors.h"

namespace lorart {

namespace {

void in_range(const char* name, int64_t value, int64_t lo, int64_t hi) {
  if (value < lo || value > hi) {
    raise<InvalidArgument>("ExecutorConfig.", name, " must be in [", lo, ", ", hi, "], got ",
                           value);
  }
}

void positive(const char* name, int64_t value) {
  if (value <= 0) raise<InvalidArgument>("ExecutorConfig.", name, " must be > 0, got ", value);
}

// ceil(tokens / block_size) without the overflow of tokens + block_size - 1.
int64_t blocks_for(const KvCacheConfig& kv) {
  return kv.max_tokens / kv.block_size + (kv.max_tokens % kv.block_size != 0);
}

// a * b, or -1 when it does not fit in int64.
int64_t checked_mul(int64_t a, int64_t b) {
  int64_t out = 0;
  return __builtin_mul_overflow(a, b, &out) ? -1 : out;
}

// ceil(quota / period) of a cgroup CPU limit, or 0 when none is set or readable.
int64_t cgroup_cpu_limit() {
  int64_t quota = 0, period = 0;
  std::ifstream v2("/sys/fs/cgroup/cpu.max");  // "max 100000" or "200000 100000"
  std::string first;
  if (v2 >> first >> period) {
    if (first == "max") return 0;
    quota = std::atoll(first.c_str());
  } else {
    std::ifstream q("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"),
        p("/sys/fs/cgroup/cpu/cpu.cfs_period_us");
    if (!(q >> quota) || !(p >> period)) return 0;
  }
  if (quota <= 0 || period <= 0) return 0;
  return (quota + period - 1) / period;
}

// The first count of OMP_NUM_THREADS ("4" or "4,2"), or 0 when unset or not a positive number.
int64_t omp_num_threads_env() {
  const char* env = std::getenv("OMP_NUM_THREADS");
  if (env == nullptr) return 0;
  char* end = nullptr;
  const long long n = std::strtoll(env, &end, 10);
  return end != env && n > 0 ? std::min<int64_t>(n, kMaxThreads) : 0;
}

}  // namespace

int64_t available_cpus() {
  int64_t cpus = 0;
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) cpus = CPU_COUNT(&set);
  if (cpus <= 0) cpus = sysconf(_SC_NPROCESSORS_ONLN);
  const int64_t quota = cgroup_cpu_limit();
  if (quota > 0) cpus = std::min(cpus, quota);
  return std::clamp<int64_t>(cpus, 1, kMaxThreads);
}

int64_t physical_memory_bytes() {
  const int64_t pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
  const int64_t bytes = pages > 0 && page > 0 ? checked_mul(pages, page) : -1;
  return bytes > 0 ? bytes : std::numeric_limits<int64_t>::max();
}

void ExecutorConfig::validate() const {
  parse_device(device);
  static const char* const kDtypes[] = {"auto", "float32", "float16", "bfloat16",
                                        "fp32", "fp16",    "bf16"};
  if (std::find(std::begin(kDtypes), std::end(kDtypes), dtype) == std::end(kDtypes)) {
    raise<InvalidArgument>("ExecutorConfig.dtype must be 'auto' (the checkpoint's), 'float32', ",
                           "'float16' or 'bfloat16'; got '", dtype, "'");
  }
  precision_from_name(precision, "ExecutorConfig.precision");
  in_range("max_batch_size", max_batch_size, 1, kMaxBatchSize);
  in_range("max_num_tokens", max_num_tokens, 1, kMaxInt32);
  if (max_seq_len != 0 && (max_seq_len < 1 || max_seq_len > kMaxInt32)) {
    raise<InvalidArgument>(
        "ExecutorConfig.max_seq_len must be 0 (the model's max_position_embeddings) or in [1, ",
        kMaxInt32, "], got ", max_seq_len);
  }
  in_range("max_lora_rank", max_lora_rank, 1, kMaxLoraRank);
  if (num_threads != 0 && (num_threads < 1 || num_threads > kMaxThreads)) {
    raise<InvalidArgument>("ExecutorConfig.num_threads must be 0 (auto) or in [1, ", kMaxThreads,
                           "], got ", num_threads);
  }
  in_range("kv_cache.block_size", kv_cache.block_size, 1, kMaxBlockSize);
  positive("kv_cache.max_tokens", kv_cache.max_tokens);
  if (!(kv_cache.free_gpu_memory_fraction > 0.0 && kv_cache.free_gpu_memory_fraction <= 1.0)) {
    raise<InvalidArgument>("ExecutorConfig.kv_cache.free_gpu_memory_fraction must be in (0, 1], ",
                           "got ", kv_cache.free_gpu_memory_fraction);
  }
  if (kv_cache.dtype != "auto" && kv_cache.dtype != "float32" && kv_cache.dtype != "float16" &&
      kv_cache.dtype != "bfloat16") {
    raise<InvalidArgument>(
        "ExecutorConfig.kv_cache.dtype must be \"auto\", \"float32\", \"float16\" or "
        "\"bfloat16\", got \"",
        kv_cache.dtype, "\"");
  }
  const int64_t blocks = blocks_for(kv_cache);
  if (blocks > kMaxInt32) {
    raise<InvalidArgument>("ExecutorConfig.kv_cache.max_tokens (", kv_cache.max_tokens, ") needs ",
                           blocks, " blocks of ", kv_cache.block_size, " tokens, more than the ",
                           kMaxInt32, " block ids");
  }
  // The budgets bound what the LoRA cache holds; nothing of that size is allocated up front.
  positive("lora_cache.host_cache_bytes", lora_cache.host_cache_bytes);
  positive("lora_cache.device_cache_bytes", lora_cache.device_cache_bytes);
  if (max_seq_len > kv_cache.max_tokens) {
    raise<InvalidArgument>("ExecutorConfig.kv_cache.max_tokens (", kv_cache.max_tokens,
                           ") must hold at least one max_seq_len (", max_seq_len, ") sequence");
  }
}

DType kv_cache_dtype(const KvCacheConfig& kv) {
  if (kv.dtype == "float32") return DType::kFloat32;
  if (kv.dtype == "float16") return DType::kFloat16;
  if (kv.dtype == "bfloat16") return DType::kBFloat16;
  raise<InvalidArgument>("ExecutorConfig.kv_cache.dtype \"", kv.dtype,
                         "\" is not a resolved KV cache dtype (float32, float16, bfloat16)");
}

Device parse_device(const std::string& name, const char* field) {
  if (name == "cpu") return Device::cpu();
  if (name == "cuda") return Device::cuda(0);
  if (name.rfind("cuda:", 0) == 0 && name.size() > 5 && name.size() <= 9 &&
      std::all_of(name.begin() + 5, name.end(), [](char c) { return c >= '0' && c <= '9'; })) {
    return Device::cuda(std::stoi(name.substr(5)));  // at most 4 digits: no overflow
  }
  raise<InvalidArgument>(field, " must be 'cpu', 'cuda' or 'cuda:N' (N the CUDA ",
                         "device ordinal, 0 to 9999), got '", name, "'");
}

ExecutorConfig ExecutorConfig::resolve(const ModelConfig& model) const {
  validate();
  require_device(parse_device(device));  // DeviceError before anything is loaded
  ExecutorConfig out = *this;
  if (max_seq_len > model.max_position_embeddings) {
    raise<InvalidArgument>("ExecutorConfig.max_seq_len (", max_seq_len,
                           ") exceeds the model's max_position_embeddings (",
                           model.max_position_embeddings,
                           "); lower it, or leave it 0 for the model's limit");
  }
  if (max_seq_len == 0) {
    out.max_seq_len = std::min({model.max_position_embeddings, kv_cache.max_tokens, kMaxInt32});
    if (out.max_seq_len < 1) {
      raise<InvalidArgument>("ExecutorConfig.max_seq_len: the model's max_position_embeddings (",
                             model.max_position_embeddings, ") leaves no room for a request");
    }
  }
  // The step's block table, [max_batch_size, blocks per max_seq_len] int32, reserved up front.
  const int64_t width =
      out.max_seq_len / kv_cache.block_size + (out.max_seq_len % kv_cache.block_size != 0);
  if (checked_mul(max_batch_size, width) > kMaxInt32) {
    raise<InvalidArgument>("ExecutorConfig.max_batch_size (", max_batch_size, ") x the ", width,
                           " KV blocks of max_seq_len (", out.max_seq_len, ") at block_size ",
                           kv_cache.block_size, " is more than the step's ", kMaxInt32,
                           " block-table entries; lower one, or raise kv_cache.block_size");
  }
  if (kv_cache.dtype == "auto") out.kv_cache.dtype = device == "cpu" ? "float32" : "bfloat16";
  if (num_threads == 0) {
    const int64_t env = omp_num_threads_env();
    out.num_threads = env > 0 ? env : available_cpus();
  }
  // The two allocations sized from the config here (the model's workspace checks its own).
  const int64_t memory = physical_memory_bytes();
  const int64_t kv_tokens = blocks_for(kv_cache) * kv_cache.block_size;  // < 2^47: no overflow
  const int64_t per_token = checked_mul(
      checked_mul(checked_mul(model.num_layers, 2), model.num_kv_heads),
      checked_mul(model.head_dim, static_cast<int64_t>(dtype_size(kv_cache_dtype(out.kv_cache)))));
  const int64_t kv_bytes = per_token < 0 ? -1 : checked_mul(kv_tokens, per_token);
  if (kv_bytes < 0 || kv_bytes > memory) {
    raise<InvalidArgument>("ExecutorConfig.kv_cache.max_tokens (", kv_cache.max_tokens, ") needs ",
                           kv_bytes < 0 ? std::string("more than 2^63") : std::to_string(kv_bytes),
                           " bytes of KV cache (", per_token, " bytes per token), more than ",
                           "this machine's memory (", memory, " bytes)");
  }
  const int64_t logits_bytes =
      checked_mul(checked_mul(max_num_tokens, model.vocab_size), sizeof(float));
  if (logits_bytes < 0 || logits_bytes > memory) {
    raise<InvalidArgument>(
        "ExecutorConfig.max_num_tokens (", max_num_tokens, ") needs ",
        logits_bytes < 0 ? std::string("more than 2^63") : std::to_string(logits_bytes),
        " bytes of logits ([max_num_tokens, vocab_size ", model.vocab_size,
        "] float32), more than this machine's memory (", memory, " bytes)");
  }
  return out;
}

}  // namespace lorart

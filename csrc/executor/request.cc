#include "executor/request.h"

#include <cmath>

#include "core/errors.h"

namespace lorart {

void SamplingConfig::validate() const {
  if (top_k < 0) raise<InvalidArgument>("sampling_config.top_k must be >= 0, got ", top_k);
  if (!(top_p > 0.0f && top_p <= 1.0f)) {
    raise<InvalidArgument>("sampling_config.top_p must be in (0, 1], got ", top_p);
  }
  if (!(temperature >= 0.0f) || !std::isfinite(temperature)) {
    raise<InvalidArgument>("sampling_config.temperature must be a finite value >= 0, got ",
                           temperature);
  }
}

const char* finish_reason_name(FinishReason reason) {
  switch (reason) {
    case FinishReason::kNotFinished:
      return "not_finished";
    case FinishReason::kLength:
      return "length";
    case FinishReason::kEndId:
      return "end_id";
    case FinishReason::kStop:
      return "stop";
    case FinishReason::kCancelled:
      return "cancelled";
    case FinishReason::kError:
      return "error";
  }
  return "unknown";
}

void ExecutorConfig::validate() const {
  if (device != "cpu") {
    raise<InvalidArgument>("ExecutorConfig.device '", device, "' is not supported by this build ",
                           "(supported: cpu; the CUDA executor lands with the CUDA kernels)");
  }
  if (dtype != "float32") {
    raise<InvalidArgument>("ExecutorConfig.dtype '", dtype, "' is not supported on cpu ",
                           "(supported: float32; checkpoints in float16/bfloat16 are converted)");
  }
  auto positive = [](const char* name, int64_t v) {
    if (v <= 0) raise<InvalidArgument>("ExecutorConfig.", name, " must be > 0, got ", v);
  };
  positive("max_batch_size", max_batch_size);
  positive("max_num_tokens", max_num_tokens);
  positive("max_seq_len", max_seq_len);
  positive("max_lora_rank", max_lora_rank);
  positive("kv_cache.block_size", kv_cache.block_size);
  positive("kv_cache.max_tokens", kv_cache.max_tokens);
  positive("lora_cache.host_cache_bytes", lora_cache.host_cache_bytes);
  positive("lora_cache.device_cache_bytes", lora_cache.device_cache_bytes);
  if (kv_cache.max_tokens < max_seq_len) {
    raise<InvalidArgument>("ExecutorConfig.kv_cache.max_tokens (", kv_cache.max_tokens,
                           ") must hold at least one max_seq_len (", max_seq_len, ") sequence");
  }
}

}  // namespace lorart

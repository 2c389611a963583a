// The executor's public value types (names as in DESIGN.md, "Public API"): what a request asks
// for, how to sample, and what comes back. Plain data; copied freely. (How the executor is sized:
// executor_config.h.)
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "lora/lora_tensors.h"

namespace lorart {

struct SamplingConfig {
  int32_t top_k = 0;             // 0 = no limit; 1 = greedy
  float top_p = 1.0f;            // nucleus mass in (0, 1]
  float temperature = 1.0f;      // 0 = greedy
  std::optional<uint64_t> seed;  // same seed -> same tokens, whatever the batch; unset = random
  // Throws InvalidArgument naming the field and its allowed range.
  void validate() const;
};

struct InferenceRequest {
  std::vector<int32_t> input_token_ids;
  int32_t max_new_tokens = 16;
  SamplingConfig sampling_config;
  std::optional<int32_t> end_id;
  std::vector<std::vector<int32_t>> stop_token_ids;  // stop when the output ends with any of these
  std::optional<uint64_t> lora_task_id;
  std::optional<LoraWeights> lora_weights;  // first request of a task: weights + config
  std::optional<LoraConfig> lora_config;
  bool streaming = false;
  bool return_context_logits = false;
  bool return_generation_logits = false;
  bool return_log_probs = false;
};

enum class FinishReason : int8_t { kNotFinished, kLength, kEndId, kStop, kCancelled, kError };
const char* finish_reason_name(FinishReason reason);  // "length", "end_id", ...

// Whose fault a kError response is, so a server can answer 400 or 500: the request's (it broke
// a rule: a field out of its limit, an adapter that fails validation) or the runtime's (out of
// memory, a failed forward, non-finite logits).
enum class ErrorKind : int8_t { kNone, kInvalidRequest, kInternal };
const char* error_kind_name(ErrorKind kind);  // "none", "invalid_request", "internal"

struct Response {
  uint64_t request_id = 0;
  // Non-streaming: every generated token. Streaming: the tokens new since the last response.
  std::vector<int32_t> output_token_ids;
  FinishReason finish_reason = FinishReason::kNotFinished;
  std::string error;                        // empty unless finish_reason == kError
  ErrorKind error_kind = ErrorKind::kNone;  // kNone unless finish_reason == kError
  bool is_final = false;
  // [prompt_len, vocab] when asked for: in the final response, or in the first response of a
  // streaming request.
  std::vector<float> context_logits;
  std::vector<float> generation_logits;  // [n, vocab] for this response's tokens when asked for
  std::vector<float> log_probs;          // [n] log p(token) under the model, when asked for
  int64_t vocab_size = 0;                // row width of the logits arrays
};

}  // namespace lorart

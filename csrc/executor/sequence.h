// Sequence: the executor's live state of one request, owned by the scheduler from admission to
// finish. Only the executor's loop thread touches it.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "executor/request.h"
#include "model/lora_adapter.h"

namespace lorart {

struct Sequence {
  uint64_t id = 0;
  InferenceRequest request;     // lora_weights/lora_config dropped once the cache holds them
  std::vector<int32_t> tokens;  // prompt, then generated tokens
  int64_t prompt_len = 0;
  int64_t vocab_size = 0;                      // its adapter's vocabulary, else the model's
  int64_t num_cached = 0;                      // leading tokens whose K/V are in the cache
  std::vector<int32_t> blocks;                 // KV block table
  std::shared_ptr<const LoraAdapter> adapter;  // non-null while pinned on the device level
  uint64_t rng_state = 0;
  int64_t emitted = 0;       // generated tokens already sent (streaming)
  int64_t context_rows = 0;  // prompt positions whose logits are collected
  bool cancelled = false;
  Response pending;  // logits / log-probs gathered for the next response

  int64_t generated() const { return static_cast<int64_t>(tokens.size()) - prompt_len; }
  int64_t uncached() const { return static_cast<int64_t>(tokens.size()) - num_cached; }
};

// One sequence's share of a step: tokens [begin, begin + count) of seq->tokens.
struct ScheduledChunk {
  Sequence* seq;
  int64_t begin;
  int64_t count;
  bool samples;  // the chunk reaches the sequence's end: its last logits pick the next token
};

}  // namespace lorart

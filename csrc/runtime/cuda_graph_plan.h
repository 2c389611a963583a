// Which decode steps a CUDA runner replays from a captured CUDA graph: one graph per batch-size
// bucket, a step padded up to the smallest bucket that holds it. Pure functions of the step's
// shape (tested on the CPU); capturing and replaying are the runner's.
//
// Padding rules (what the runner fills the bucket's extra sequences with): a padded sequence
// decodes one token (token 0 at position 0, context length 0), writes its K/V into a block the
// KV pool reserves for padding (never one of a request's), runs on the base model (LoRA slot -1),
// and its logits row is computed but never sampled or returned. Real sequences keep their order
// at the front, so their rows, and (batch invariance) their values, are the unpadded step's.
#pragma once

#include <cstdint>
#include <vector>

namespace lorart {

// The buckets for max_batch_size (1..65536): 1, 2, 4, ... (powers of two below it), then
// max_batch_size itself. Throws InvalidArgument naming max_batch_size outside that range.
std::vector<int64_t> cuda_graph_batch_sizes(int64_t max_batch_size);

// A step's shape as the runner knows it before launching.
struct GraphStepShape {
  int64_t num_seqs = 0;
  int64_t num_tokens = 0;  // tokens of the step (prefill chunks + decodes)
  int64_t num_logits = 0;  // logits rows it returns
  int64_t max_kv_len = 0;  // longest context after this step (the attention launch bound)
};

struct GraphChoice {
  bool capturable = false;
  int64_t batch_size = 0;   // the bucket (0 when not capturable)
  int64_t padding = 0;      // padded sequences: batch_size - num_seqs
  const char* reason = "";  // why not, when not capturable
};

// Capturable when the step is decode-only (one token and one logits row per sequence, at least
// one sequence), fits the largest bucket and its contexts are within `graph_max_kv_len` (the
// bound the graphs were captured for; 0 = no bound). Then the smallest bucket >= num_seqs.
// `buckets` is cuda_graph_batch_sizes' list (ascending).
GraphChoice choose_cuda_graph(const std::vector<int64_t>& buckets, const GraphStepShape& step,
                              int64_t graph_max_kv_len);

}  // namespace lorart

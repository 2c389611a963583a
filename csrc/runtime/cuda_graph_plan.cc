#include "runtime/cuda_graph_plan.h"

#include <algorithm>

#include "core/errors.h"

namespace lorart {

std::vector<int64_t> cuda_graph_batch_sizes(int64_t max_batch_size) {
  constexpr int64_t kMax = int64_t{1} << 16;  // ExecutorConfig's kMaxBatchSize
  if (max_batch_size < 1 || max_batch_size > kMax) {
    raise<InvalidArgument>("cuda_graph_batch_sizes: max_batch_size must be in [1, ", kMax,
                           "], got ", max_batch_size);
  }
  std::vector<int64_t> sizes;
  for (int64_t b = 1; b < max_batch_size; b *= 2) sizes.push_back(b);
  sizes.push_back(max_batch_size);
  return sizes;
}

GraphChoice choose_cuda_graph(const std::vector<int64_t>& buckets, const GraphStepShape& step,
                              int64_t graph_max_kv_len) {
  GraphChoice out;
  if (buckets.empty()) {
    out.reason = "no CUDA graph buckets";
  } else if (step.num_seqs < 1) {
    out.reason = "an empty step";
  } else if (step.num_tokens != step.num_seqs) {
    out.reason = "not decode-only (a prefill chunk or a multi-token step)";
  } else if (step.num_logits != step.num_seqs) {
    out.reason = "not one logits row per sequence";
  } else if (step.num_seqs > buckets.back()) {
    out.reason = "more sequences than the largest bucket";
  } else if (graph_max_kv_len > 0 && step.max_kv_len > graph_max_kv_len) {
    out.reason = "a context longer than the graphs were captured for";
  } else {
    out.capturable = true;
    out.batch_size = *std::lower_bound(buckets.begin(), buckets.end(), step.num_seqs);
    out.padding = out.batch_size - step.num_seqs;
  }
  return out;
}

}  // namespace lorart

// ModelRunner: runs steps. It sits between the executor (scheduling, admission, the LoRA cache,
// responses) and the model: it owns the model, its KV pool, the step's logits and the sampling
// scratch, and runs one step as forward, then sampling, in its ExecContext. A CUDA backend is a
// runner whose context names a CUDA device: it runs its forward passes on its own stream (created
// here when the context brings none), the model uploads the step's flat arrays in one copy, and
// the logits come back to the host, where the step's rows are sampled;
// tensor parallelism runs one runner per rank on the broadcast step. Not thread-safe: one
// caller (the executor's loop thread, or a test).
#pragma once

#include <memory>
#include <utility>
#include <vector>

#include "core/buffer.h"
#include "core/stream.h"
#include "kernels/exec_context.h"
#include "kernels/params.h"
#include "model/forward_batch.h"
#include "model/kv_cache.h"
#include "model/llama_model.h"
#include "model/lora_table.h"

namespace lorart {

// One step as the runner takes it.
struct StepInput {
  ForwardBatch batch;                        // the flat arrays (see forward_batch.h)
  const LoraTable* lora = nullptr;           // the adapters of batch.lora_slots
  Tensor sample_rows;                        // [R] int32: rows of the step's logits to sample
  const SamplingParams* sampling = nullptr;  // [R]
  uint64_t* rng_states = nullptr;            // [R], advanced by each sampled token
  bool log_probs = false;                    // also return log p(token) per sample
};

// Views into the runner's buffers, valid until the next run().
struct StepOutput {
  // [N, W] float32 host: the rows of batch.logits_indices, in order; W is the step's widest
  // vocabulary (LlamaModel::logits_width), a row's columns past its own vocabulary are -inf.
  Tensor logits;
  Tensor tokens;     // [R] int32: the sampled tokens; -1 where that row's logits are not finite
  Tensor log_probs;  // [R] float32 when asked for, else empty
};

class ModelRunner {
 public:
  // Allocates the KV pool (`num_kv_blocks` blocks of `block_size` tokens) and the step buffers
  // for the model's max_num_tokens rows, on the context's device, which must be the model's; the
  // pool stores `kv_dtype`. A CUDA context without a stream gets one the runner owns. Throws
  // InvalidArgument
  // (KvCache::checked_bytes) first.
  ModelRunner(std::shared_ptr<LlamaModel> model, int64_t num_kv_blocks, int64_t block_size,
              const ExecContext& ctx, DType kv_dtype = DType::kFloat32);

  // Forward, then samples every sample row (token -1 where its logits hold NaN or +inf).
  // Throws InvalidArgument
  // naming the field for a malformed step (LlamaModel::validate, sample rows out of range);
  // then nothing has been written to the KV pool.
  StepOutput run(const StepInput& step);

  // Applies the context's CPU thread pool to the calling thread; returns its thread count.
  int bind_thread() const;

  const ModelConfig& config() const { return model_->config(); }
  const LlamaModel& model() const { return *model_; }
  const KvCache& kv_cache() const { return kv_cache_; }
  const ExecContext& context() const { return ctx_; }

 private:
  std::shared_ptr<LlamaModel> model_;
  DeviceStream stream_;  // CUDA: the runner's own stream, when the context came without one
  ExecContext ctx_;
  KvCache kv_cache_;
  std::vector<float> logits_;  // [rows, vocab]; capacity for max_num_tokens rows from the start
  Buffer device_logits_;       // CUDA: where the forward writes them (same capacity rule)
  std::vector<int32_t> tokens_;
  std::vector<float> log_probs_;
  std::vector<std::pair<float, int32_t>> sample_scratch_;  // [vocab]
};

}  // namespace lorart

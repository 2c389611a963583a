#include "runtime/model_runner.h"

#include <algorithm>
#include <cmath>

#include "core/errors.h"
#include "kernels/ops.h"

namespace lorart {

namespace {

// The model, checked to be there and on the context's device before anything is allocated.
std::shared_ptr<LlamaModel> checked_model(std::shared_ptr<LlamaModel> model,
                                          const ExecContext& ctx) {
  if (model == nullptr) raise<InvalidArgument>("ModelRunner: model is null");
  if (ctx.device != model->device()) {
    raise<InvalidArgument>("ModelRunner: the context's device ", ctx.device.str(),
                           " is not the model's (", model->device().str(), ")");
  }
  return model;
}

// The context the runner runs in: `ctx`, with a stream of the runner's own (`owned`) on CUDA
// when it brings none.
ExecContext with_stream(const ExecContext& ctx, DeviceStream& owned) {
  ExecContext out = ctx;
  if (out.device.is_cuda() && out.stream == nullptr) {
    owned = DeviceStream::create(out.device);
    out.stream = owned.get();
  }
  return out;
}

}  // namespace

ModelRunner::ModelRunner(std::shared_ptr<LlamaModel> model, int64_t num_kv_blocks,
                         int64_t block_size, const ExecContext& ctx, DType kv_dtype)
    : model_(checked_model(std::move(model), ctx)),
      ctx_(with_stream(ctx, stream_)),
      kv_cache_(model_->config(), num_kv_blocks, block_size, ctx.device, kv_dtype) {
  sample_scratch_.resize(static_cast<size_t>(model_->config().vocab_size));
  // The step buffers at their largest up front (LlamaModel::workspace_bytes bounded the logits):
  // grown step by step, each reallocation left the old block to the heap, and RSS crept up.
  const auto rows = static_cast<size_t>(model_->max_num_tokens());
  logits_.reserve(rows * static_cast<size_t>(model_->config().vocab_size));
  if (ctx_.device.is_cuda()) {
    device_logits_ = Buffer::allocate(logits_.capacity() * sizeof(float), ctx_.device,
                                      "the step's logits on the device");
  }
  tokens_.reserve(rows);
  log_probs_.reserve(rows);
}

int ModelRunner::bind_thread() const {
  set_current_device(ctx_.device);  // a new thread starts on device 0; cuda:N launches need N
  if (ctx_.num_threads > 0) ops::set_cpu_threads(ctx_.num_threads);
  return ops::cpu_threads();
}

StepOutput ModelRunner::run(const StepInput& step) {
  if (step.lora == nullptr) raise<InvalidArgument>("run: the step has no LoRA table");
  // The step's widest vocabulary (an adapter may bring a larger one than the model's).
  const int64_t vocab = model_->logits_width(*step.lora);
  const int64_t n_out = step.batch.logits_indices.numel();
  const int64_t num_samples = step.sample_rows.defined() ? step.sample_rows.numel() : 0;
  if (num_samples > 0 &&
      (step.sample_rows.dim() != 1 || step.sample_rows.dtype() != DType::kInt32 ||
       !step.sample_rows.is_contiguous())) {
    raise<InvalidArgument>("sample_rows must be [R] int32, got ", step.sample_rows.describe());
  }
  if (num_samples > 0 && (step.sampling == nullptr || step.rng_states == nullptr)) {
    raise<InvalidArgument>("run: sample rows need sampling params and RNG states");
  }
  const int32_t* rows = num_samples > 0 ? step.sample_rows.data_as<const int32_t>() : nullptr;
  for (int64_t i = 0; i < num_samples; ++i) {
    if (rows[i] < 0 || rows[i] >= n_out) {
      raise<InvalidArgument>("sample_rows[", i, "] = ", rows[i], " is out of range [0, ", n_out,
                             ") (the step's logits rows)");
    }
  }
  // Within the capacity reserved for max_num_tokens rows of the model's vocabulary: forward()
  // validates the batch (at most max_num_tokens logits rows) before it writes a row, so a
  // malformed one is refused without an allocation, and a valid one of the model's vocabulary
  // never reallocates.
  // A step with a wider adapter vocabulary grows them once (LoraCache bounded the adapter).
  logits_.resize(
      static_cast<size_t>(std::clamp<int64_t>(n_out, 1, model_->max_num_tokens()) * vocab));
  if (sample_scratch_.size() < static_cast<size_t>(vocab)) {
    sample_scratch_.resize(static_cast<size_t>(vocab));
  }
  const Tensor logits(logits_.data(), DType::kFloat32, {n_out, vocab});
  if (ctx_.device.is_cpu()) {
    model_->forward(ctx_, step.batch, kv_cache_, *step.lora, logits);
  } else {
    const size_t bytes = logits_.size() * sizeof(float);
    if (device_logits_.size() < bytes) {  // a wider adapter vocabulary: grown once, like logits_
      device_logits_ = Buffer();
      device_logits_ = Buffer::allocate(bytes, ctx_.device, "the step's logits on the device");
    }
    const Tensor on_device(device_logits_.data(), DType::kFloat32, {n_out, vocab}, ctx_.device);
    set_current_device(ctx_.device);  // whichever thread calls run()
    try {
      model_->forward(ctx_, step.batch, kv_cache_, *step.lora, on_device);
    } catch (...) {
      // Kernels queued before the failure may still read the step's LoRA pages and KV blocks,
      // which the caller frees once it sees the error: let them finish first.
      try {
        synchronize_stream(ctx_.device, ctx_.stream);
      } catch (...) {  // a device fault is reported by the next synchronising call
      }
      throw;
    }
    copy_bytes_async(logits_.data(), Device::cpu(), on_device.data(), ctx_.device,
                     static_cast<size_t>(n_out * vocab) * sizeof(float), ctx_.stream);
    synchronize_stream(ctx_.device, ctx_.stream);  // the logits are on the host from here
  }

  tokens_.resize(static_cast<size_t>(num_samples));
  log_probs_.resize(step.log_probs ? static_cast<size_t>(num_samples) : 0);
  if (num_samples > 0) {
    // A row holding NaN or +inf gets token -1; the executor fails its request on any non-finite
    // logit.
    // On the host (the logits are there): the CPU sampler, with this context's threads.
    ops::sample(
        ctx_.device.is_cpu() ? ctx_ : ExecContext::cpu(ctx_.num_threads, ctx_.precision), logits,
        step.sample_rows, step.sampling, step.rng_states,
        Tensor(tokens_.data(), DType::kInt32, {num_samples}),
        step.log_probs ? Tensor(log_probs_.data(), DType::kFloat32, {num_samples}) : Tensor(),
        sample_scratch_.data());
  }
  StepOutput out;
  out.logits = logits;
  out.tokens = Tensor(tokens_.data(), DType::kInt32, {num_samples});
  out.log_probs =
      Tensor(log_probs_.data(), DType::kFloat32, {static_cast<int64_t>(log_probs_.size())});
  return out;
}

}  // namespace lorart

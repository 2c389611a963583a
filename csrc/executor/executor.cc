#include "executor/executor.h"

#include <algorithm>
#include <future>
#include <random>
#include <sstream>

#include "core/buffer.h"
#include "core/checked_math.h"
#include "core/errors.h"
#include "kernels/ops.h"
#include "lora/lora_validation.h"
#include "model/dora.h"
#include "model/kv_cache.h"
#include "runtime/memory_plan.h"

namespace lorart {

namespace {

uint64_t fresh_seed() {
  static std::mutex mutex;
  static std::random_device device;
  std::lock_guard<std::mutex> lock(mutex);
  return (static_cast<uint64_t>(device()) << 32) ^ device();
}

Response final_response(uint64_t id, FinishReason reason, std::string error = "",
                        ErrorKind kind = ErrorKind::kNone) {
  Response r;
  r.request_id = id;
  r.finish_reason = reason;
  r.error = std::move(error);
  r.error_kind = kind;
  r.is_final = true;
  return r;
}

using Clock = std::chrono::steady_clock;

// When a wait of `timeout` started now ends (none: no deadline); InvalidArgument names `op` for
// a negative timeout.
std::optional<Clock::time_point> deadline_of(const char* op,
                                             std::optional<std::chrono::milliseconds> timeout) {
  if (timeout && timeout->count() < 0) {
    raise<InvalidArgument>(op, ": timeout must be >= 0, got ", timeout->count(), " ms");
  }
  if (timeout && *timeout < Executor::kWaitForever) return Clock::now() + *timeout;
  return std::nullopt;
}

// Waits on `cv` until ready() (true) or the deadline (false), running `poll` every
// `poll_interval` with `lock` released (it may throw to end the wait).
template <class Ready>
bool wait_until_ready(std::unique_lock<std::mutex>& lock, std::condition_variable& cv, Ready ready,
                      std::optional<Clock::time_point> deadline, const std::function<void()>& poll,
                      std::chrono::milliseconds poll_interval) {
  while (!ready()) {
    std::optional<Clock::time_point> until = deadline;
    if (poll) {
      const Clock::time_point next = Clock::now() + poll_interval;
      if (!until || next < *until) until = next;
    }
    if (!until) {
      cv.wait(lock, ready);
      return true;
    }
    if (cv.wait_until(lock, *until, ready)) return true;
    if (deadline && Clock::now() >= *deadline) return false;
    lock.unlock();
    poll();
    lock.lock();
  }
  return true;
}

// resolve(), plus what this model was built for: all before the executor allocates anything.
ExecutorConfig checked_config(const ExecutorConfig& config, const LlamaModel* model) {
  if (model == nullptr) raise<InvalidArgument>("Executor: model is null");
  ExecutorConfig out = config.resolve(model->config());
  if (parse_device(out.device) != model->device()) {
    raise<InvalidArgument>("ExecutorConfig.device is '", out.device, "' but the model is on ",
                           model->device().str(), " (load it on that device)");
  }
  if (out.dtype != "auto" && dtype_from_name(out.dtype) != model->weight_dtype()) {
    raise<InvalidArgument>("ExecutorConfig.dtype is '", out.dtype, "' but the model's weights are ",
                           dtype_name(model->weight_dtype()), " (load it with that dtype)");
  }
  if (model->max_num_tokens() < out.max_num_tokens || model->max_lora_rank() < out.max_lora_rank) {
    raise<InvalidArgument>("the model's workspace (max_num_tokens ", model->max_num_tokens(),
                           ", max_lora_rank ", model->max_lora_rank(),
                           ") is smaller than ExecutorConfig asks for (max_num_tokens ",
                           out.max_num_tokens, ", max_lora_rank ", out.max_lora_rank, ")");
  }
  return out;
}

// The KV pool's blocks (see kv_blocks_). On CUDA the model (weights and workspace) is already
// on the device, so free memory excludes it; the LoRA cache's pages come after the pool.
int64_t kv_pool_blocks(const ExecutorConfig& c, const LlamaModel& model) {
  const int64_t block_size = c.kv_cache.block_size;
  const int64_t max_blocks = (c.kv_cache.max_tokens + block_size - 1) / block_size;  // resolved
  const Device device = parse_device(c.device);
  if (!device.is_cuda()) return max_blocks;
  KvPoolSizing sizing;
  sizing.free_bytes = static_cast<int64_t>(device_free_memory(device));
  sizing.lora_cache_bytes = c.lora_cache.device_cache_bytes;
  // Allocated after the pool: the runner's device logits (max_num_tokens rows of the vocabulary)
  // and attention's split-KV scratch at its largest step (max_batch_size sequences of
  // max_seq_len); the step's staging upload is small beside them (the fraction's headroom).
  const ModelConfig& mc = model.config();
  const ops::AttentionShape shape{
      static_cast<int32_t>(mc.num_attention_heads), static_cast<int32_t>(mc.num_kv_heads),
      static_cast<int32_t>(mc.head_dim), static_cast<int32_t>(mc.sliding_window), 1.0f};
  sizing.workspace_bytes =
      checked_add(checked_product({model.max_num_tokens(), mc.vocab_size, int64_t{sizeof(float)}},
                                  "device logits bytes"),
                  static_cast<int64_t>(ops::paged_attention_workspace_bytes(
                      ExecContext{device}, c.max_batch_size, c.max_seq_len, shape)),
                  "KV pool sizing: workspace bytes");
  sizing.fraction = c.kv_cache.free_gpu_memory_fraction;
  sizing.block_bytes = static_cast<int64_t>(
      KvCache::checked_bytes(model.config(), 1, block_size, device, kv_cache_dtype(c.kv_cache)));
  sizing.min_blocks = std::min(max_blocks, (c.max_seq_len + block_size - 1) / block_size);
  sizing.max_blocks = max_blocks;
  return plan_kv_pool(sizing).num_blocks;
}

}  // namespace

Executor::Executor(std::shared_ptr<LlamaModel> model, const ExecutorConfig& config)
    : config_(checked_config(config, model.get())),
      kv_blocks_(kv_pool_blocks(config_, *model)),
      runner_(
          std::move(model), kv_blocks_, config_.kv_cache.block_size,
          ExecContext{parse_device(config_.device), nullptr, static_cast<int>(config_.num_threads),
                      precision_from_name(config_.precision)},
          kv_cache_dtype(config_.kv_cache)),
      kv_manager_(runner_.kv_cache().num_blocks(), runner_.kv_cache().block_size()),
      lora_cache_(
          runner_.config(), config_.lora_cache, config_.max_lora_rank,
          // DoRA's row norms against the model's weights, on the enqueuing thread.
          [this](const LoraWeights& weights, const LoraConfig& config) {
            return dora_scales(runner_.context(), runner_.model().weights(), weights, config);
          },
          // A CUDA runner's adapters go to pages in one device allocation, which its
          // LoRA kernels read; the CPU keeps one host LoraAdapter per task.
          LoraDeviceLevel{runner_.context().device.is_cuda(), runner_.context().device}),
      scheduler_(config_.max_batch_size, config_.max_num_tokens, kv_manager_, lora_cache_),
      lora_table_(runner_.config()) {
  // The per-step scratch at its largest (resolve() bounded each), so steps do not allocate.
  block_tables_.reserve(static_cast<size_t>(config_.max_batch_size) *
                        kv_manager_.blocks_for(config_.max_seq_len));
  for (auto* v : {&token_ids_, &positions_, &logits_indices_}) {
    v->reserve(static_cast<size_t>(config_.max_num_tokens));
  }
  stats_.total_kv_blocks = kv_manager_.num_blocks();
  std::promise<void> started;
  std::future<void> ready = started.get_future();
  // The thread owns the promise, so their shared state outlives this frame however it is timed.
  thread_ = std::thread([this, started = std::move(started)]() mutable { loop(started); });
  ready.wait();  // stats() reports the loop thread's thread count from the first call on
}

Executor::~Executor() { shutdown(); }

std::optional<Executor::RequestError> Executor::validate(InferenceRequest& r, int64_t& vocab_size) {
  const ModelConfig& m = runner_.config();
  std::ostringstream err;
  const int64_t prompt = static_cast<int64_t>(r.input_token_ids.size());
  if (prompt == 0) return "input_token_ids is empty; a request needs at least one prompt token";
  if (r.max_new_tokens < 1) {
    err << "max_new_tokens must be >= 1, got " << r.max_new_tokens;
    return err.str();
  }
  if (prompt + r.max_new_tokens > config_.max_seq_len) {
    err << "prompt (" << prompt << " tokens) + max_new_tokens (" << r.max_new_tokens
        << ") exceeds max_seq_len = " << config_.max_seq_len;
    return err.str();
  }
  for (const auto& stop : r.stop_token_ids) {
    if (stop.empty()) return std::string("stop_token_ids contains an empty sequence");
  }
  // Token ids against a vocabulary; the request's adapter's may be larger than the model's.
  auto check_ids = [&](int64_t vocab) -> std::optional<RequestError> {
    auto bad = [&](const std::string& what, int64_t id) {
      std::ostringstream e;
      e << what << " = " << id << " is out of the vocabulary [0, " << vocab << ")"
        << (r.lora_task_id ? " of the request's adapter" : "");
      return RequestError(e.str());
    };
    for (int64_t i = 0; i < prompt; ++i) {
      const int32_t id = r.input_token_ids[i];
      if (id < 0 || id >= vocab) return bad("input_token_ids[" + std::to_string(i) + "]", id);
    }
    if (r.end_id && (*r.end_id < 0 || *r.end_id >= vocab)) return bad("end_id", *r.end_id);
    return std::nullopt;
  };
  // First against the vocabulary the request can have at most (the weights it sends, or its
  // cached task's), so a request refused for its ids leaves the LoRA cache as it was; then,
  // once the task is referenced, against the stored adapter's.
  int64_t bound = m.vocab_size;
  if (r.lora_weights && r.lora_weights->embeddings() != nullptr) {
    bound = std::max(bound, r.lora_weights->embeddings()->vocab_size());
  } else if (r.lora_task_id && !r.lora_config) {
    try {
      bound = std::max(bound, lora_cache_.vocab_size(*r.lora_task_id));
    } catch (const Error&) {  // not cached: ref() below says so
    }
  }
  vocab_size = bound;  // what a refusal here reports (Response.vocab_size)
  if (auto error = check_ids(bound)) return error;
  bool referenced = false;
  try {
    r.sampling_config.validate();
    if ((r.lora_weights || r.lora_config) && !r.lora_task_id) {
      return std::string("lora_weights / lora_config need a lora_task_id to cache them under");
    }
    if (r.lora_task_id) {
      if (r.lora_weights || r.lora_config) {
        if (!r.lora_weights || !r.lora_config) {  // names the missing one
          validate_lora(r.lora_weights ? &*r.lora_weights : nullptr,
                        r.lora_config ? &*r.lora_config : nullptr, m.lora_target(), LoraLimits{});
        }
        // Stored (or matched) and referenced at once: no other request can replace it between.
        lora_cache_.put(*r.lora_task_id, *r.lora_weights, *r.lora_config, /*reference=*/true);
        r.lora_weights.reset();  // the cache holds its own converted copy now
        r.lora_config.reset();
      } else {
        lora_cache_.ref(*r.lora_task_id);
      }
      referenced = true;
      // Referenced: the task stays on the host level, and with it this vocabulary.
      const int64_t own = lora_cache_.vocab_size(*r.lora_task_id);
      vocab_size = own > 0 ? own : m.vocab_size;
    } else {
      vocab_size = m.vocab_size;
    }
  } catch (const Error& e) {
    if (referenced) lora_cache_.unref(*r.lora_task_id);
    return std::string(e.what());
  } catch (const std::bad_alloc&) {
    if (referenced) lora_cache_.unref(*r.lora_task_id);
    // Copying the adapter into the cache ran out of memory: this request fails, nothing else.
    return RequestError("out of memory while caching the request's LoRA weights",
                        ErrorKind::kInternal);
  }
  if (vocab_size < bound) {
    if (auto error = check_ids(vocab_size)) {
      if (r.lora_task_id) lora_cache_.unref(*r.lora_task_id);
      return error;
    }
  }
  if (vocab_size > m.vocab_size) {
    // The step's logits grow to [max_num_tokens, vocab_size] for it (ExecutorConfig checked the
    // model's vocabulary only).
    try {
      check_allocation(static_cast<size_t>(checked_product(
                           {config_.max_num_tokens, vocab_size, int64_t{sizeof(float)}},
                           "logits bytes (max_num_tokens * the adapter's vocab_size * 4)")),
                       Device::cpu(),
                       "the logits of an adapter with a vocabulary of " +
                           std::to_string(vocab_size) +
                           " (max_num_tokens = " + std::to_string(config_.max_num_tokens) + ")");
    } catch (const Error& e) {
      lora_cache_.unref(*r.lora_task_id);
      return std::string(e.what());
    }
  }
  return std::nullopt;
}

uint64_t Executor::enqueue_request(InferenceRequest request) {
  return enqueue(std::move(request), false);
}

uint64_t Executor::enqueue_shared(InferenceRequest request) {
  return enqueue(std::move(request), true);
}

uint64_t Executor::enqueue(InferenceRequest request, bool shared) {
  const uint64_t id = next_id_++;
  {
    auto channel = std::make_shared<Channel>();
    channel->streaming = request.streaming;
    channel->shared = shared;
    std::lock_guard<std::mutex> lock(channel_mutex_);
    channels_.emplace(id, std::move(channel));
  }
  std::vector<Response> out;
  int64_t vocab_size = 0;
  if (std::optional<RequestError> error = validate(request, vocab_size)) {
    out.push_back(final_response(id, FinishReason::kError, error->message, error->kind));
    // The vocabulary the ids were checked against, once the adapter was known (0: emit() puts
    // the model's).
    out.back().vocab_size = vocab_size;
  } else {
    auto seq = std::make_unique<Sequence>();
    seq->id = id;
    seq->prompt_len = static_cast<int64_t>(request.input_token_ids.size());
    seq->vocab_size = vocab_size;
    seq->tokens = std::move(request.input_token_ids);  // validated above; read only from tokens
    seq->rng_state = request.sampling_config.seed.value_or(fresh_seed());
    seq->request = std::move(request);
    {
      std::lock_guard<std::mutex> lock(queue_mutex_);
      if (!stop_) incoming_.push_back(std::move(seq));
    }
    if (seq) {  // arrived after shutdown
      if (seq->request.lora_task_id) lora_cache_.unref(*seq->request.lora_task_id);
      out.push_back(final_response(id, FinishReason::kCancelled));
    }
  }
  if (!out.empty()) {
    {
      std::lock_guard<std::mutex> lock(stats_mutex_);
      ++stats_.completed;  // before the response is visible
    }
    emit(out);
  }
  queue_cv_.notify_one();
  return id;
}

std::vector<Response> Executor::await_responses(uint64_t id,
                                                std::optional<std::chrono::milliseconds> timeout,
                                                const std::function<void()>& poll,
                                                std::chrono::milliseconds poll_interval) {
  const std::optional<Clock::time_point> deadline = deadline_of("await_responses", timeout);
  std::unique_lock<std::mutex> lock(channel_mutex_);
  auto found = channels_.find(id);
  if (found == channels_.end() || found->second->released) {
    raise<InvalidArgument>("unknown request id ", id,
                           " (never enqueued, released, or its final response was already "
                           "returned)");
  }
  const std::shared_ptr<Channel> channel = found->second;
  if (channel->shared) {
    raise<InvalidArgument>("request id ", id,
                           " was enqueued with enqueue_shared: its responses come from await_any");
  }
  auto ready = [&] { return channel->closed || channel->released || !channel->responses.empty(); };
  if (!wait_until_ready(lock, channel->ready, ready, deadline, poll, poll_interval)) return {};
  if (channel->responses.empty()) {
    raise<InvalidArgument>("request id ", id, " ",
                           channel->released ? "was released while this call waited"
                                             : "finished while this call waited: its final "
                                               "response went to another await_responses call");
  }
  std::deque<Response>& responses = channel->responses;
  std::vector<Response> out(std::make_move_iterator(responses.begin()),
                            std::make_move_iterator(responses.end()));
  responses.clear();
  if (out.back().is_final) {
    channel->closed = true;
    channels_.erase(id);
    channel->ready.notify_all();  // the other waiters of this id, if any, end with an error
  }
  return out;
}

void Executor::cancel_request(uint64_t id) {
  {
    std::lock_guard<std::mutex> lock(queue_mutex_);
    cancels_.push_back(id);
  }
  queue_cv_.notify_one();
}

ExecutorStats Executor::stats() const {
  int64_t uncollected = 0;
  {
    std::lock_guard<std::mutex> lock(channel_mutex_);
    uncollected = static_cast<int64_t>(channels_.size());
  }
  std::lock_guard<std::mutex> lock(stats_mutex_);
  ExecutorStats out = stats_;
  out.uncollected = uncollected;
  out.lora = lora_cache_.stats();
  out.tokens_per_second =
      out.busy_seconds > 0 ? (out.prompt_tokens + out.generated_tokens) / out.busy_seconds : 0.0;
  return out;
}

void Executor::shutdown() {
  {
    std::lock_guard<std::mutex> lock(queue_mutex_);
    stop_ = true;
  }
  queue_cv_.notify_one();
  // Two threads must not join one std::thread; the second waits here until the first is done.
  std::lock_guard<std::mutex> lock(join_mutex_);
  if (thread_.joinable()) thread_.join();
}

std::vector<Response> Executor::await_any(std::optional<std::chrono::milliseconds> timeout,
                                          const std::function<void()>& poll,
                                          std::chrono::milliseconds poll_interval) {
  const std::optional<Clock::time_point> deadline = deadline_of("await_any", timeout);
  std::unique_lock<std::mutex> lock(channel_mutex_);
  auto ready = [&] { return !shared_.empty(); };
  if (!wait_until_ready(lock, shared_ready_, ready, deadline, poll, poll_interval)) return {};
  std::vector<Response> out(std::make_move_iterator(shared_.begin()),
                            std::make_move_iterator(shared_.end()));
  shared_.clear();
  return out;
}

void Executor::release_request(uint64_t id) {
  std::lock_guard<std::mutex> lock(channel_mutex_);
  auto it = channels_.find(id);
  if (it == channels_.end()) return;
  Channel& channel = *it->second;
  const bool ended = !channel.responses.empty() && channel.responses.back().is_final;
  channel.released = true;
  channel.responses.clear();
  channel.ready.notify_all();  // its waiters, if any, end with an error
  if (ended) channels_.erase(it);
}

void Executor::emit(std::vector<Response>& responses) {
  if (responses.empty()) return;
  std::lock_guard<std::mutex> lock(channel_mutex_);
  for (Response& response : responses) {
    auto it = channels_.find(response.request_id);
    if (it == channels_.end()) continue;
    Channel& channel = *it->second;
    if (channel.released) {  // nobody collects: forget it at its end
      if (response.is_final) channels_.erase(it);
      continue;
    }
    if (response.vocab_size == 0) response.vocab_size = runner_.config().vocab_size;
    if (channel.shared) {
      const bool final = response.is_final;
      shared_.push_back(std::move(response));
      if (final) channels_.erase(it);  // the shared queue's reader owns it from here
      continue;
    }
    channel.responses.push_back(std::move(response));
    channel.ready.notify_one();  // a response for one of this id's waiters, no one else's
  }
  responses.clear();
  if (!shared_.empty()) shared_ready_.notify_one();  // one wake-up per step for all of them
}

void Executor::flush() {
  publish_state();
  emit(outbox_);
}

bool Executor::has_work() const {
  return !scheduler_.running().empty() || !scheduler_.waiting().empty();
}

void Executor::loop(std::promise<void>& started) {
  // OpenMP's thread count is a per-thread setting: set it here, where the forward runs.
  const int threads = runner_.bind_thread();
  {
    std::lock_guard<std::mutex> lock(stats_mutex_);
    stats_.num_threads = threads;
  }
  started.set_value();
  while (true) {
    std::vector<std::unique_ptr<Sequence>> incoming;
    std::vector<uint64_t> cancels;
    bool stop = false;
    {
      std::unique_lock<std::mutex> lock(queue_mutex_);
      queue_cv_.wait(
          lock, [&] { return stop_ || !incoming_.empty() || !cancels_.empty() || has_work(); });
      incoming.swap(incoming_);
      cancels.swap(cancels_);
      stop = stop_;
    }
    for (auto& seq : incoming) {
      live_[seq->id] = seq.get();
      scheduler_.add(std::move(seq));
    }
    if (stop) break;
    for (uint64_t id : cancels) {
      auto it = live_.find(id);
      if (it != live_.end()) finish(it->second, FinishReason::kCancelled);
    }
    if (has_work()) {
      try {
        step();
      } catch (const std::exception& e) {
        // Anything a step throws outside the forward (which fails only its own requests) would
        // end this thread and the process: fail the running requests instead and go on.
        std::vector<Sequence*> running;
        for (const auto& seq : scheduler_.running()) running.push_back(seq.get());
        for (Sequence* seq : running) {
          finish(seq, FinishReason::kError, std::string("executor step failed: ") + e.what());
        }
      }
    }
    flush();
  }
  // Shutdown: everything still queued or running ends as cancelled.
  while (!live_.empty()) finish(live_.begin()->second, FinishReason::kCancelled);
  flush();
}

}  // namespace lorart

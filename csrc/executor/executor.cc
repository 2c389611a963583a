#include "executor/executor.h"

#include <algorithm>
#include <random>
#include <sstream>

#include "core/errors.h"
#include "lora/lora_validation.h"

namespace lorart {

namespace {

int64_t kv_blocks(const KvCacheConfig& kv) {
  return (kv.max_tokens + kv.block_size - 1) / kv.block_size;
}

uint64_t fresh_seed() {
  static std::mutex mutex;
  static std::random_device device;
  std::lock_guard<std::mutex> lock(mutex);
  return (static_cast<uint64_t>(device()) << 32) ^ device();
}

}  // namespace

Executor::Executor(std::shared_ptr<LlamaModel> model, const ExecutorConfig& config)
    : model_((config.validate(), std::move(model))),
      config_(config),
      kv_cache_(model_->config(), kv_blocks(config.kv_cache), config.kv_cache.block_size),
      kv_manager_(kv_cache_.num_blocks(), kv_cache_.block_size()),
      lora_cache_(model_->config(), config.lora_cache, config.max_lora_rank),
      scheduler_(config.max_batch_size, config.max_num_tokens, kv_manager_, lora_cache_) {
  if (model_->max_num_tokens() < config.max_num_tokens ||
      model_->max_lora_rank() < config.max_lora_rank) {
    raise<InvalidArgument>("the model's workspace (max_num_tokens ", model_->max_num_tokens(),
                           ", max_lora_rank ", model_->max_lora_rank(),
                           ") is smaller than ExecutorConfig asks for");
  }
  logits_.reserve(static_cast<size_t>(config.max_num_tokens) * model_->config().vocab_size);
  sample_scratch_.resize(model_->config().vocab_size);
  stats_.total_kv_blocks = kv_manager_.num_blocks();
  thread_ = std::thread([this] { loop(); });
}

Executor::~Executor() { shutdown(); }

std::optional<std::string> Executor::validate(InferenceRequest& r) {
  const ModelConfig& m = model_->config();
  std::ostringstream err;
  const int64_t prompt = static_cast<int64_t>(r.input_token_ids.size());
  if (prompt == 0) return "input_token_ids is empty; a request needs at least one prompt token";
  for (int64_t i = 0; i < prompt; ++i) {
    if (r.input_token_ids[i] < 0 || r.input_token_ids[i] >= m.vocab_size) {
      err << "input_token_ids[" << i << "] = " << r.input_token_ids[i]
          << " is out of the vocabulary [0, " << m.vocab_size << ")";
      return err.str();
    }
  }
  if (r.max_new_tokens < 1) {
    err << "max_new_tokens must be >= 1, got " << r.max_new_tokens;
    return err.str();
  }
  if (prompt + r.max_new_tokens > config_.max_seq_len) {
    err << "prompt (" << prompt << " tokens) + max_new_tokens (" << r.max_new_tokens
        << ") exceeds max_seq_len = " << config_.max_seq_len;
    return err.str();
  }
  if (r.end_id && (*r.end_id < 0 || *r.end_id >= m.vocab_size)) {
    err << "end_id " << *r.end_id << " is out of the vocabulary [0, " << m.vocab_size << ")";
    return err.str();
  }
  for (const auto& stop : r.stop_token_ids) {
    if (stop.empty()) return std::string("stop_token_ids contains an empty sequence");
  }
  try {
    r.sampling_config.validate();
    if ((r.lora_weights || r.lora_config) && !r.lora_task_id) {
      return std::string("lora_weights / lora_config need a lora_task_id to cache them under");
    }
    if (r.lora_task_id) {
      if (r.lora_weights || r.lora_config) {
        if (!r.lora_weights || !r.lora_config) {  // names the missing one
          validate_lora(r.lora_weights ? &*r.lora_weights : nullptr,
                        r.lora_config ? &*r.lora_config : nullptr, m, LoraLimits{});
        }
        lora_cache_.put(*r.lora_task_id, *r.lora_weights, *r.lora_config);
        r.lora_weights.reset();  // the cache holds its own converted copy now
        r.lora_config.reset();
      }
      lora_cache_.ref(*r.lora_task_id);
    }
  } catch (const Error& e) {
    return std::string(e.what());
  }
  return std::nullopt;
}

uint64_t Executor::enqueue_request(InferenceRequest request) {
  const uint64_t id = next_id_++;
  {
    std::lock_guard<std::mutex> lock(channel_mutex_);
    channels_[id].streaming = request.streaming;
  }
  if (std::optional<std::string> error = validate(request)) {
    Response r;
    r.request_id = id;
    r.finish_reason = FinishReason::kError;
    r.error = *error;
    r.is_final = true;
    emit(std::move(r));
    std::lock_guard<std::mutex> lock(stats_mutex_);
    ++stats_.completed;
    return id;
  }
  auto seq = std::make_unique<Sequence>();
  seq->id = id;
  seq->prompt_len = static_cast<int64_t>(request.input_token_ids.size());
  seq->tokens = std::move(request.input_token_ids);  // validated above; read only from tokens
  seq->rng_state = request.sampling_config.seed.value_or(fresh_seed());
  seq->request = std::move(request);
  {
    std::lock_guard<std::mutex> lock(queue_mutex_);
    if (!stop_) incoming_.push_back(std::move(seq));
  }
  if (seq) {  // arrived after shutdown
    if (seq->request.lora_task_id) lora_cache_.unref(*seq->request.lora_task_id);
    Response r;
    r.request_id = id;
    r.finish_reason = FinishReason::kCancelled;
    r.is_final = true;
    emit(std::move(r));
    std::lock_guard<std::mutex> lock(stats_mutex_);
    ++stats_.completed;
  }
  queue_cv_.notify_one();
  return id;
}

std::vector<Response> Executor::await_responses(uint64_t id,
                                                std::optional<std::chrono::milliseconds> timeout) {
  std::unique_lock<std::mutex> lock(channel_mutex_);
  auto it = channels_.find(id);
  if (it == channels_.end()) {
    raise<InvalidArgument>("unknown request id ", id,
                           " (never enqueued, or its final response was already returned)");
  }
  auto ready = [&] { return !channels_.at(id).responses.empty(); };
  if (timeout) {
    if (!channel_cv_.wait_for(lock, *timeout, ready)) return {};
  } else {
    channel_cv_.wait(lock, ready);
  }
  Channel& channel = channels_.at(id);
  std::vector<Response> out(std::make_move_iterator(channel.responses.begin()),
                            std::make_move_iterator(channel.responses.end()));
  channel.responses.clear();
  if (!out.empty() && out.back().is_final) channels_.erase(id);
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
  std::lock_guard<std::mutex> lock(stats_mutex_);
  ExecutorStats out = stats_;
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
  if (thread_.joinable()) thread_.join();
}

void Executor::emit(Response response) {
  response.vocab_size = model_->config().vocab_size;
  {
    std::lock_guard<std::mutex> lock(channel_mutex_);
    auto it = channels_.find(response.request_id);
    if (it == channels_.end()) return;
    it->second.responses.push_back(std::move(response));
  }
  channel_cv_.notify_all();
}

bool Executor::has_work() const {
  return !scheduler_.running().empty() || !scheduler_.waiting().empty();
}

void Executor::loop() {
  while (true) {
    std::vector<std::unique_ptr<Sequence>> incoming;
    std::vector<uint64_t> cancels;
    {
      std::unique_lock<std::mutex> lock(queue_mutex_);
      queue_cv_.wait(
          lock, [&] { return stop_ || !incoming_.empty() || !cancels_.empty() || has_work(); });
      incoming.swap(incoming_);
      cancels.swap(cancels_);
      if (stop_) {
        for (auto& seq : incoming) {
          live_[seq->id] = seq.get();
          scheduler_.add(std::move(seq));
        }
        break;
      }
    }
    for (auto& seq : incoming) {
      live_[seq->id] = seq.get();
      scheduler_.add(std::move(seq));
    }
    for (uint64_t id : cancels) {
      auto it = live_.find(id);
      if (it != live_.end()) finish(it->second, FinishReason::kCancelled);
    }
    if (has_work()) step();
    publish_state();
  }
  // Shutdown: everything still queued or running ends as cancelled.
  while (!live_.empty()) finish(live_.begin()->second, FinishReason::kCancelled);
  publish_state();
}

}  // namespace lorart

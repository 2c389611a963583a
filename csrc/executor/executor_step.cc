// The executor's step: schedule, build the step's flat description, run it (ModelRunner: forward
// and sampling), postprocess the tokens into responses (loop() publishes them after the step's
// stats). Loop thread only.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <sstream>

#include "core/errors.h"
#include "executor/executor.h"

namespace lorart {

void Executor::step() {
  const auto start = std::chrono::steady_clock::now();
  std::vector<ScheduledChunk> plan = scheduler_.schedule();
  for (auto& [seq, error] : scheduler_.take_failed()) finish(seq, FinishReason::kError, error);
  if (plan.empty()) return;
  // Neighbours with one adapter form one LoRA run.
  std::stable_sort(plan.begin(), plan.end(), [](const ScheduledChunk& a, const ScheduledChunk& b) {
    return a.seq->adapter.get() < b.seq->adapter.get();
  });
  int64_t prompt_tokens = 0;  // before postprocess, which may free finished sequences
  for (const ScheduledChunk& chunk : plan) {
    prompt_tokens += std::max<int64_t>(
        0, std::min(chunk.begin + chunk.count, chunk.seq->prompt_len) - chunk.begin);
  }
  StepOutput out;
  try {
    // The step's adapters acquired this time may still be on their way to the device.
    lora_cache_.make_wait(runner_.context().stream);
    out = runner_.run(build_step(plan));
  } catch (const std::exception& e) {
    // A failed step fails its requests alone; the loop and every other request go on.
    for (const ScheduledChunk& chunk : plan) {
      finish(chunk.seq, FinishReason::kError, std::string("forward failed: ") + e.what());
    }
    return;
  }
  const int64_t sampled = postprocess(plan, out);
  std::lock_guard<std::mutex> lock(stats_mutex_);
  ++stats_.steps;
  stats_.prompt_tokens += prompt_tokens;
  stats_.generated_tokens += sampled;
  stats_.busy_seconds +=
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

StepInput Executor::build_step(const std::vector<ScheduledChunk>& plan) {
  const int64_t width = kv_manager_.blocks_for(config_.max_seq_len);
  const int64_t num_seqs = static_cast<int64_t>(plan.size());
  token_ids_.clear();
  positions_.clear();
  seq_starts_.assign(1, 0);
  context_lens_.clear();
  lora_slots_.clear();
  logits_indices_.clear();
  sample_rows_.clear();
  sampling_.clear();
  rng_states_.clear();
  block_tables_.assign(static_cast<size_t>(num_seqs * width), -1);
  lora_table_.clear();
  step_adapters_.clear();
  step_rows_.assign(plan.size(), ChunkRows{});
  bool log_probs = false;
  for (int64_t i = 0; i < num_seqs; ++i) {
    Sequence& seq = *plan[i].seq;
    ChunkRows& rows = step_rows_[i];
    const int64_t begin = plan[i].begin, end = begin + plan[i].count;
    token_ids_.insert(token_ids_.end(), seq.tokens.begin() + begin, seq.tokens.begin() + end);
    for (int64_t p = begin; p < end; ++p) positions_.push_back(static_cast<int32_t>(p));
    seq_starts_.push_back(static_cast<int32_t>(token_ids_.size()));
    context_lens_.push_back(static_cast<int32_t>(begin));
    std::copy(seq.blocks.begin(), seq.blocks.end(), block_tables_.begin() + i * width);
    int32_t slot = -1;
    if (seq.adapter) {
      const auto found = std::find(step_adapters_.begin(), step_adapters_.end(), seq.adapter.get());
      slot = static_cast<int32_t>(found - step_adapters_.begin());
      if (found == step_adapters_.end()) {
        step_adapters_.push_back(seq.adapter.get());
        lora_table_.add(*seq.adapter);
      }
    }
    lora_slots_.push_back(slot);
    const int64_t first_token = seq_starts_[i];
    int64_t context_end = begin;  // context rows cover prompt positions [.., context_end)
    if (seq.request.return_context_logits && seq.context_rows < seq.prompt_len) {
      // Prompt positions of this chunk not collected yet (a recompute after preemption skips).
      const int64_t from = std::max(begin, seq.context_rows);
      context_end = std::max(from, std::min(end, seq.prompt_len));
      rows.first_context_row = static_cast<int64_t>(logits_indices_.size());
      for (int64_t p = from; p < context_end; ++p) {
        logits_indices_.push_back(static_cast<int32_t>(first_token + p - begin));
      }
      rows.context_rows = context_end - from;
    }
    if (!plan[i].samples) continue;
    if (rows.context_rows > 0 && context_end == end) {
      // The chunk's last token is already a context row: sample from it rather than asking the
      // model for the same row twice (which could exceed max_num_tokens rows).
      rows.sample_row = rows.first_context_row + rows.context_rows - 1;
    } else {
      rows.sample_row = static_cast<int64_t>(logits_indices_.size());
      logits_indices_.push_back(static_cast<int32_t>(first_token + plan[i].count - 1));
    }
    rows.sample_index = static_cast<int64_t>(sample_rows_.size());
    sample_rows_.push_back(static_cast<int32_t>(rows.sample_row));
    const SamplingConfig& s = seq.request.sampling_config;
    sampling_.push_back(SamplingParams{s.top_k, s.top_p, s.temperature, seq.vocab_size});
    rng_states_.push_back(seq.rng_state);
    log_probs = log_probs || seq.request.return_log_probs;
  }
  const auto num_tokens = static_cast<int64_t>(token_ids_.size());
  StepInput in;
  in.batch.token_ids = Tensor(token_ids_.data(), DType::kInt32, {num_tokens});
  in.batch.positions = Tensor(positions_.data(), DType::kInt32, {num_tokens});
  in.batch.seq_starts = Tensor(seq_starts_.data(), DType::kInt32, {num_seqs + 1});
  in.batch.context_lens = Tensor(context_lens_.data(), DType::kInt32, {num_seqs});
  in.batch.block_tables = Tensor(block_tables_.data(), DType::kInt32, {num_seqs, width});
  in.batch.lora_slots = Tensor(lora_slots_.data(), DType::kInt32, {num_seqs});
  in.batch.logits_indices =
      Tensor(logits_indices_.data(), DType::kInt32, {static_cast<int64_t>(logits_indices_.size())});
  in.lora = &lora_table_;
  in.sample_rows =
      Tensor(sample_rows_.data(), DType::kInt32, {static_cast<int64_t>(sample_rows_.size())});
  in.sampling = sampling_.data();
  in.rng_states = rng_states_.data();
  in.log_probs = log_probs;
  return in;
}

int64_t Executor::postprocess(const std::vector<ScheduledChunk>& plan, const StepOutput& out) {
  const int64_t width = out.logits.size(1);  // the step's widest vocabulary
  const float* logits = out.logits.data_as<const float>();
  const int32_t* tokens = out.tokens.data_as<const int32_t>();
  int64_t sampled = 0;
  for (size_t i = 0; i < plan.size(); ++i) {
    Sequence& seq = *plan[i].seq;
    const int64_t vocab = seq.vocab_size;  // its rows' own columns
    // The chunk's rows are contiguous: context rows, then (unless shared) its sample row.
    const ChunkRows& r = step_rows_[i];
    const int64_t first_row = r.context_rows > 0 ? r.first_context_row : r.sample_row;
    const int64_t end_row = std::max(r.first_context_row + r.context_rows, r.sample_row + 1);
    if (first_row >= 0) {
      std::string error =
          non_finite_logits(seq, out.logits, first_row, end_row - first_row, r.sample_row);
      if (!error.empty()) {  // fails this request alone: its rows are its own
        finish(&seq, FinishReason::kError, error);
        continue;
      }
    }
    scheduler_.advance(plan[i]);
    if (r.context_rows > 0) {
      for (int64_t row = 0; row < r.context_rows; ++row) {
        const float* src = logits + (r.first_context_row + row) * width;
        seq.pending.context_logits.insert(seq.pending.context_logits.end(), src, src + vocab);
      }
      seq.context_rows += r.context_rows;
    }
    if (r.sample_row < 0) continue;
    seq.rng_state = rng_states_[r.sample_index];
    const int32_t token = tokens[r.sample_index];
    // The end id ends the output and is not part of it, nor are its log-prob and logits row.
    const bool ends = seq.request.end_id && token == *seq.request.end_id;
    if (seq.request.return_log_probs && !ends) {
      seq.pending.log_probs.push_back(out.log_probs.data_as<const float>()[r.sample_index]);
    }
    if (seq.request.return_generation_logits && !ends) {
      const float* row = logits + r.sample_row * width;
      seq.pending.generation_logits.insert(seq.pending.generation_logits.end(), row, row + vocab);
    }
    ++sampled;
    on_sampled(seq, token);
  }
  return sampled;
}

void Executor::publish_state() {
  std::lock_guard<std::mutex> lock(stats_mutex_);
  stats_.preemptions = scheduler_.preemptions();
  stats_.running = static_cast<int64_t>(scheduler_.running().size());
  stats_.queued = static_cast<int64_t>(scheduler_.waiting().size());
  stats_.free_kv_blocks = kv_manager_.free_blocks();
}

void Executor::on_sampled(Sequence& seq, int32_t token) {
  const InferenceRequest& r = seq.request;
  if (r.end_id && token == *r.end_id) {  // the end id ends the output and is not part of it
    finish(&seq, FinishReason::kEndId);
    return;
  }
  seq.tokens.push_back(token);
  FinishReason reason = FinishReason::kNotFinished;
  for (const auto& stop : r.stop_token_ids) {
    if (ends_with_stop(seq, stop)) reason = FinishReason::kStop;
  }
  if (reason == FinishReason::kNotFinished && seq.generated() >= r.max_new_tokens) {
    reason = FinishReason::kLength;
  }
  if (reason != FinishReason::kNotFinished) {
    finish(&seq, reason);
    return;
  }
  if (r.streaming) {
    Response out = std::move(seq.pending);
    seq.pending = Response{};
    out.request_id = seq.id;
    out.vocab_size = seq.vocab_size;
    out.output_token_ids.assign(seq.tokens.begin() + seq.prompt_len + seq.emitted,
                                seq.tokens.end());
    seq.emitted = seq.generated();
    outbox_.push_back(std::move(out));
  }
}

std::string Executor::non_finite_logits(const Sequence& seq, const Tensor& logits,
                                        int64_t first_row, int64_t rows, int64_t sample_row) const {
  const int64_t width = logits.size(1), vocab = seq.vocab_size;
  const float* bad = nullptr;
  int64_t bad_row = -1;
  for (int64_t row = first_row; row < first_row + rows && bad == nullptr; ++row) {
    const float* begin = logits.data_as<const float>() + row * width;
    const float* found =
        std::find_if(begin, begin + vocab, [](float v) { return !std::isfinite(v); });
    if (found != begin + vocab) bad = found, bad_row = row;
  }
  if (bad == nullptr) return "";
  std::ostringstream err;
  err << "the logits are not finite (" << *bad << ") at ";
  if (bad_row == sample_row) {
    err << "generated token " << seq.generated();
  } else {
    err << "a prompt position (context logits)";
  }
  if (seq.request.lora_task_id) {
    err << " with LoRA task " << *seq.request.lora_task_id
        << ": the adapter's values overflow float32 in the forward";
  } else {
    err << ": the model's values overflow float32 in the forward";
  }
  return err.str();
}

bool Executor::ends_with_stop(const Sequence& seq, const std::vector<int32_t>& stop) {
  const int64_t n = static_cast<int64_t>(stop.size());
  if (seq.generated() < n) return false;
  return std::equal(stop.begin(), stop.end(), seq.tokens.end() - n);
}

void Executor::finish(Sequence* seq, FinishReason reason, const std::string& error,
                      ErrorKind kind) {
  live_.erase(seq->id);
  std::unique_ptr<Sequence> owned = scheduler_.remove(seq);
  if (owned && owned->request.lora_task_id) lora_cache_.unref(*owned->request.lora_task_id);
  Response out = std::move(seq->pending);
  out.request_id = seq->id;
  out.vocab_size = seq->vocab_size;
  out.finish_reason = reason;
  out.error = error;
  out.error_kind = reason == FinishReason::kError ? kind : ErrorKind::kNone;
  out.is_final = true;
  const int64_t from = seq->request.streaming ? seq->emitted : 0;
  out.output_token_ids.assign(seq->tokens.begin() + seq->prompt_len + from, seq->tokens.end());
  outbox_.push_back(std::move(out));  // visible at flush(), after the stats below
  std::lock_guard<std::mutex> lock(stats_mutex_);
  ++stats_.completed;
}

}  // namespace lorart

#include "executor/scheduler.h"

#include <algorithm>

namespace lorart {

Scheduler::Scheduler(int64_t max_batch_size, int64_t max_num_tokens, KvCacheManager& kv,
                     LoraCache& lora)
    : max_batch_size_(max_batch_size), max_num_tokens_(max_num_tokens), kv_(kv), lora_(lora) {}

void Scheduler::add(std::unique_ptr<Sequence> seq) { waiting_.push_back(std::move(seq)); }

void Scheduler::release(Sequence& seq) {
  kv_.release(seq.blocks);
  seq.num_cached = 0;
  if (seq.adapter) {
    lora_.unpin(*seq.request.lora_task_id);
    seq.adapter.reset();
  }
}

void Scheduler::preempt(size_t index) {
  std::unique_ptr<Sequence> seq = std::move(running_[index]);
  running_.erase(running_.begin() + static_cast<std::ptrdiff_t>(index));
  release(*seq);  // its tokens (prompt + generated) are recomputed when it is admitted again
  ++preemptions_;
  waiting_.push_front(std::move(seq));
}

std::vector<ScheduledChunk> Scheduler::schedule() {
  std::vector<ScheduledChunk> plan;
  int64_t budget = max_num_tokens_;
  for (size_t i = 0; i < running_.size() && budget > 0;) {
    Sequence& seq = *running_[i];
    const int64_t count = std::min(seq.uncached(), budget);
    if (count == 0) {
      ++i;
      continue;
    }
    bool preempted_self = false;
    while (!kv_.reserve(seq.blocks, seq.num_cached + count)) {
      // Out of blocks: free the newest running sequence, which is never one already planned.
      const size_t newest = running_.size() - 1;
      preempted_self = newest == i;
      preempt(newest);
      if (preempted_self) break;
    }
    if (preempted_self) break;
    plan.push_back({&seq, seq.num_cached, count, count == seq.uncached()});
    budget -= count;
    ++i;
  }
  while (!waiting_.empty() && budget > 0 &&
         static_cast<int64_t>(running_.size()) < max_batch_size_) {
    Sequence& seq = *waiting_.front();
    if (seq.request.lora_task_id && !seq.adapter) {
      try {
        seq.adapter = lora_.acquire(*seq.request.lora_task_id);
      } catch (const std::exception& e) {
        // Loading this adapter failed (e.g. its device copy could not be allocated): fail this
        // request alone; the queue behind it moves on next step.
        failed_.emplace_back(&seq, std::string("loading LoRA task ") +
                                       std::to_string(*seq.request.lora_task_id) +
                                       " failed: " + e.what());
        break;
      }
      if (!seq.adapter) break;  // every device page is pinned: wait for a running one to finish
    }
    const int64_t count = std::min(seq.uncached(), budget);
    if (!kv_.reserve(seq.blocks, count)) {
      release(seq);
      break;
    }
    plan.push_back({&seq, 0, count, count == seq.uncached()});
    budget -= count;
    running_.push_back(std::move(waiting_.front()));
    waiting_.pop_front();
  }
  return plan;
}

std::unique_ptr<Sequence> Scheduler::remove(Sequence* seq) {
  std::unique_ptr<Sequence> out;
  auto running =
      std::find_if(running_.begin(), running_.end(), [&](const auto& s) { return s.get() == seq; });
  if (running != running_.end()) {
    out = std::move(*running);
    running_.erase(running);
  } else {
    auto waiting = std::find_if(waiting_.begin(), waiting_.end(),
                                [&](const auto& s) { return s.get() == seq; });
    if (waiting == waiting_.end()) return nullptr;
    out = std::move(*waiting);
    waiting_.erase(waiting);
  }
  release(*out);
  return out;
}

}  // namespace lorart

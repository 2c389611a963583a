// Scheduler: decides, each step, which sequences run and how many of their tokens (in-flight
// batching with chunked prefill). Policy (nano-vllm / TensorRT-LLM style):
//   1. running sequences, oldest first, each gets its uncached tokens (1 for a decode, a chunk of
//      a long prompt) while the step's token budget lasts; when KV blocks run out, the newest
//      running sequence is preempted (blocks freed, adapter unpinned, recomputed later);
//   2. waiting sequences are admitted first-come-first-served while batch slots, tokens, KV blocks
//      and LoRA device pages allow; the head waits (FCFS) when one of them does not.
// Loop thread only.
#pragma once

#include <deque>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "executor/kv_cache_manager.h"
#include "executor/lora_cache.h"
#include "executor/sequence.h"

namespace lorart {

class Scheduler {
 public:
  Scheduler(int64_t max_batch_size, int64_t max_num_tokens, KvCacheManager& kv, LoraCache& lora);

  void add(std::unique_ptr<Sequence> seq);  // joins the waiting queue
  std::vector<ScheduledChunk> schedule();
  // Removes a sequence (finished or cancelled) wherever it is; frees its blocks and pages.
  std::unique_ptr<Sequence> remove(Sequence* seq);
  // After a forward: the chunk's tokens are cached.
  void advance(const ScheduledChunk& chunk) { chunk.seq->num_cached += chunk.count; }

  const std::vector<std::unique_ptr<Sequence>>& running() const { return running_; }
  const std::deque<std::unique_ptr<Sequence>>& waiting() const { return waiting_; }
  int64_t preemptions() const { return preemptions_; }
  // Waiting sequences whose adapter could not be loaded (the error, e.g. an allocation failure,
  // says why) since the last call: the caller finishes them with that error. They stay queued
  // until then and are never scheduled.
  std::vector<std::pair<Sequence*, std::string>> take_failed() { return std::move(failed_); }

 private:
  void preempt(size_t index);  // running_[index] -> front of waiting_
  void release(Sequence& seq);

  int64_t max_batch_size_, max_num_tokens_;
  KvCacheManager& kv_;
  LoraCache& lora_;
  std::vector<std::unique_ptr<Sequence>> running_;  // admission order: oldest first
  std::deque<std::unique_ptr<Sequence>> waiting_;
  int64_t preemptions_ = 0;
  std::vector<std::pair<Sequence*, std::string>> failed_;
};

}  // namespace lorart

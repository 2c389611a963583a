#include "executor/scheduler.h"

#include <gtest/gtest.h>

#include <memory>
#include <optional>
#include <vector>

#include "executor/kv_cache_manager.h"
#include "executor/lora_cache.h"
#include "test_util.h"

namespace lorart {
namespace {

// hidden 8, 2 layers: an attn_q row of rank 1 holds 16 floats = 64 bytes.
ModelConfig tiny_model() { return testing_util::llama_config(16, 8, 16, 2, 2, 2, 4); }

constexpr int64_t kAdapterBytes = 64;  // one rank-1 attn_q row, float32

// A scheduler over `num_blocks` KV blocks of 4 tokens and a LoRA device level that holds
// `device_adapters` rank-1 adapters. Tasks 1..5 are on the host level.
struct Harness {
  Harness(int64_t max_batch_size, int64_t max_num_tokens, int64_t num_blocks,
          int64_t device_adapters = 4)
      : kv(num_blocks, 4),
        lora(tiny_model(), LoraCacheConfig{100 * kAdapterBytes, device_adapters * kAdapterBytes},
             8),
        scheduler(max_batch_size, max_num_tokens, kv, lora) {
    std::vector<float> values(16, 0.25f);
    LoraWeights w = LoraWeights::copy_of(Tensor(values.data(), DType::kFloat32, {1, 16}));
    for (uint64_t task = 1; task <= 5; ++task) {
      lora.put(task, w, LoraConfig::from_rows({{1, 0, 1}}));
    }
  }

  // Adds a fresh sequence with a prompt of `prompt_len` tokens; returns a handle to it.
  Sequence* add(int64_t prompt_len, std::optional<uint64_t> task = std::nullopt) {
    auto seq = std::make_unique<Sequence>();
    seq->id = next_id++;
    for (int64_t i = 0; i < prompt_len; ++i) seq->tokens.push_back(static_cast<int32_t>(i % 16));
    seq->prompt_len = prompt_len;
    seq->request.input_token_ids = seq->tokens;
    seq->request.lora_task_id = task;
    Sequence* raw = seq.get();
    scheduler.add(std::move(seq));
    return raw;
  }

  // Runs one "step": schedule, mark every chunk cached, and append a sampled token to each
  // sequence whose chunk reached its end (what the executor does after the forward).
  std::vector<ScheduledChunk> step() {
    std::vector<ScheduledChunk> plan = scheduler.schedule();
    for (const ScheduledChunk& chunk : plan) {
      scheduler.advance(chunk);
      if (chunk.samples) chunk.seq->tokens.push_back(7);
    }
    return plan;
  }

  bool is_running(const Sequence* seq) const {
    for (const auto& s : scheduler.running()) {
      if (s.get() == seq) return true;
    }
    return false;
  }
  std::vector<const Sequence*> waiting() const {
    std::vector<const Sequence*> out;
    for (const auto& s : scheduler.waiting()) out.push_back(s.get());
    return out;
  }

  KvCacheManager kv;
  LoraCache lora;
  Scheduler scheduler;
  uint64_t next_id = 1;
};

void expect_chunk(const ScheduledChunk& chunk, const Sequence* seq, int64_t begin, int64_t count,
                  bool samples) {
  EXPECT_EQ(chunk.seq, seq) << "chunk of sequence " << chunk.seq->id << ", expected " << seq->id;
  EXPECT_EQ(chunk.begin, begin) << "sequence " << seq->id;
  EXPECT_EQ(chunk.count, count) << "sequence " << seq->id;
  EXPECT_EQ(chunk.samples, samples) << "sequence " << seq->id;
}

TEST(SchedulerTest, EmptySchedulerPlansNothing) {
  Harness h(4, 64, 16);
  EXPECT_TRUE(h.scheduler.schedule().empty());
  EXPECT_EQ(h.scheduler.preemptions(), 0);
}

TEST(SchedulerTest, AdmissionIsLimitedByMaxBatchSize) {
  Harness h(2, 64, 16);
  Sequence* a = h.add(3);
  Sequence* b = h.add(5);
  Sequence* c = h.add(2);
  std::vector<ScheduledChunk> plan = h.step();
  ASSERT_EQ(plan.size(), 2u);
  expect_chunk(plan[0], a, 0, 3, true);
  expect_chunk(plan[1], b, 0, 5, true);
  EXPECT_EQ(h.scheduler.running().size(), 2u);
  EXPECT_EQ(h.waiting(), std::vector<const Sequence*>{c});

  // Still full: two decodes, c keeps waiting.
  plan = h.step();
  ASSERT_EQ(plan.size(), 2u);
  expect_chunk(plan[0], a, 3, 1, true);
  expect_chunk(plan[1], b, 5, 1, true);
  EXPECT_TRUE(c->blocks.empty());

  // a finishes: c takes its slot, after b's decode.
  ASSERT_NE(h.scheduler.remove(a), nullptr);
  plan = h.step();
  ASSERT_EQ(plan.size(), 2u);
  expect_chunk(plan[0], b, 6, 1, true);
  expect_chunk(plan[1], c, 0, 2, true);
  EXPECT_TRUE(h.waiting().empty());
}

TEST(SchedulerTest, TokenBudgetChunksLongPromptsAndDecodesKeepMoving) {
  Harness h(8, 8, 64);
  Sequence* r = h.add(2);   // short: prefilled at once, then decodes every step
  Sequence* l = h.add(20);  // long: split across steps by the 8-token budget
  Sequence* w = h.add(3);   // arrives behind l: waits until the budget allows

  std::vector<ScheduledChunk> plan = h.step();
  ASSERT_EQ(plan.size(), 2u);
  expect_chunk(plan[0], r, 0, 2, true);
  expect_chunk(plan[1], l, 0, 6, false);
  EXPECT_EQ(l->num_cached, 6);
  EXPECT_EQ(l->tokens.size(), 20u);  // no token sampled from a partial prompt
  EXPECT_EQ(h.waiting(), std::vector<const Sequence*>{w});

  plan = h.step();
  ASSERT_EQ(plan.size(), 2u);
  expect_chunk(plan[0], r, 2, 1, true);   // the decode runs first ...
  expect_chunk(plan[1], l, 6, 7, false);  // ... then the rest of the budget goes to the prompt
  EXPECT_EQ(h.waiting(), std::vector<const Sequence*>{w});

  plan = h.step();
  ASSERT_EQ(plan.size(), 2u);
  expect_chunk(plan[0], r, 3, 1, true);
  expect_chunk(plan[1], l, 13, 7, true);  // the last chunk reaches the end: it samples
  EXPECT_EQ(l->tokens.size(), 21u);
  EXPECT_EQ(h.waiting(), std::vector<const Sequence*>{w});

  // Budget left after two decodes: w is admitted at last.
  plan = h.step();
  ASSERT_EQ(plan.size(), 3u);
  expect_chunk(plan[0], r, 4, 1, true);
  expect_chunk(plan[1], l, 20, 1, true);
  expect_chunk(plan[2], w, 0, 3, true);
  for (const ScheduledChunk& chunk : plan) {
    EXPECT_GE(static_cast<int64_t>(chunk.seq->blocks.size()) * 4, chunk.seq->num_cached);
  }
}

TEST(SchedulerTest, PlanNeverExceedsTheTokenBudget) {
  Harness h(8, 5, 64);
  for (int i = 0; i < 4; ++i) h.add(4 + i);
  int64_t generated = 0;
  for (int step = 0; step < 30; ++step) {
    std::vector<ScheduledChunk> plan = h.step();
    int64_t total = 0;
    for (const ScheduledChunk& chunk : plan) {
      total += chunk.count;
      if (chunk.samples) ++generated;
    }
    EXPECT_LE(total, 5) << "step " << step;
    EXPECT_FALSE(plan.empty()) << "step " << step;
  }
  EXPECT_EQ(h.scheduler.running().size(), 4u);
  EXPECT_GT(generated, 0);
}

TEST(SchedulerTest, HeadWaitsForKvBlocksAndLaterOnesDoNotJumpTheQueue) {
  Harness h(8, 64, 4);      // 4 blocks of 4 tokens
  Sequence* a = h.add(10);  // 3 blocks
  Sequence* b = h.add(8);   // 2 blocks: does not fit next to a
  Sequence* c = h.add(2);   // 1 block would fit, but b is first
  std::vector<ScheduledChunk> plan = h.step();
  ASSERT_EQ(plan.size(), 1u);
  expect_chunk(plan[0], a, 0, 10, true);
  EXPECT_EQ(a->blocks.size(), 3u);
  EXPECT_EQ(h.kv.free_blocks(), 1);
  EXPECT_EQ((h.waiting()), (std::vector<const Sequence*>{b, c}));
  EXPECT_TRUE(b->blocks.empty());
  EXPECT_TRUE(c->blocks.empty());

  // a decodes into its third block (11 <= 12 tokens): still no room for b, c still waits.
  plan = h.step();
  ASSERT_EQ(plan.size(), 1u);
  expect_chunk(plan[0], a, 10, 1, true);
  EXPECT_EQ((h.waiting()), (std::vector<const Sequence*>{b, c}));

  ASSERT_NE(h.scheduler.remove(a), nullptr);
  EXPECT_EQ(h.kv.free_blocks(), 4);
  plan = h.step();
  ASSERT_EQ(plan.size(), 2u);
  expect_chunk(plan[0], b, 0, 8, true);
  expect_chunk(plan[1], c, 0, 2, true);
  EXPECT_EQ(h.kv.free_blocks(), 1);
}

TEST(SchedulerTest, SequenceWaitingForKvBlocksDoesNotKeepItsAdapterPinned) {
  Harness h(8, 64, 2, /*device_adapters=*/1);
  Sequence* a = h.add(8);     // base model, takes both blocks
  Sequence* b = h.add(4, 1);  // task 1 fits the device level but no KV block is free
  std::vector<ScheduledChunk> plan = h.step();
  ASSERT_EQ(plan.size(), 1u);
  EXPECT_EQ(plan[0].seq, a);
  EXPECT_EQ(h.waiting(), std::vector<const Sequence*>{b});
  EXPECT_EQ(b->adapter, nullptr);
  EXPECT_TRUE(b->blocks.empty());
  // Task 1 is not pinned: another task can take the single device slot.
  ASSERT_NE(h.lora.acquire(2), nullptr);
  EXPECT_FALSE(h.lora.is_on_device(1));
  h.lora.unpin(2);
}

TEST(SchedulerTest, HeadWaitsForLoraDevicePages) {
  Harness h(8, 64, 32, /*device_adapters=*/2);
  Sequence* s1 = h.add(3, 1);
  Sequence* s2 = h.add(3, 2);
  Sequence* s3 = h.add(3, 3);  // device level full of pinned tasks 1 and 2
  Sequence* s4 = h.add(3);     // base model: must not jump ahead of s3
  std::vector<ScheduledChunk> plan = h.step();
  ASSERT_EQ(plan.size(), 2u);
  EXPECT_EQ(plan[0].seq, s1);
  EXPECT_EQ(plan[1].seq, s2);
  ASSERT_NE(s1->adapter, nullptr);
  ASSERT_NE(s2->adapter, nullptr);
  EXPECT_EQ(s1->adapter->pair(0, 1).rank, 1);
  EXPECT_EQ((h.waiting()), (std::vector<const Sequence*>{s3, s4}));
  EXPECT_EQ(s3->adapter, nullptr);
  EXPECT_TRUE(h.lora.is_on_device(1));
  EXPECT_TRUE(h.lora.is_on_device(2));
  EXPECT_FALSE(h.lora.is_on_device(3));

  // Decodes go on; the head keeps waiting while both pages stay pinned.
  plan = h.step();
  ASSERT_EQ(plan.size(), 2u);
  EXPECT_EQ((h.waiting()), (std::vector<const Sequence*>{s3, s4}));
  EXPECT_EQ(h.lora.stats().device_evictions, 0);

  // s1 finishes: task 1 is unpinned and evicted for task 3; s3 and then s4 are admitted.
  ASSERT_NE(h.scheduler.remove(s1), nullptr);
  plan = h.step();
  ASSERT_EQ(plan.size(), 3u);
  expect_chunk(plan[0], s2, 4, 1, true);
  expect_chunk(plan[1], s3, 0, 3, true);
  expect_chunk(plan[2], s4, 0, 3, true);
  ASSERT_NE(s3->adapter, nullptr);
  EXPECT_TRUE(h.lora.is_on_device(3));
  EXPECT_FALSE(h.lora.is_on_device(1));
  EXPECT_TRUE(h.lora.is_on_device(2));
  EXPECT_EQ(h.lora.stats().device_evictions, 1);
  EXPECT_TRUE(h.waiting().empty());
}

TEST(SchedulerTest, SharedTaskNeedsOnePage) {
  Harness h(8, 64, 32, /*device_adapters=*/1);
  Sequence* a = h.add(3, 4);
  Sequence* b = h.add(3, 4);
  std::vector<ScheduledChunk> plan = h.step();
  ASSERT_EQ(plan.size(), 2u);
  EXPECT_EQ(a->adapter, b->adapter);
  ASSERT_NE(h.scheduler.remove(a), nullptr);
  // b still pins task 4: task 5 cannot take the only slot.
  EXPECT_EQ(h.lora.acquire(5), nullptr);
  ASSERT_NE(h.scheduler.remove(b), nullptr);
  ASSERT_NE(h.lora.acquire(5), nullptr);
  h.lora.unpin(5);
}

TEST(SchedulerTest, DecodeOutOfBlocksPreemptsTheNewestRunningSequence) {
  Harness h(3, 64, 4, /*device_adapters=*/1);  // 4 blocks of 4 tokens, 3 batch slots
  Sequence* a = h.add(4);                      // 1 block
  Sequence* b = h.add(4);                      // 1 block
  Sequence* c = h.add(8, 1);                   // 2 blocks, task 1
  Sequence* d = h.add(2);                      // no batch slot
  std::vector<ScheduledChunk> plan = h.step();
  ASSERT_EQ(plan.size(), 3u);
  EXPECT_EQ(h.kv.free_blocks(), 0);
  EXPECT_EQ(h.waiting(), std::vector<const Sequence*>{d});
  ASSERT_NE(c->adapter, nullptr);
  EXPECT_EQ(c->tokens.size(), 9u);

  // a and b each need a second block for their first decode: c (the newest) is preempted.
  plan = h.step();
  ASSERT_EQ(plan.size(), 2u);
  expect_chunk(plan[0], a, 4, 1, true);
  expect_chunk(plan[1], b, 4, 1, true);
  EXPECT_EQ(h.scheduler.preemptions(), 1);
  EXPECT_FALSE(h.is_running(c));
  EXPECT_EQ((h.waiting()), (std::vector<const Sequence*>{c, d}));  // c goes to the FRONT
  EXPECT_TRUE(c->blocks.empty());
  EXPECT_EQ(c->num_cached, 0);
  EXPECT_EQ(c->adapter, nullptr);
  EXPECT_EQ(c->tokens.size(), 9u);  // its generated token is kept and recomputed
  EXPECT_EQ(a->blocks.size(), 2u);
  EXPECT_EQ(b->blocks.size(), 2u);
  EXPECT_EQ(h.kv.free_blocks(), 0);
  // Task 1 was unpinned by the preemption: another task may take the single device slot.
  ASSERT_NE(h.lora.acquire(2), nullptr);
  h.lora.unpin(2);

  // a and b finish: c is re-admitted first with all 9 tokens to recompute, then d.
  ASSERT_NE(h.scheduler.remove(a), nullptr);
  ASSERT_NE(h.scheduler.remove(b), nullptr);
  EXPECT_EQ(h.kv.free_blocks(), 4);
  plan = h.step();
  ASSERT_EQ(plan.size(), 2u);
  expect_chunk(plan[0], c, 0, 9, true);
  expect_chunk(plan[1], d, 0, 2, true);
  EXPECT_EQ(c->blocks.size(), 3u);
  ASSERT_NE(c->adapter, nullptr);
  EXPECT_TRUE(h.lora.is_on_device(1));
  EXPECT_EQ(c->tokens.size(), 10u);
  EXPECT_EQ(h.scheduler.preemptions(), 1);
}

TEST(SchedulerTest, PreemptsNewestRepeatedlyAndASequenceMayPreemptItself) {
  Harness h(8, 64, 3);  // 3 blocks of 4 tokens
  Sequence* a = h.add(4);
  Sequence* b = h.add(4);
  Sequence* c = h.add(4);
  ASSERT_EQ(h.step().size(), 3u);
  EXPECT_EQ(h.kv.free_blocks(), 0);
  // a needs a second block: c (newest) is preempted. b then needs one too and is itself the
  // newest left running, so b is preempted as well; only a decodes.
  std::vector<ScheduledChunk> plan = h.step();
  ASSERT_EQ(plan.size(), 1u);
  expect_chunk(plan[0], a, 4, 1, true);
  EXPECT_EQ(h.scheduler.preemptions(), 2);
  EXPECT_EQ(h.scheduler.running().size(), 1u);
  // Each preempted sequence goes to the front: b (preempted last) leads, then c.
  EXPECT_EQ((h.waiting()), (std::vector<const Sequence*>{b, c}));
  for (const auto& s : h.scheduler.waiting()) {
    EXPECT_TRUE(s->blocks.empty());
    EXPECT_EQ(s->num_cached, 0);
    EXPECT_EQ(s->tokens.size(), 5u);
  }
  // No block is owned twice and none is lost.
  EXPECT_EQ(a->blocks.size(), 2u);
  EXPECT_EQ(h.kv.free_blocks(), 1);
  // a decodes on (5 -> 6 tokens, same blocks); b cannot be re-admitted with 5 tokens in 1 block.
  plan = h.step();
  ASSERT_EQ(plan.size(), 1u);
  expect_chunk(plan[0], a, 5, 1, true);
  EXPECT_EQ((h.waiting()), (std::vector<const Sequence*>{b, c}));
}

TEST(SchedulerTest, RemoveWaitingAndRunningFreesBlocksAndUnpins) {
  Harness h(1, 64, 8, /*device_adapters=*/1);
  Sequence* a = h.add(6, 1);
  Sequence* b = h.add(3, 2);
  ASSERT_EQ(h.step().size(), 1u);
  EXPECT_EQ(h.kv.free_blocks(), 6);
  EXPECT_TRUE(h.lora.is_on_device(1));

  // Removing the waiting one hands it back untouched and leaves a running.
  std::unique_ptr<Sequence> removed = h.scheduler.remove(b);
  ASSERT_EQ(removed.get(), b);
  EXPECT_TRUE(h.waiting().empty());
  EXPECT_TRUE(h.is_running(a));
  EXPECT_EQ(h.kv.free_blocks(), 6);

  // Removing the running one frees its blocks and unpins task 1.
  removed = h.scheduler.remove(a);
  ASSERT_EQ(removed.get(), a);
  EXPECT_TRUE(h.scheduler.running().empty());
  EXPECT_EQ(h.kv.free_blocks(), 8);
  EXPECT_TRUE(removed->blocks.empty());
  EXPECT_EQ(removed->adapter, nullptr);
  ASSERT_NE(h.lora.acquire(3), nullptr);  // evicts the unpinned task 1
  EXPECT_FALSE(h.lora.is_on_device(1));
  h.lora.unpin(3);

  // Unknown (already removed) sequences: nothing happens.
  EXPECT_EQ(h.scheduler.remove(removed.get()), nullptr);
  EXPECT_TRUE(h.scheduler.schedule().empty());
}

}  // namespace
}  // namespace lorart

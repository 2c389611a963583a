#include "executor/executor.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <iostream>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "core/errors.h"
#include "executor_test_util.h"
#include "kernels/cpu/cpu_kernels.h"
#include "test_util.h"

namespace lorart {
namespace {

using namespace std::chrono_literals;
using testing_util::expect_error;

constexpr auto kTimeout = std::chrono::milliseconds(60'000);

ExecutorConfig small_config(int64_t max_batch_size = 4) {
  ExecutorConfig c;
  c.max_batch_size = max_batch_size;
  c.max_num_tokens = 64;
  c.max_lora_rank = 8;
  c.kv_cache.block_size = 4;
  c.kv_cache.max_tokens = 1024;
  return c;
}

std::unique_ptr<Executor> make_executor(const ExecutorConfig& config = small_config()) {
  return std::make_unique<Executor>(
      testing_util::random_model(testing_util::executor_model_config()), config);
}

InferenceRequest greedy(int32_t max_new_tokens, std::vector<int32_t> prompt = {3, 14, 15, 9}) {
  InferenceRequest r;
  r.input_token_ids = std::move(prompt);
  r.max_new_tokens = max_new_tokens;
  r.sampling_config.top_k = 1;
  return r;
}

Response final_of(Executor& e, uint64_t id) {
  std::vector<Response> all;
  while (all.empty() || !all.back().is_final) {
    std::vector<Response> got = e.await_responses(id, kTimeout);
    if (got.empty()) throw std::runtime_error("no response within the timeout");
    all.insert(all.end(), got.begin(), got.end());
  }
  Response out = all.back();
  out.output_token_ids.clear();
  for (const Response& r : all) {
    out.output_token_ids.insert(out.output_token_ids.end(), r.output_token_ids.begin(),
                                r.output_token_ids.end());
  }
  return out;
}

// Runs `fn` on `n` threads at once; fails (and exits, rather than hang the suite) unless all
// return within 20 s.
template <class Fn>
void on_threads(int n, Fn fn) {
  std::atomic<int> ready{0}, done{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < n; ++i) {
    threads.emplace_back([&, i] {
      ++ready;
      while (ready < n) std::this_thread::yield();
      fn(i);
      ++done;
    });
  }
  const auto deadline = std::chrono::steady_clock::now() + 20s;
  while (done < n && std::chrono::steady_clock::now() < deadline) std::this_thread::sleep_for(1ms);
  if (done < n) {
    std::cerr << "FAILED: " << n - done << " of " << n << " threads never returned\n";
    std::_Exit(1);
  }
  for (std::thread& t : threads) t.join();
}

TEST(ExecutorTest, ConcurrentShutdownsAllReturn) {
  for (int round = 0; round < 8; ++round) {
    auto e = make_executor(small_config(1));
    std::vector<uint64_t> ids;
    for (int i = 0; i < 50; ++i) ids.push_back(e->enqueue_request(greedy(50)));
    ASSERT_FALSE(e->await_responses(ids[0], kTimeout).empty());
    on_threads(4, [&](int) { e->shutdown(); });
    EXPECT_EQ(final_of(*e, ids.back()).finish_reason, FinishReason::kCancelled);
    e->shutdown();
    e.reset();  // the destructor after shutdown
  }
}

TEST(ExecutorTest, ConfigIsResolvedAndCheckedAgainstTheModel) {
  auto e = make_executor();
  EXPECT_EQ(e->config().max_seq_len, 64);  // the model's positions
  EXPECT_GE(e->config().num_threads, 1);
  ExecutorConfig too_long = small_config();
  too_long.max_seq_len = 65;
  expect_error<InvalidArgument>([&] { make_executor(too_long); },
                                "ExecutorConfig.max_seq_len (65) exceeds the model's "
                                "max_position_embeddings (64)");
  ExecutorConfig bf16 = small_config();
  bf16.dtype = "bfloat16";  // the model's weights are float32
  expect_error<InvalidArgument>([&] { make_executor(bf16); },
                                "ExecutorConfig.dtype is 'bfloat16' but the model's weights are "
                                "float32");
  ExecutorConfig wide = small_config();
  wide.max_num_tokens = 65;  // the model's workspace holds 64
  expect_error<InvalidArgument>([&] { make_executor(wide); },
                                "the model's workspace (max_num_tokens 64, max_lora_rank 8) is "
                                "smaller than ExecutorConfig asks for (max_num_tokens 65");
}

TEST(ExecutorTest, WaitersOnOneRequestEachGetResponsesOrAClearError) {
  auto e = make_executor(small_config(1));
  std::vector<uint64_t> ahead;
  for (int i = 0; i < 40; ++i) ahead.push_back(e->enqueue_request(greedy(50)));
  const uint64_t id = e->enqueue_request(greedy(20));
  std::atomic<int> finals{0}, errors{0};
  on_threads(3, [&](int) {
    try {
      std::vector<Response> got = e->await_responses(id, kTimeout);
      finals += !got.empty() && got.back().is_final;
    } catch (const InvalidArgument& err) {
      EXPECT_PRED_FORMAT2(testing::IsSubstring, "its final response went to another", err.what());
      ++errors;
    }
  });
  EXPECT_EQ(finals, 1);
  EXPECT_EQ(errors, 2);
  expect_error<InvalidArgument>([&] { e->await_responses(id, 0ms); }, "unknown request id");
}

TEST(ExecutorTest, AwaitTimeouts) {
  auto e = make_executor(small_config(1));
  const uint64_t id = e->enqueue_request(greedy(30));
  expect_error<InvalidArgument>([&] { e->await_responses(id, -1ms); },
                                "await_responses: timeout must be >= 0, got -1 ms");
  // Past kWaitForever (and past what steady_clock can add) means no deadline, not "at once".
  const auto huge = std::chrono::milliseconds(std::numeric_limits<int64_t>::max());
  std::vector<Response> got = e->await_responses(id, huge);
  ASSERT_EQ(got.size(), 1u);
  EXPECT_TRUE(got[0].is_final);
  EXPECT_EQ(got[0].output_token_ids.size(), 30u);
}

TEST(ExecutorTest, PollRunsWhileWaitingAndMayEndTheWait) {
  auto e = make_executor(small_config(1));
  std::vector<uint64_t> ids;
  for (int i = 0; i < 200; ++i) ids.push_back(e->enqueue_request(greedy(50)));
  int polls = 0;
  auto poll = [&] {
    if (++polls == 3) throw std::runtime_error("interrupted");
  };
  try {
    e->await_responses(ids.back(), std::nullopt, poll, 1ms);
    ADD_FAILURE() << "the wait did not end";
  } catch (const std::runtime_error& err) {
    EXPECT_STREQ(err.what(), "interrupted");
  }
  EXPECT_EQ(polls, 3);
  e->shutdown();
  EXPECT_EQ(final_of(*e, ids.back()).finish_reason, FinishReason::kCancelled);
}

TEST(ExecutorTest, StatsAreBookedBeforeTheFinalResponse) {
  auto e = make_executor();
  for (int i = 1; i <= 50; ++i) {
    InferenceRequest r = greedy(3);
    r.streaming = i % 2 == 0;
    EXPECT_EQ(final_of(*e, e->enqueue_request(r)).finish_reason, FinishReason::kLength);
    const ExecutorStats s = e->stats();
    EXPECT_EQ(s.completed, i);
    EXPECT_EQ(s.generated_tokens, 3 * i);
    EXPECT_EQ(s.running, 0);
    EXPECT_EQ(s.free_kv_blocks, s.total_kv_blocks);
  }
  EXPECT_EQ(final_of(*e, e->enqueue_request(greedy(0))).finish_reason, FinishReason::kError);
  EXPECT_EQ(e->stats().completed, 51);
}

TEST(ExecutorTest, NumThreadsIsSetOnTheLoopThread) {
  const int before = cpu::num_threads();
  cpu::set_num_threads(1);  // this thread's setting only
  ExecutorConfig config = small_config();
  config.num_threads = 2;
  auto e = make_executor(config);
  EXPECT_EQ(e->stats().num_threads, 2);
  EXPECT_EQ(cpu::num_threads(), 1);
  cpu::set_num_threads(before);
}

// Adapter values of 3e38 are finite, so they pass validation, but overflow in the forward.
TEST(ExecutorTest, NonFiniteLogitsFailOnlyTheirRequest) {
  auto e = make_executor();
  const Response solo = final_of(*e, e->enqueue_request(greedy(8)));
  std::vector<float> values(2 * (32 + 32), 3e38f);  // attn_q rank 2: A [2, 32], B [32, 2]
  InferenceRequest blown = greedy(8);
  blown.lora_task_id = 5;
  blown.lora_weights = LoraWeights::copy_of(Tensor(values.data(), DType::kFloat32, {1, 128}));
  blown.lora_config = LoraConfig::from_rows({{1, 0, 2}});
  const uint64_t a = e->enqueue_request(greedy(8));
  const uint64_t b = e->enqueue_request(blown);
  const uint64_t c = e->enqueue_request(greedy(8));
  const Response bad = final_of(*e, b);
  EXPECT_EQ(bad.finish_reason, FinishReason::kError);
  EXPECT_EQ(bad.error_kind, ErrorKind::kInternal);  // the runtime's failure, not the request's
  EXPECT_PRED_FORMAT2(testing::IsSubstring, "the logits are not finite (", bad.error);
  EXPECT_PRED_FORMAT2(testing::IsSubstring,
                      ") at generated token 0 with LoRA task 5: the adapter's values overflow "
                      "float32 in the forward",
                      bad.error);
  EXPECT_TRUE(bad.output_token_ids.empty());
  for (uint64_t id : {a, c}) {
    const Response ok = final_of(*e, id);
    EXPECT_EQ(ok.finish_reason, FinishReason::kLength);
    EXPECT_EQ(ok.error_kind, ErrorKind::kNone);
    EXPECT_EQ(ok.output_token_ids, solo.output_token_ids);
  }
  const ExecutorStats s = e->stats();
  EXPECT_EQ(s.free_kv_blocks, s.total_kv_blocks);
  EXPECT_EQ(s.lora.referenced_tasks, 0);
  EXPECT_EQ(s.lora.pinned_tasks, 0);
}

// The end id is not part of the output, and neither are its log-prob and logits row.
TEST(ExecutorTest, LogProbsAndGenerationLogitsCoverTheOutputTokensOnly) {
  auto e = make_executor();
  const Response free_run = final_of(*e, e->enqueue_request(greedy(6)));
  ASSERT_EQ(free_run.output_token_ids.size(), 6u);
  for (bool streaming : {false, true}) {
    InferenceRequest r = greedy(6);
    r.end_id = free_run.output_token_ids[3];  // greedy: the 4th token ends it
    r.return_log_probs = true;
    r.return_generation_logits = true;
    r.streaming = streaming;
    const uint64_t id = e->enqueue_request(r);
    std::vector<Response> all;
    while (all.empty() || !all.back().is_final) {
      std::vector<Response> got = e->await_responses(id, kTimeout);
      all.insert(all.end(), got.begin(), got.end());
    }
    size_t tokens = 0, log_probs = 0, rows = 0;
    for (const Response& resp : all) {
      tokens += resp.output_token_ids.size();
      log_probs += resp.log_probs.size();
      rows += resp.generation_logits.size() / resp.vocab_size;
    }
    EXPECT_EQ(all.back().finish_reason, FinishReason::kEndId);
    EXPECT_EQ(tokens, 3u) << streaming;
    EXPECT_EQ(log_probs, 3u) << streaming;
    EXPECT_EQ(rows, 3u) << streaming;
  }
}

// Requests enqueued shared deliver through await_any, each response once, in order per request,
// the same tokens as through their own channels; a refused one's error arrives there too.
TEST(ExecutorTest, SharedRequestsAreCollectedTogetherByAwaitAny) {
  auto e = make_executor(small_config(4));
  const Response solo = final_of(*e, e->enqueue_request(greedy(10)));
  std::map<uint64_t, std::vector<int32_t>> tokens;
  std::map<uint64_t, int> finals;
  // Queued behind long requests, a shared one is still waiting when await_responses refuses it.
  std::vector<uint64_t> ahead;
  for (int i = 0; i < 40; ++i) ahead.push_back(e->enqueue_request(greedy(50)));
  const uint64_t waiting = e->enqueue_shared(greedy(10));
  expect_error<InvalidArgument>([&] { e->await_responses(waiting, 0ms); },
                                "its responses come from await_any");
  for (uint64_t id : ahead) {
    e->cancel_request(id);
    e->release_request(id);
  }
  std::vector<uint64_t> ids = {waiting};
  for (int i = 0; i < 6; ++i) {
    InferenceRequest r = greedy(10);
    r.streaming = i % 2 == 0;
    ids.push_back(e->enqueue_shared(r));
  }
  const uint64_t refused = e->enqueue_shared(greedy(4, {}));
  const uint64_t own = e->enqueue_request(greedy(10));  // its own channel, untouched
  std::string refused_error;
  const auto deadline = std::chrono::steady_clock::now() + kTimeout;
  while (finals.size() < ids.size() + 1 && std::chrono::steady_clock::now() < deadline) {
    for (Response& r : e->await_any(kTimeout)) {
      EXPECT_NE(r.request_id, own);
      if (r.request_id == refused) refused_error = r.error;
      tokens[r.request_id].insert(tokens[r.request_id].end(), r.output_token_ids.begin(),
                                  r.output_token_ids.end());
      if (r.is_final) ++finals[r.request_id];
    }
  }
  for (uint64_t id : ids) {
    EXPECT_EQ(finals[id], 1) << id;
    EXPECT_EQ(tokens[id], solo.output_token_ids) << id;
  }
  EXPECT_PRED_FORMAT2(testing::IsSubstring, "input_token_ids is empty", refused_error);
  EXPECT_EQ(final_of(*e, own).output_token_ids, solo.output_token_ids);
  EXPECT_TRUE(e->await_any(0ms).empty());
  while (e->stats().uncollected > 0 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(1ms);  // the released ones end
  }
  EXPECT_EQ(e->stats().uncollected, 0);
  expect_error<InvalidArgument>([&] { e->await_any(-1ms); }, "await_any: timeout must be >= 0");
}

TEST(ExecutorTest, ARequestThatBreaksARuleFailsAsAnInvalidRequest) {
  auto e = make_executor();
  const Response empty = final_of(*e, e->enqueue_request(greedy(4, {})));
  EXPECT_EQ(empty.finish_reason, FinishReason::kError);
  EXPECT_EQ(empty.error_kind, ErrorKind::kInvalidRequest);
  const Response too_long = final_of(*e, e->enqueue_request(greedy(64)));
  EXPECT_EQ(too_long.error_kind, ErrorKind::kInvalidRequest);
  EXPECT_PRED_FORMAT2(testing::IsSubstring, "exceeds max_seq_len = 64", too_long.error);
  EXPECT_STREQ(error_kind_name(ErrorKind::kInvalidRequest), "invalid_request");
  EXPECT_STREQ(error_kind_name(ErrorKind::kInternal), "internal");
}

// Released requests (a client gone) are never collected, yet their channels go at their end:
// released while queued, while running, after finishing, and cancelled and released; the
// collected ones alongside are unaffected.
TEST(ExecutorTest, ReleasedRequestsFreeTheirChannelsAtTheirEnd) {
  auto e = make_executor(small_config(2));
  const uint64_t finished = e->enqueue_request(greedy(2));
  std::vector<uint64_t> kept, released;
  for (int i = 0; i < 6; ++i) {
    InferenceRequest r = greedy(12);
    r.streaming = i % 2 == 0;
    (i < 3 ? kept : released).push_back(e->enqueue_request(r));
  }
  const uint64_t cancelled = e->enqueue_request(greedy(40));
  // Until `finished` has ended, then release it without reading it.
  const auto deadline = std::chrono::steady_clock::now() + kTimeout;
  while (e->stats().completed < 1 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(1ms);
  }
  e->release_request(finished);
  for (uint64_t id : released) e->release_request(id);
  e->cancel_request(cancelled);
  e->release_request(cancelled);
  e->release_request(123456);  // unknown: ignored
  expect_error<InvalidArgument>([&] { e->await_responses(released[0], 0ms); }, "released");
  const Response solo = final_of(*e, kept[1]);
  for (uint64_t id : {kept[0], kept[2]}) {
    EXPECT_EQ(final_of(*e, id).output_token_ids, solo.output_token_ids);
  }
  while ((e->stats().completed < 8 || e->stats().uncollected > 0) &&
         std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(1ms);
  }
  EXPECT_EQ(e->stats().completed, 8);
  EXPECT_EQ(e->stats().uncollected, 0);
  // A waiter on a request that is released meanwhile (still queued behind 40 others) ends with
  // the reason.
  for (int i = 0; i < 40; ++i) e->enqueue_request(greedy(50));
  const uint64_t waited = e->enqueue_request(greedy(40));
  std::thread releaser([&] {
    std::this_thread::sleep_for(20ms);
    e->release_request(waited);
  });
  std::string error;
  try {
    while (true) {
      std::vector<Response> got = e->await_responses(waited, kTimeout);
      if (!got.empty() && got.back().is_final) break;
    }
  } catch (const InvalidArgument& err) {
    error = err.what();
  }
  releaser.join();
  EXPECT_PRED_FORMAT2(testing::IsSubstring, "released", error);
}

}  // namespace
}  // namespace lorart

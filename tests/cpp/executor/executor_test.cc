#include "executor/executor.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <iostream>
#include <map>
#include <memory>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "core/errors.h"
#include "executor_test_util.h"
#include "kernels/cpu/cpu_kernels.h"
#include "kernels/ops.h"
#include "lora/module_ids.h"
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

// --- Adapters with their own vocabulary; DoRA (issue 11) -----------------------------------------

using P = LoraEmbeddings;
using Parts = std::array<P::Input, P::kNumParts>;

constexpr int64_t kWide = 80;

// random_model's weights with `embed` and `lm_head` [V, 32] as the model's own tables (V their
// rows): the model an adapter bringing those tables must behave as.
std::shared_ptr<LlamaModel> model_with_tables(const std::vector<float>& embed,
                                              const std::vector<float>& lm_head) {
  ModelConfig c = testing_util::executor_model_config();
  c.vocab_size = static_cast<int64_t>(embed.size()) / 32;
  ModelWeightsBuilder builder(c);
  uint32_t seed = 7;  // random_model's seeds, tensor by tensor
  testing_util::for_each_llama_param(
      c, [&](const std::string& name, std::vector<int64_t> shape, float lo, float hi) {
        std::vector<float> values = testing_util::random_floats(
            shape[0] * (shape.size() > 1 ? shape[1] : 1), seed++, lo, hi);
        if (name == "model.embed_tokens.weight") values = embed;
        if (name == "lm_head.weight") values = lm_head;
        builder.add(name, shape.size() == 1
                              ? Tensor(values.data(), DType::kFloat32, {shape[0]})
                              : Tensor(values.data(), DType::kFloat32, {shape[0], shape[1]}));
      });
  return std::make_shared<LlamaModel>(c, ModelWeights(std::move(builder)), 64, 8);
}

struct WideAdapter {
  std::vector<float> embed, lm_head;
  LoraWeights weights;
  LoraConfig config;
};
WideAdapter wide_adapter() {
  std::vector<float> embed = testing_util::random_floats(kWide * 32, 1000);
  std::vector<float> head = testing_util::random_floats(kWide * 32, 1001, -0.3f, 0.3f);
  auto e = std::make_shared<std::vector<float>>(embed);
  auto h = std::make_shared<std::vector<float>>(head);
  Parts parts;
  parts[P::kEmbedTokens] = {Tensor(e->data(), DType::kFloat32, {kWide, 32}), e};
  parts[P::kLmHead] = {Tensor(h->data(), DType::kFloat32, {kWide, 32}), h};
  return {embed, head,
          LoraWeights(Tensor(nullptr, DType::kFloat32, {0, 0}), nullptr,
                      std::make_shared<const LoraEmbeddings>(parts)),
          LoraConfig::from_rows({})};
}

InferenceRequest with_adapter(InferenceRequest r, uint64_t task, const WideAdapter* a) {
  r.lora_task_id = task;
  if (a != nullptr) {
    r.lora_weights = a->weights;
    r.lora_config = a->config;
  }
  return r;
}

// Base requests keep the model's vocabulary, a request whose adapter brings 80 tokens has 80:
// ids, end ids, logits widths and tokens all as on a model whose own tables are the adapter's;
// both kinds in one batch are unchanged by each other.
TEST(ExecutorVocabularyTest, EachRequestHasItsAdaptersVocabulary) {
  auto e = make_executor();
  const WideAdapter a = wide_adapter();
  Executor ref(model_with_tables(a.embed, a.lm_head), small_config());
  const std::vector<int32_t> prompt = {3, 70, 15, 79, 64};

  // Past the base vocabulary: refused for a base request, named by index; end_id too.
  const Response base_bad = final_of(*e, e->enqueue_request(greedy(4, prompt)));
  EXPECT_EQ(base_bad.finish_reason, FinishReason::kError);
  EXPECT_EQ(base_bad.error_kind, ErrorKind::kInvalidRequest);
  EXPECT_EQ(base_bad.error, "input_token_ids[1] = 70 is out of the vocabulary [0, 64)");
  EXPECT_EQ(base_bad.vocab_size, 64);
  InferenceRequest base_end = greedy(4);
  base_end.end_id = 64;
  EXPECT_EQ(final_of(*e, e->enqueue_request(base_end)).error,
            "end_id = 64 is out of the vocabulary [0, 64)");

  // Accepted with the adapter; everything as on the reference model.
  InferenceRequest r = with_adapter(greedy(8, prompt), 5, &a);
  r.return_context_logits = true;
  r.return_generation_logits = true;
  r.return_log_probs = true;
  const Response got = final_of(*e, e->enqueue_request(r));
  InferenceRequest rr = greedy(8, prompt);
  rr.return_context_logits = true;
  rr.return_generation_logits = true;
  rr.return_log_probs = true;
  const Response want = final_of(ref, ref.enqueue_request(rr));
  ASSERT_EQ(got.finish_reason, FinishReason::kLength) << got.error;
  ASSERT_EQ(want.finish_reason, FinishReason::kLength) << want.error;
  EXPECT_EQ(got.vocab_size, kWide);
  EXPECT_EQ(got.output_token_ids, want.output_token_ids);
  ASSERT_EQ(got.context_logits.size(), prompt.size() * kWide);
  ASSERT_EQ(got.generation_logits.size(), 8u * kWide);
  for (size_t i = 0; i < got.context_logits.size(); ++i) {
    ASSERT_NEAR(got.context_logits[i], want.context_logits[i], 1e-5) << i;
  }
  for (size_t i = 0; i < got.generation_logits.size(); ++i) {
    ASSERT_NEAR(got.generation_logits[i], want.generation_logits[i], 1e-5) << i;
  }
  ASSERT_EQ(got.log_probs.size(), 8u);
  for (size_t i = 0; i < 8; ++i) EXPECT_NEAR(got.log_probs[i], want.log_probs[i], 1e-5) << i;

  // The adapter's vocabulary bounds its end id; a refusal leaves the task cached, unreferenced.
  InferenceRequest end80 = with_adapter(greedy(4), 5, nullptr);
  end80.end_id = 80;
  const Response end_bad = final_of(*e, e->enqueue_request(end80));
  EXPECT_EQ(end_bad.error_kind, ErrorKind::kInvalidRequest);
  EXPECT_EQ(end_bad.error, "end_id = 80 is out of the vocabulary [0, 80) of the request's adapter");
  EXPECT_EQ(end_bad.vocab_size, kWide);
  const Response id_bad = final_of(*e, e->enqueue_request(with_adapter(greedy(4, {1, 80}), 5, &a)));
  EXPECT_EQ(id_bad.error,
            "input_token_ids[1] = 80 is out of the vocabulary [0, 80) of the request's adapter");
  EXPECT_EQ(e->stats().lora.referenced_tasks, 0);
  EXPECT_TRUE(e->lora_cache().contains(5));
  InferenceRequest end75 = with_adapter(greedy(8, prompt), 5, nullptr);
  end75.end_id = want.output_token_ids[2];  // greedy: ends where that token first comes
  const auto end_at =
      std::find(want.output_token_ids.begin(), want.output_token_ids.end(), *end75.end_id);
  const Response ended = final_of(*e, e->enqueue_request(end75));
  EXPECT_EQ(ended.finish_reason, FinishReason::kEndId);
  EXPECT_EQ(ended.output_token_ids, std::vector<int32_t>(want.output_token_ids.begin(), end_at));

  // Mixed: base and adapter requests in the same steps, each as alone.
  const Response base_solo = final_of(*e, e->enqueue_request(greedy(12)));
  std::vector<uint64_t> base_ids, wide_ids;
  for (int i = 0; i < 3; ++i) {
    base_ids.push_back(e->enqueue_request(greedy(12)));
    wide_ids.push_back(
        e->enqueue_request(with_adapter(greedy(8, prompt), 5, i == 0 ? &a : nullptr)));
  }
  for (uint64_t id : base_ids) {
    const Response out = final_of(*e, id);
    EXPECT_EQ(out.vocab_size, 64);
    EXPECT_EQ(out.output_token_ids, base_solo.output_token_ids);
  }
  for (uint64_t id : wide_ids) {
    const Response out = final_of(*e, id);
    EXPECT_EQ(out.vocab_size, kWide);
    EXPECT_EQ(out.output_token_ids, want.output_token_ids);
  }
  // A base request's logits in a step widened by the adapter: its own 64 columns, as alone.
  InferenceRequest logits_req = greedy(6);
  logits_req.return_context_logits = true;
  logits_req.return_generation_logits = true;
  const Response logits_solo = final_of(*e, e->enqueue_request(logits_req));
  const uint64_t wide_beside = e->enqueue_request(with_adapter(greedy(8, prompt), 5, nullptr));
  const uint64_t base_beside = e->enqueue_request(logits_req);
  const Response beside = final_of(*e, base_beside);
  EXPECT_EQ(final_of(*e, wide_beside).output_token_ids, want.output_token_ids);
  EXPECT_EQ(beside.vocab_size, 64);
  EXPECT_EQ(beside.output_token_ids, logits_solo.output_token_ids);
  ASSERT_EQ(beside.context_logits.size(), 4u * 64);
  ASSERT_EQ(beside.generation_logits.size(), 6u * 64);
  EXPECT_EQ(beside.context_logits, logits_solo.context_logits);
  EXPECT_EQ(beside.generation_logits, logits_solo.generation_logits);

  const ExecutorStats s = e->stats();
  EXPECT_EQ(s.lora.referenced_tasks, 0);
  EXPECT_EQ(s.lora.pinned_tasks, 0);
  EXPECT_EQ(s.free_kv_blocks, s.total_kv_blocks);
}

// Preempted and recomputed (a KV pool too small for all at once), requests of the adapter keep
// their vocabulary: generated ids past the base one are run again under their adapter.
TEST(ExecutorVocabularyTest, PreemptedAdapterRequestsRecomputeUnderTheirVocabulary) {
  ExecutorConfig config = small_config(4);
  config.kv_cache.max_tokens = 64;  // 16 blocks of 4; four requests of 5 + 24 tokens need 32
  auto e = std::make_unique<Executor>(
      testing_util::random_model(testing_util::executor_model_config()), config);
  const WideAdapter a = wide_adapter();
  Executor ref(model_with_tables(a.embed, a.lm_head), small_config());
  const std::vector<int32_t> prompt = {3, 70, 15, 79, 64};
  const Response want = final_of(ref, ref.enqueue_request(greedy(24, prompt)));
  const Response base_want = final_of(*e, e->enqueue_request(greedy(24)));
  std::vector<uint64_t> wide_ids, base_ids;
  for (int i = 0; i < 2; ++i) {
    wide_ids.push_back(
        e->enqueue_request(with_adapter(greedy(24, prompt), 5, i == 0 ? &a : nullptr)));
    base_ids.push_back(e->enqueue_request(greedy(24)));
  }
  for (uint64_t id : wide_ids) EXPECT_EQ(final_of(*e, id).output_token_ids, want.output_token_ids);
  for (uint64_t id : base_ids) {
    EXPECT_EQ(final_of(*e, id).output_token_ids, base_want.output_token_ids);
  }
  EXPECT_GT(e->stats().preemptions, 0);
  EXPECT_EQ(e->stats().lora.referenced_tasks, 0);
}

// An adapter that replaces the tables at the base vocabulary can produce any of its ids, and a
// sampled request draws only from its own vocabulary.
TEST(ExecutorVocabularyTest, SamplingStaysWithinTheRequestsVocabulary) {
  auto e = make_executor();
  const WideAdapter a = wide_adapter();
  std::set<int32_t> seen_base, seen_wide;
  for (int i = 0; i < 6; ++i) {
    InferenceRequest base = greedy(20);
    base.sampling_config = SamplingConfig{0, 1.0f, 2.0f, static_cast<uint64_t>(i)};
    InferenceRequest wide = with_adapter(base, 6, i == 0 ? &a : nullptr);
    const Response b = final_of(*e, e->enqueue_request(base));
    const Response w = final_of(*e, e->enqueue_request(wide));
    ASSERT_EQ(w.finish_reason, FinishReason::kLength) << w.error;
    seen_base.insert(b.output_token_ids.begin(), b.output_token_ids.end());
    seen_wide.insert(w.output_token_ids.begin(), w.output_token_ids.end());
  }
  EXPECT_LT(*seen_base.rbegin(), 64);
  EXPECT_GE(*seen_wide.rbegin(), 64);  // hot sampling over 80 tokens reaches the new ones
  EXPECT_LT(*seen_wide.rbegin(), kWide);
}

// DoRA through the executor: its scales are taken against the model's weights when the adapter
// is cached; a row whose adapted weight has norm 0 is the request's error, and nothing stays.
TEST(ExecutorDoraTest, DoraAdaptersRunAndBadOnesAreRefusedAtEnqueue) {
  auto model = testing_util::random_model(testing_util::executor_model_config());
  Executor e(model, small_config());
  const auto [qkv, first] = model->weights().module_rows(0, lora_module::kAttnQ);
  std::vector<float> w_row(32);
  ops::read_weight_row(ExecContext::cpu(), qkv, model->weights().matrix_layout(), first,
                       Tensor(w_row.data(), DType::kFloat32, {32}));
  // attn_q of layer 0, rank 1: A = W_q[0, :], B[0] = -b0 (B's other rows 0.1), magnitudes 1.
  auto dora = [&](float b0) {
    std::vector<float> values(32 + 32 + 32, 1.0f);
    std::copy(w_row.begin(), w_row.end(), values.begin());
    std::fill(values.begin() + 32, values.begin() + 64, 0.1f);
    values[32] = -b0;
    return LoraWeights::copy_of(Tensor(values.data(), DType::kFloat32, {1, 96}));
  };
  const LoraConfig config = LoraConfig::from_rows({{lora_module::kAttnQ, 0, 1, 1}});
  InferenceRequest bad = greedy(4);
  bad.lora_task_id = 9;
  bad.lora_weights = dora(1.0f);
  bad.lora_config = config;
  const Response refused = final_of(e, e.enqueue_request(bad));
  EXPECT_EQ(refused.finish_reason, FinishReason::kError);
  EXPECT_EQ(refused.error_kind, ErrorKind::kInvalidRequest);
  EXPECT_PRED_FORMAT2(testing::IsSubstring,
                      "lora_config row 0 (attn_q, layer 0, DoRA): magnitude / ||W + B A|| at "
                      "output 0 is inf",
                      refused.error);
  EXPECT_FALSE(e.lora_cache().contains(9));
  EXPECT_EQ(e.stats().lora.referenced_tasks, 0);

  InferenceRequest good = bad;
  good.lora_weights = dora(0.5f);
  const Response ok = final_of(e, e.enqueue_request(good));
  EXPECT_EQ(ok.finish_reason, FinishReason::kLength) << ok.error;
  EXPECT_EQ(ok.output_token_ids.size(), 4u);
  EXPECT_TRUE(e.lora_cache().contains(9));
  // The cached adapter holds the scales against this model's W_q: m / ||W + B A||.
  auto adapter = e.lora_cache().acquire(9);
  ASSERT_NE(adapter, nullptr);
  const float* scale = adapter->pair(0, lora_module::kAttnQ).dora_scale;
  ASSERT_NE(scale, nullptr);
  double norm = 0.0;
  for (float v : w_row) norm += 0.25 * v * v;  // row 0: W - 0.5 W
  EXPECT_NEAR(scale[0], 1.0 / std::sqrt(norm), 1e-6 / std::sqrt(norm));
  e.lora_cache().unpin(9);
}

// Validation must refuse, at enqueue, an adapter the LoRA cache cannot lay out later: an lm_head
// LoRA pair of two dtypes passed validation, then failed its request when the executor loaded it
// (an internal error, for the request's own fault).
TEST(ExecutorVocabularyTest, AnLmHeadPairOfTwoDtypesIsTheRequestsError) {
  auto e = make_executor();
  auto a = std::make_shared<std::vector<float>>(testing_util::random_floats(2 * 32, 1));
  auto b = std::make_shared<std::vector<uint16_t>>(64 * 2);
  const std::vector<float> b_values = testing_util::random_floats(64 * 2, 2);
  convert_floats(b_values.data(), DType::kFloat32, b->data(), DType::kBFloat16, b->size());
  Parts parts;
  parts[P::kLmHeadLoraA] = {Tensor(a->data(), DType::kFloat32, {2, 32}), a};
  parts[P::kLmHeadLoraB] = {Tensor(b->data(), DType::kBFloat16, {64, 2}), b};
  InferenceRequest r = greedy(4);
  r.lora_task_id = 11;
  r.lora_weights = LoraWeights(Tensor(nullptr, DType::kFloat32, {0, 0}), nullptr,
                               std::make_shared<const LoraEmbeddings>(parts));
  r.lora_config = LoraConfig::from_rows({});
  const Response out = final_of(*e, e->enqueue_request(r));
  EXPECT_EQ(out.finish_reason, FinishReason::kError);
  EXPECT_EQ(out.error_kind, ErrorKind::kInvalidRequest) << out.error;
  EXPECT_PRED_FORMAT2(testing::IsSubstring,
                      "lm_head_lora_a is float32 but lm_head_lora_b is bfloat16; a LoRA pair "
                      "has one dtype",
                      out.error);
  EXPECT_FALSE(e->lora_cache().contains(11));
  EXPECT_EQ(e->stats().lora.referenced_tasks, 0);
}

}  // namespace
}  // namespace lorart

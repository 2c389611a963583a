// Executor: the GptManager of the seed documents. A background loop thread runs in-flight
// batching over one ModelRunner: each step it schedules (admission, KV blocks, adapters), builds
// the step's flat description, has the runner run it (forward + sampling), and postprocesses the
// sampled tokens into responses. Public methods are thread-safe and may be called
// from any thread, shutdown() and await_responses() from several at once; the model, the
// scheduler and every Sequence belong to the loop thread. Statistics are booked before the
// responses they count become visible.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <future>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <unordered_map>
#include <vector>

#include "executor/executor_config.h"
#include "executor/kv_cache_manager.h"
#include "executor/lora_cache.h"
#include "executor/request.h"
#include "executor/scheduler.h"
#include "model/lora_table.h"
#include "runtime/model_runner.h"

namespace lorart {

struct ExecutorStats {
  int64_t queued = 0;  // waiting for admission
  int64_t running = 0;
  int64_t completed = 0;  // final responses produced (any reason)
  int64_t steps = 0;
  int64_t preemptions = 0;
  int64_t prompt_tokens = 0;  // tokens run through prefill
  int64_t generated_tokens = 0;
  double busy_seconds = 0.0;       // time spent in steps
  double tokens_per_second = 0.0;  // (prompt + generated) / busy_seconds
  int64_t free_kv_blocks = 0;
  int64_t total_kv_blocks = 0;
  int64_t num_threads = 0;  // CPU threads of the forward, as the loop thread's OpenMP reports
  // Requests whose responses are held for a caller who has not collected them all yet (a
  // released request is held only until its final response).
  int64_t uncollected = 0;
  LoraCacheStats lora;
};

class Executor {
 public:
  // Checks `config` against the model (ExecutorConfig::resolve) before allocating anything.
  Executor(std::shared_ptr<LlamaModel> model, const ExecutorConfig& config);
  ~Executor();

  // Validates the request on the calling thread (a bad request gets its error as a final
  // response with ErrorKind::kInvalidRequest, never an exception) and queues it. Returns at once
  // with the request id.
  uint64_t enqueue_request(InferenceRequest request);
  // As enqueue_request, but the request's responses go to the executor's shared queue, read by
  // await_any() with those of every other such request (one waiter for many requests, e.g. a
  // server's dispatcher, instead of one per request). await_responses() refuses its id.
  uint64_t enqueue_shared(InferenceRequest request);
  // Blocks until the shared queue holds a response (or `timeout` passes: then returns none),
  // then takes every response in it, in the order they were produced (each carries its
  // request_id; a request's final one ends it). `poll` as for await_responses. Several callers
  // may wait: each response goes to exactly one.
  std::vector<Response> await_any(
      std::optional<std::chrono::milliseconds> timeout, const std::function<void()>& poll = {},
      std::chrono::milliseconds poll_interval = std::chrono::milliseconds(100));
  // Blocks until at least one response of `id` is ready (or `timeout` passes: then returns
  // none; a timeout of kWaitForever or more waits without one). While it waits, `poll` (when
  // set) runs every `poll_interval` without any lock held; it may throw to end the wait (the
  // bindings check Python's signals there). Several callers may wait on one id: each response
  // goes to exactly one of them, and those still waiting when another took the final response
  // (or when the id is released) get InvalidArgument. A response wakes only the callers waiting
  // on its own id. Throws InvalidArgument for a negative timeout and for an id that is unknown,
  // released, or already finished and collected.
  std::vector<Response> await_responses(
      uint64_t id, std::optional<std::chrono::milliseconds> timeout,
      const std::function<void()>& poll = {},
      std::chrono::milliseconds poll_interval = std::chrono::milliseconds(100));
  void cancel_request(uint64_t id);
  // The caller will not collect `id`'s responses (a client that went away): those queued are
  // dropped now and later ones as they come, and the request's channel is freed at its final
  // response even though nobody awaits it. Does not cancel the request (cancel_request does).
  // Unknown or already collected ids are ignored; responses of an enqueue_shared request already
  // in the shared queue stay there.
  void release_request(uint64_t id);
  ExecutorStats stats() const;
  // Stops the loop; requests not finished end with finish reason `cancelled`. Idempotent and
  // thread-safe: every caller returns once the loop has stopped.
  void shutdown();

  static constexpr std::chrono::milliseconds kWaitForever{std::chrono::hours(24 * 365 * 10)};

  const ModelConfig& model_config() const { return runner_.config(); }
  const ExecutorConfig& config() const { return config_; }  // resolved: no 0 (auto) fields
  LoraCache& lora_cache() { return lora_cache_; }

 private:
  // One request's responses on their way to its callers. Held by shared_ptr: a waiter keeps
  // its channel while another waiter takes the final response and erases it from channels_.
  struct Channel {
    std::deque<Response> responses;
    std::condition_variable ready;  // its own waiters only, one per response
    bool streaming = false;
    bool shared = false;    // enqueue_shared: its responses go to shared_ (await_any)
    bool released = false;  // release_request: nobody will collect; freed at the final response
    bool closed = false;    // a waiter took the final response
  };
  struct RequestError {
    RequestError(std::string m, ErrorKind k = ErrorKind::kInvalidRequest)
        : message(std::move(m)), kind(k) {}
    RequestError(const char* m) : RequestError(std::string(m)) {}
    std::string message;
    ErrorKind kind;
  };
  // Checks the request and references its adapter; on success `vocab_size` is its vocabulary
  // (the adapter's, else the model's). On error nothing stays referenced.
  std::optional<RequestError> validate(InferenceRequest& request, int64_t& vocab_size);
  void loop(std::promise<void>& started);  // started: set once the thread count is applied
  bool has_work() const;
  // schedule, run, postprocess.
  void step();
  // Fills the step's flat arrays, LoRA table and sample rows from the plan (step_ and friends).
  StepInput build_step(const std::vector<ScheduledChunk>& plan);
  // Books the step's logits and sampled tokens into each chunk's sequence and response.
  int64_t postprocess(const std::vector<ScheduledChunk>& plan, const StepOutput& out);
  void publish_state();  // queue lengths and free blocks into stats_ (loop thread)
  // A final response: counts it, frees the sequence and queues the response in outbox_. An
  // error found while running a request is the runtime's (kInternal) unless said otherwise.
  void finish(Sequence* seq, FinishReason reason, const std::string& error = "",
              ErrorKind kind = ErrorKind::kInternal);
  // Publishes the state into stats_, then hands outbox_'s responses to their channels.
  void flush();
  void emit(std::vector<Response>& responses);  // into the channels (any thread)
  // A message when one of `logits` rows [first_row, first_row + rows) holds NaN/Inf, else "".
  std::string non_finite_logits(const Sequence& seq, const Tensor& logits, int64_t first_row,
                                int64_t rows, int64_t sample_row) const;
  void on_sampled(Sequence& seq, int32_t token);
  static bool ends_with_stop(const Sequence& seq, const std::vector<int32_t>& stop);

  const ExecutorConfig config_;
  // KV blocks of the runner's pool: KvCacheConfig.max_tokens' on the CPU; on CUDA also bounded
  // by free_gpu_memory_fraction of the device memory left after the model and the LoRA pages.
  const int64_t kv_blocks_;
  ModelRunner runner_;
  KvCacheManager kv_manager_;
  LoraCache lora_cache_;
  Scheduler scheduler_;

  mutable std::mutex queue_mutex_;  // guards incoming_, cancels_, stop_
  std::condition_variable queue_cv_;
  std::vector<std::unique_ptr<Sequence>> incoming_;
  std::vector<uint64_t> cancels_;
  bool stop_ = false;

  mutable std::mutex channel_mutex_;  // guards channels_, every Channel's fields and shared_
  std::unordered_map<uint64_t, std::shared_ptr<Channel>> channels_;
  std::deque<Response> shared_;  // responses of enqueue_shared requests, for await_any
  std::condition_variable shared_ready_;
  uint64_t enqueue(InferenceRequest request, bool shared);

  std::atomic<uint64_t> next_id_{1};
  std::unordered_map<uint64_t, Sequence*> live_;  // loop thread: admitted sequences by id
  std::vector<Response> outbox_;                  // loop thread: responses of this iteration

  mutable std::mutex stats_mutex_;
  ExecutorStats stats_;

  // The step's flat description (loop thread), grown once to the configured maxima.
  std::vector<int32_t> token_ids_, positions_, seq_starts_, context_lens_, block_tables_,
      lora_slots_, logits_indices_, sample_rows_;
  std::vector<SamplingParams> sampling_;
  std::vector<uint64_t> rng_states_;
  LoraTable lora_table_;
  std::vector<const LoraAdapter*> step_adapters_;  // the adapter of each LoRA table slot
  // Where a chunk's rows sit in the step's logits.
  struct ChunkRows {
    int64_t first_context_row = 0;  // rows of prompt positions collected as context logits
    int64_t context_rows = 0;
    int64_t sample_row = -1;    // row whose logits pick the next token
    int64_t sample_index = -1;  // its entry in the step's sample rows
  };
  std::vector<ChunkRows> step_rows_;  // one per scheduled chunk
  std::mutex join_mutex_;  // one shutdown() joins the loop thread; the others wait for it
  std::thread thread_;
};

}  // namespace lorart

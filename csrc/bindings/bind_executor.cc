#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <memory>
#include <optional>
#include <string>

#include "bindings/bindings.h"
#include "bindings/repr.h"
#include "executor/executor.h"
#include "kernels/ops.h"

namespace lorart::bindings {

namespace {

py::object floats_or_none(const std::vector<float>& values, int64_t columns) {
  if (values.empty()) return py::none();
  const int64_t rows = static_cast<int64_t>(values.size()) / columns;
  py::array_t<float> out(columns == 1 ? std::vector<int64_t>{rows}
                                      : std::vector<int64_t>{rows, columns});
  std::copy(values.begin(), values.end(), out.mutable_data());
  return std::move(out);
}

py::dict stats_dict(const ExecutorStats& s) {
  py::dict lora;
  lora["hits"] = s.lora.hits;
  lora["misses"] = s.lora.misses;
  lora["device_evictions"] = s.lora.device_evictions;
  lora["host_evictions"] = s.lora.host_evictions;
  lora["host_bytes"] = s.lora.host_bytes;
  lora["device_bytes"] = s.lora.device_bytes;
  lora["host_tasks"] = s.lora.host_tasks;
  lora["device_tasks"] = s.lora.device_tasks;
  lora["replacements"] = s.lora.replacements;
  lora["referenced_tasks"] = s.lora.referenced_tasks;
  lora["pinned_tasks"] = s.lora.pinned_tasks;
  py::dict d;
  d["queued"] = s.queued;
  d["running"] = s.running;
  d["completed"] = s.completed;
  d["steps"] = s.steps;
  d["preemptions"] = s.preemptions;
  d["prompt_tokens"] = s.prompt_tokens;
  d["generated_tokens"] = s.generated_tokens;
  d["busy_seconds"] = s.busy_seconds;
  d["tokens_per_second"] = s.tokens_per_second;
  d["free_kv_blocks"] = s.free_kv_blocks;
  d["total_kv_blocks"] = s.total_kv_blocks;
  d["num_threads"] = s.num_threads;
  d["uncollected"] = s.uncollected;
  d["lora_cache"] = lora;
  return d;
}

// `timeout`: None or inf wait without a deadline; any other value >= 0 is seconds (huge ones
// included). While waiting, the signal handlers run every 0.1 s with the GIL held, so Ctrl-C
// raises KeyboardInterrupt during a long wait.
std::optional<std::chrono::milliseconds> wait_limit(const char* op, std::optional<double> timeout) {
  std::optional<std::chrono::milliseconds> ms;
  if (timeout) {
    if (!(*timeout >= 0.0)) {  // NaN fails this too
      throw py::value_error(std::string(op) +
                            ": timeout must be None or a number of seconds >= 0 (inf: no "
                            "deadline), got " +
                            repr_float(*timeout));
    }
    const double limit = std::chrono::duration<double>(Executor::kWaitForever).count();
    if (*timeout < limit) {
      ms = std::chrono::milliseconds(static_cast<int64_t>(std::ceil(*timeout * 1000.0)));
    }
  }
  return ms;
}

void check_signals() {
  py::gil_scoped_acquire gil;
  if (PyErr_CheckSignals() != 0) throw py::error_already_set();
}

std::vector<Response> await_interruptibly(Executor& e, uint64_t id, std::optional<double> timeout) {
  const auto ms = wait_limit("await_responses", timeout);
  py::gil_scoped_release release;
  return e.await_responses(id, ms, check_signals);
}

std::vector<Response> await_any_interruptibly(Executor& e, std::optional<double> timeout) {
  const auto ms = wait_limit("await_any", timeout);
  py::gil_scoped_release release;
  return e.await_any(ms, check_signals);
}

std::string repr_sampling(const SamplingConfig& c) {
  return "SamplingConfig(top_k=" + std::to_string(c.top_k) + ", top_p=" + repr_float(c.top_p) +
         ", temperature=" + repr_float(c.temperature) +
         ", seed=" + (c.seed ? std::to_string(*c.seed) : "None") + ")";
}

// Only what differs from the defaults, after the prompt and max_new_tokens.
std::string repr_request(const InferenceRequest& r) {
  const InferenceRequest d;
  std::string out = "InferenceRequest(input_token_ids=" + repr_tokens(r.input_token_ids) +
                    ", max_new_tokens=" + std::to_string(r.max_new_tokens);
  if (repr_sampling(r.sampling_config) != repr_sampling(d.sampling_config)) {
    out += ", sampling_config=" + repr_sampling(r.sampling_config);
  }
  if (r.end_id) out += ", end_id=" + std::to_string(*r.end_id);
  if (!r.stop_token_ids.empty()) {
    out += ", stop_token_ids=[";
    for (size_t i = 0; i < r.stop_token_ids.size(); ++i) {
      out += (i ? ", " : "") + repr_tokens(r.stop_token_ids[i], /*count=*/false);
    }
    out += "]";
  }
  if (r.lora_task_id) out += ", lora_task_id=" + std::to_string(*r.lora_task_id);
  if (r.lora_weights)
    out += ", lora_weights=" + py::repr(py::cast(*r.lora_weights)).cast<std::string>();
  if (r.lora_config)
    out += ", lora_config=" + py::repr(py::cast(*r.lora_config)).cast<std::string>();
  if (r.streaming) out += ", streaming=True";
  if (r.return_context_logits) out += ", return_context_logits=True";
  if (r.return_generation_logits) out += ", return_generation_logits=True";
  if (r.return_log_probs) out += ", return_log_probs=True";
  return out + ")";
}

std::string repr_response(const Response& r) {
  std::string out = "Response(request_id=" + std::to_string(r.request_id) +
                    ", output_token_ids=" + repr_tokens(r.output_token_ids) + ", finish_reason=" +
                    (r.finish_reason == FinishReason::kNotFinished
                         ? std::string("None")
                         : repr_str(finish_reason_name(r.finish_reason)));
  if (!r.error.empty()) {
    out +=
        ", error=" + repr_str(r.error) + ", error_kind=" + repr_str(error_kind_name(r.error_kind));
  }
  auto rows = [&](const char* name, const std::vector<float>& values, int64_t columns) {
    if (values.empty()) return;
    out += std::string(", ") + name + "=<float32 [" + std::to_string(values.size() / columns) +
           (columns > 1 ? ", " + std::to_string(columns) : std::string()) + "]>";
  };
  rows("context_logits", r.context_logits, r.vocab_size);
  rows("generation_logits", r.generation_logits, r.vocab_size);
  rows("log_probs", r.log_probs, 1);
  return out + ", is_final=" + repr_bool(r.is_final) + ")";
}

std::string repr_lora_cache(const LoraCacheConfig& c) {
  return "LoraCacheConfig(host_cache_bytes=" + std::to_string(c.host_cache_bytes) +
         ", device_cache_bytes=" + std::to_string(c.device_cache_bytes) + ")";
}

std::string repr_kv_cache(const KvCacheConfig& c) {
  return "KvCacheConfig(block_size=" + std::to_string(c.block_size) +
         ", max_tokens=" + std::to_string(c.max_tokens) + ", dtype=" + repr_str(c.dtype) +
         ", free_gpu_memory_fraction=" + repr_float(c.free_gpu_memory_fraction) + ")";
}

std::string repr_executor_config(const ExecutorConfig& c) {
  return "ExecutorConfig(device=" + repr_str(c.device) + ", dtype=" + repr_str(c.dtype) +
         ", precision=" + repr_str(c.precision) +
         ", max_batch_size=" + std::to_string(c.max_batch_size) +
         ", max_num_tokens=" + std::to_string(c.max_num_tokens) +
         ", max_seq_len=" + std::to_string(c.max_seq_len) +
         ", max_lora_rank=" + std::to_string(c.max_lora_rank) +
         ", num_threads=" + std::to_string(c.num_threads) +
         ", lora_cache=" + repr_lora_cache(c.lora_cache) +
         ", kv_cache=" + repr_kv_cache(c.kv_cache) + ")";
}

}  // namespace

void bind_executor(py::module_& m) {
  // Python defaults come from the C++ structs' own, so the two cannot drift apart.
  const SamplingConfig sampling;
  const InferenceRequest request;
  const LoraCacheConfig lora_cache;
  const KvCacheConfig kv_cache;
  const ExecutorConfig executor;
  py::class_<SamplingConfig>(m, "SamplingConfig", "How a request picks tokens.")
      .def(
          py::init([](int32_t top_k, float top_p, float temperature, std::optional<uint64_t> seed) {
            SamplingConfig c{top_k, top_p, temperature, seed};
            c.validate();
            return c;
          }),
          py::arg("top_k") = sampling.top_k, py::arg("top_p") = sampling.top_p,
          py::arg("temperature") = sampling.temperature, py::arg("seed") = py::none())
      .def_readwrite("top_k", &SamplingConfig::top_k)
      .def_readwrite("top_p", &SamplingConfig::top_p)
      .def_readwrite("temperature", &SamplingConfig::temperature)
      .def_readwrite("seed", &SamplingConfig::seed)
      .def("__repr__", &repr_sampling);

  py::class_<InferenceRequest>(m, "InferenceRequest", "One generation request.")
      .def(py::init(
               [](std::vector<int32_t> input_token_ids, int32_t max_new_tokens,
                  std::optional<SamplingConfig> sampling_config, std::optional<int32_t> end_id,
                  std::vector<std::vector<int32_t>> stop_token_ids,
                  std::optional<uint64_t> lora_task_id, std::optional<LoraWeights> lora_weights,
                  std::optional<LoraConfig> lora_config, bool streaming, bool return_context_logits,
                  bool return_generation_logits, bool return_log_probs) {
                 InferenceRequest r;
                 r.input_token_ids = std::move(input_token_ids);
                 r.max_new_tokens = max_new_tokens;
                 r.sampling_config = sampling_config.value_or(SamplingConfig{});
                 r.end_id = end_id;
                 r.stop_token_ids = std::move(stop_token_ids);
                 r.lora_task_id = lora_task_id;
                 r.lora_weights = std::move(lora_weights);
                 r.lora_config = std::move(lora_config);
                 r.streaming = streaming;
                 r.return_context_logits = return_context_logits;
                 r.return_generation_logits = return_generation_logits;
                 r.return_log_probs = return_log_probs;
                 return r;
               }),
           py::arg("input_token_ids"), py::arg("max_new_tokens") = request.max_new_tokens,
           py::arg("sampling_config") = py::none(), py::arg("end_id") = py::none(),
           py::arg("stop_token_ids") = std::vector<std::vector<int32_t>>{},
           py::arg("lora_task_id") = py::none(), py::arg("lora_weights") = py::none(),
           py::arg("lora_config") = py::none(), py::arg("streaming") = false,
           py::arg("return_context_logits") = false, py::arg("return_generation_logits") = false,
           py::arg("return_log_probs") = false)
      .def_readwrite("input_token_ids", &InferenceRequest::input_token_ids)
      .def_readwrite("max_new_tokens", &InferenceRequest::max_new_tokens)
      .def_readwrite("sampling_config", &InferenceRequest::sampling_config)
      .def_readwrite("end_id", &InferenceRequest::end_id)
      .def_readwrite("stop_token_ids", &InferenceRequest::stop_token_ids)
      .def_readwrite("lora_task_id", &InferenceRequest::lora_task_id)
      .def_readwrite("lora_weights", &InferenceRequest::lora_weights)
      .def_readwrite("lora_config", &InferenceRequest::lora_config)
      .def_readwrite("streaming", &InferenceRequest::streaming)
      .def_readwrite("return_context_logits", &InferenceRequest::return_context_logits)
      .def_readwrite("return_generation_logits", &InferenceRequest::return_generation_logits)
      .def_readwrite("return_log_probs", &InferenceRequest::return_log_probs)
      .def("__repr__", &repr_request);

  py::class_<Response>(m, "Response", "A (partial or final) result of one request.")
      .def_readonly("request_id", &Response::request_id)
      .def_readonly("output_token_ids", &Response::output_token_ids)
      .def_property_readonly("finish_reason",
                             [](const Response& r) -> py::object {
                               if (r.finish_reason == FinishReason::kNotFinished) {
                                 return py::none();
                               }
                               return py::str(finish_reason_name(r.finish_reason));
                             })
      .def_property_readonly("error",
                             [](const Response& r) -> py::object {
                               return r.error.empty() ? py::object(py::none())
                                                      : py::object(py::str(r.error));
                             })
      .def_property_readonly(
          "error_kind",
          [](const Response& r) -> py::object {
            if (r.error_kind == ErrorKind::kNone) return py::none();
            return py::str(error_kind_name(r.error_kind));
          },
          "For an error: 'invalid_request' (the request broke a rule) or "
          "'internal' (the runtime failed); else None.")
      .def_readonly("is_final", &Response::is_final)
      .def_readonly("vocab_size", &Response::vocab_size,
                    "The request's vocabulary (its adapter's when it brings one, else the "
                    "model's): the width of its logits rows and the bound of its token ids.")
      .def_property_readonly(
          "context_logits",
          [](const Response& r) { return floats_or_none(r.context_logits, r.vocab_size); })
      .def_property_readonly(
          "generation_logits",
          [](const Response& r) { return floats_or_none(r.generation_logits, r.vocab_size); })
      .def_property_readonly("log_probs",
                             [](const Response& r) { return floats_or_none(r.log_probs, 1); })
      .def("__repr__", &repr_response);

  py::class_<LoraCacheConfig>(m, "LoraCacheConfig", "Byte budgets of the two LoRA cache levels.")
      .def(py::init([](int64_t host, int64_t device) { return LoraCacheConfig{host, device}; }),
           py::arg("host_cache_bytes") = lora_cache.host_cache_bytes,
           py::arg("device_cache_bytes") = lora_cache.device_cache_bytes)
      .def_readwrite("host_cache_bytes", &LoraCacheConfig::host_cache_bytes)
      .def_readwrite("device_cache_bytes", &LoraCacheConfig::device_cache_bytes)
      .def("__repr__", &repr_lora_cache);

  py::class_<KvCacheConfig>(m, "KvCacheConfig",
                            "Paged KV pool: block size, capacity, storage dtype (\"float32\", "
                            "\"float16\", \"bfloat16\" or \"auto\") and, on CUDA, the share of "
                            "free device memory it may take.")
      .def(py::init([](int64_t block_size, int64_t max_tokens, std::string dtype,
                       double free_gpu_memory_fraction) {
             return KvCacheConfig{block_size, max_tokens, std::move(dtype),
                                  free_gpu_memory_fraction};
           }),
           py::arg("block_size") = kv_cache.block_size, py::arg("max_tokens") = kv_cache.max_tokens,
           py::arg("dtype") = kv_cache.dtype,
           py::arg("free_gpu_memory_fraction") = kv_cache.free_gpu_memory_fraction,
           "free_gpu_memory_fraction (CUDA only, in (0, 1]): the share of the device memory left "
           "after weights, device LoRA cache and workspace that the KV pool may take; the pool is "
           "the smaller of that and max_tokens. Checked by ExecutorConfig.")
      .def_readwrite("block_size", &KvCacheConfig::block_size)
      .def_readwrite("max_tokens", &KvCacheConfig::max_tokens)
      .def_readwrite("dtype", &KvCacheConfig::dtype)
      .def_readwrite("free_gpu_memory_fraction", &KvCacheConfig::free_gpu_memory_fraction)
      .def("__repr__", &repr_kv_cache);

  py::class_<ExecutorConfig>(m, "ExecutorConfig", "Sizes and limits of an Executor.")
      .def(
          py::init([](std::string device, std::string dtype, std::string precision,
                      int64_t max_batch_size, int64_t max_num_tokens,
                      std::optional<int64_t> max_seq_len, int64_t max_lora_rank,
                      std::optional<int64_t> num_threads, std::optional<LoraCacheConfig> lora_cache,
                      std::optional<KvCacheConfig> kv_cache) {
            ExecutorConfig c;
            c.device = std::move(device);
            c.dtype = std::move(dtype);
            c.precision = std::move(precision);
            c.max_batch_size = max_batch_size;
            c.max_num_tokens = max_num_tokens;
            c.max_seq_len = max_seq_len.value_or(0);
            c.max_lora_rank = max_lora_rank;
            c.num_threads = num_threads.value_or(0);
            c.lora_cache = lora_cache.value_or(LoraCacheConfig{});
            c.kv_cache = kv_cache.value_or(KvCacheConfig{});
            c.validate();
            return c;
          }),
          py::arg("device") = executor.device, py::arg("dtype") = executor.dtype,
          py::arg("precision") = executor.precision,
          py::arg("max_batch_size") = executor.max_batch_size,
          py::arg("max_num_tokens") = executor.max_num_tokens, py::arg("max_seq_len") = py::none(),
          py::arg("max_lora_rank") = executor.max_lora_rank, py::arg("num_threads") = py::none(),
          py::arg("lora_cache") = py::none(), py::arg("kv_cache") = py::none(),
          "max_seq_len None/0: the model's max_position_embeddings (at most kv_cache.max_tokens); "
          "num_threads None/0: the CPUs available to this process (OMP_NUM_THREADS when set).")
      .def_readwrite("device", &ExecutorConfig::device)
      .def_readwrite("dtype", &ExecutorConfig::dtype)
      .def_readwrite("precision", &ExecutorConfig::precision)
      .def_readwrite("max_batch_size", &ExecutorConfig::max_batch_size)
      .def_readwrite("max_num_tokens", &ExecutorConfig::max_num_tokens)
      .def_readwrite("max_seq_len", &ExecutorConfig::max_seq_len)
      .def_readwrite("max_lora_rank", &ExecutorConfig::max_lora_rank)
      .def_readwrite("num_threads", &ExecutorConfig::num_threads)
      .def_readwrite("lora_cache", &ExecutorConfig::lora_cache)
      .def_readwrite("kv_cache", &ExecutorConfig::kv_cache)
      .def("validate", &ExecutorConfig::validate,
           "Raise ValueError naming the first field outside its limit.")
      .def("resolve", &ExecutorConfig::resolve, py::arg("model_config"),
           "Check against a model (positions, memory) and return the config an Executor runs "
           "with: max_seq_len and num_threads resolved. Allocates nothing.")
      .def("__repr__", &repr_executor_config);

  py::class_<Executor>(m, "Executor", "In-flight batching loop over one model (C++ thread).")
      .def(py::init<std::shared_ptr<LlamaModel>, const ExecutorConfig&>(), py::arg("model"),
           py::arg("config"))
      .def("enqueue_request", &Executor::enqueue_request, py::arg("request"),
           py::call_guard<py::gil_scoped_release>())
      .def("await_responses", &await_interruptibly, py::arg("request_id"),
           py::arg("timeout") = py::none(),
           "Wait (GIL released, Ctrl-C honoured within 0.1 s) for responses of request_id; "
           "timeout None/inf: no deadline, else seconds >= 0.")
      .def("enqueue_shared", &Executor::enqueue_shared, py::arg("request"),
           py::call_guard<py::gil_scoped_release>(),
           "As enqueue_request, but its responses go to the shared queue that await_any reads.")
      .def("await_any", &await_any_interruptibly, py::arg("timeout") = py::none(),
           "Wait (GIL released, Ctrl-C honoured within 0.1 s) until the shared queue holds "
           "responses, then take them all (each with its request_id).")
      .def("cancel_request", &Executor::cancel_request, py::arg("request_id"))
      .def("release_request", &Executor::release_request, py::arg("request_id"),
           "The caller will not collect request_id's responses: they are dropped and its channel "
           "is freed at its final response (does not cancel it; unknown ids are ignored).")
      .def("stats", [](const Executor& e) { return stats_dict(e.stats()); })
      .def("shutdown", &Executor::shutdown, py::call_guard<py::gil_scoped_release>())
      // Copies: the executor's own are const, and Python may set fields on what it gets.
      .def_property_readonly("model_config",
                             [](const Executor& e) { return ModelConfig(e.model_config()); })
      .def_property_readonly(
          "config", [](const Executor& e) { return ExecutorConfig(e.config()); },
          "The ExecutorConfig it runs with (max_seq_len, num_threads resolved).")
      .def("contains_lora_task",
           [](Executor& e, uint64_t id) { return e.lora_cache().contains(id); })
      .def("lora_task_on_device",
           [](Executor& e, uint64_t id) { return e.lora_cache().is_on_device(id); });

  m.def("available_cpus", &available_cpus,
        "CPUs this process may run on (affinity mask, capped by a cgroup CPU quota): the "
        "executor's default thread count.");
  m.def(
      "num_threads", [] { return ops::cpu_threads(); },
      "OpenMP threads the calling thread's forward would use (a per-thread setting).");
}

}  // namespace lorart::bindings

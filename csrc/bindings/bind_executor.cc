#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <chrono>
#include <memory>
#include <optional>

#include "bindings/bindings.h"
#include "executor/executor.h"

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
  d["lora_cache"] = lora;
  return d;
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
      .def_readwrite("seed", &SamplingConfig::seed);

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
      .def_readwrite("return_log_probs", &InferenceRequest::return_log_probs);

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
      .def_readonly("is_final", &Response::is_final)
      .def_property_readonly(
          "context_logits",
          [](const Response& r) { return floats_or_none(r.context_logits, r.vocab_size); })
      .def_property_readonly(
          "generation_logits",
          [](const Response& r) { return floats_or_none(r.generation_logits, r.vocab_size); })
      .def_property_readonly("log_probs",
                             [](const Response& r) { return floats_or_none(r.log_probs, 1); });

  py::class_<LoraCacheConfig>(m, "LoraCacheConfig", "Byte budgets of the two LoRA cache levels.")
      .def(py::init([](int64_t host, int64_t device) { return LoraCacheConfig{host, device}; }),
           py::arg("host_cache_bytes") = lora_cache.host_cache_bytes,
           py::arg("device_cache_bytes") = lora_cache.device_cache_bytes)
      .def_readwrite("host_cache_bytes", &LoraCacheConfig::host_cache_bytes)
      .def_readwrite("device_cache_bytes", &LoraCacheConfig::device_cache_bytes);

  py::class_<KvCacheConfig>(m, "KvCacheConfig", "Paged KV pool: block size and capacity.")
      .def(py::init([](int64_t block_size, int64_t max_tokens) {
             return KvCacheConfig{block_size, max_tokens};
           }),
           py::arg("block_size") = kv_cache.block_size, py::arg("max_tokens") = kv_cache.max_tokens)
      .def_readwrite("block_size", &KvCacheConfig::block_size)
      .def_readwrite("max_tokens", &KvCacheConfig::max_tokens);

  py::class_<ExecutorConfig>(m, "ExecutorConfig", "Sizes and limits of an Executor.")
      .def(py::init([](std::string device, std::string dtype, int64_t max_batch_size,
                       int64_t max_num_tokens, int64_t max_seq_len, int64_t max_lora_rank,
                       std::optional<LoraCacheConfig> lora_cache,
                       std::optional<KvCacheConfig> kv_cache) {
             ExecutorConfig c;
             c.device = std::move(device);
             c.dtype = std::move(dtype);
             c.max_batch_size = max_batch_size;
             c.max_num_tokens = max_num_tokens;
             c.max_seq_len = max_seq_len;
             c.max_lora_rank = max_lora_rank;
             c.lora_cache = lora_cache.value_or(LoraCacheConfig{});
             c.kv_cache = kv_cache.value_or(KvCacheConfig{});
             c.validate();
             return c;
           }),
           py::arg("device") = executor.device, py::arg("dtype") = executor.dtype,
           py::arg("max_batch_size") = executor.max_batch_size,
           py::arg("max_num_tokens") = executor.max_num_tokens,
           py::arg("max_seq_len") = executor.max_seq_len,
           py::arg("max_lora_rank") = executor.max_lora_rank, py::arg("lora_cache") = py::none(),
           py::arg("kv_cache") = py::none())
      .def_readwrite("device", &ExecutorConfig::device)
      .def_readwrite("dtype", &ExecutorConfig::dtype)
      .def_readwrite("max_batch_size", &ExecutorConfig::max_batch_size)
      .def_readwrite("max_num_tokens", &ExecutorConfig::max_num_tokens)
      .def_readwrite("max_seq_len", &ExecutorConfig::max_seq_len)
      .def_readwrite("max_lora_rank", &ExecutorConfig::max_lora_rank)
      .def_readwrite("lora_cache", &ExecutorConfig::lora_cache)
      .def_readwrite("kv_cache", &ExecutorConfig::kv_cache);

  py::class_<Executor>(m, "Executor", "In-flight batching loop over one model (C++ thread).")
      .def(py::init<std::shared_ptr<LlamaModel>, const ExecutorConfig&>(), py::arg("model"),
           py::arg("config"))
      .def("enqueue_request", &Executor::enqueue_request, py::arg("request"),
           py::call_guard<py::gil_scoped_release>())
      .def(
          "await_responses",
          [](Executor& e, uint64_t id, std::optional<double> timeout) {
            std::optional<std::chrono::milliseconds> ms;
            if (timeout) {
              ms = std::chrono::milliseconds(static_cast<int64_t>(*timeout * 1000.0));
            }
            py::gil_scoped_release release;
            return e.await_responses(id, ms);
          },
          py::arg("request_id"), py::arg("timeout") = py::none())
      .def("cancel_request", &Executor::cancel_request, py::arg("request_id"))
      .def("stats", [](const Executor& e) { return stats_dict(e.stats()); })
      .def("shutdown", &Executor::shutdown, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("model_config", &Executor::model_config)
      .def("contains_lora_task",
           [](Executor& e, uint64_t id) { return e.lora_cache().contains(id); })
      .def("lora_task_on_device",
           [](Executor& e, uint64_t id) { return e.lora_cache().is_on_device(id); });
}

}  // namespace lorart::bindings

#include <pybind11/stl.h>

#include <memory>
#include <string>
#include <vector>

#include "bindings/array_interop.h"
#include "bindings/bindings.h"
#include "core/errors.h"
#include "kernels/cpu/cpu_kernels.h"
#include "model/llama_model.h"

namespace lorart::bindings {

namespace {

// Keeps the borrowed index arrays of one forward alive while the GIL is released.
struct BorrowedBatch {
  std::vector<BorrowedTensor> held;
  ForwardBatch batch;

  Tensor take(py::handle obj, const char* name) {
    held.push_back(borrow_array(obj, name, DType::kInt32));
    if (held.back().tensor.dtype() != DType::kInt32) {
      raise<InvalidArgument>(name, " must have dtype int32, got ",
                             dtype_name(held.back().tensor.dtype()));
    }
    return held.back().tensor;
  }
};

}  // namespace

void bind_model(py::module_& m) {
  m.def("set_num_threads", &cpu::set_num_threads, py::arg("threads"),
        "Threads for the CPU kernels (OpenMP) and the BLAS.");
  m.def("get_num_threads", &cpu::num_threads);

  py::class_<ModelWeightsBuilder>(m, "ModelWeightsBuilder",
                                  "Collects HF-named checkpoint tensors, converting to float32.")
      .def(py::init<const ModelConfig&>(), py::arg("config"))
      .def(
          "add",
          [](ModelWeightsBuilder& b, const std::string& name, py::handle array) {
            BorrowedTensor t = borrow_array(array, name.c_str(), DType::kFloat32);
            py::gil_scoped_release release;
            b.add(name, t.tensor);
          },
          py::arg("name"), py::arg("array"))
      .def("missing", &ModelWeightsBuilder::missing);

  py::class_<KvCache>(m, "KvCache", "Paged KV pool [layers, 2, blocks, block_size, kv_heads, hd].")
      .def(py::init<const ModelConfig&, int64_t, int64_t>(), py::arg("config"),
           py::arg("num_blocks"), py::arg("block_size") = 16)
      .def_property_readonly("num_blocks", &KvCache::num_blocks)
      .def_property_readonly("block_size", &KvCache::block_size)
      .def_property_readonly("nbytes", &KvCache::nbytes)
      .def_static("bytes_per_token", &KvCache::bytes_per_token, py::arg("config"));

  py::class_<LoraAdapter, std::shared_ptr<LoraAdapter>>(
      m, "LoraAdapter",
      "A validated adapter laid out for the forward, in its own storage dtype (float32, float16 "
      "or bfloat16; widened to float32 as the kernels read it).")
      .def(py::init<const LoraWeights&, const LoraConfig&, const ModelConfig&, int64_t>(),
           py::arg("weights"), py::arg("config"), py::arg("model_config"),
           py::arg("max_lora_rank") = 64)
      .def_property_readonly("max_rank", &LoraAdapter::max_rank)
      .def_property_readonly(
          "dtype", [](const LoraAdapter& a) { return std::string(dtype_name(a.dtype())); })
      .def_property_readonly("nbytes", &LoraAdapter::nbytes,
                             "Bytes it holds: rank * (in + out) values per adapted module; this "
                             "is what it costs on the LoRA cache's device level.");

  py::class_<LlamaModel, std::shared_ptr<LlamaModel>>(
      m, "LlamaModel", "Llama-family forward over a packed, paged batch.")
      .def(py::init([](const ModelConfig& config, ModelWeightsBuilder& builder,
                       int64_t max_num_tokens, int64_t max_lora_rank) {
             return std::make_shared<LlamaModel>(config, ModelWeights(std::move(builder)),
                                                 max_num_tokens, max_lora_rank);
           }),
           py::arg("config"), py::arg("weights"), py::arg("max_num_tokens") = 2048,
           py::arg("max_lora_rank") = 64)
      .def_property_readonly("config", &LlamaModel::config)
      .def_property_readonly("max_num_tokens", &LlamaModel::max_num_tokens)
      .def_property_readonly("max_lora_rank", &LlamaModel::max_lora_rank)
      .def_property_readonly("weight_bytes", &LlamaModel::weight_bytes)
      .def(
          "forward",
          [](LlamaModel& model, py::handle token_ids, py::handle seq_starts,
             py::handle context_lens, py::handle block_tables, py::handle lora_slots,
             py::handle logits_indices, KvCache& cache,
             const std::vector<std::shared_ptr<LoraAdapter>>& adapters) {
            BorrowedBatch b;
            b.batch.token_ids = b.take(token_ids, "token_ids");
            b.batch.seq_starts = b.take(seq_starts, "seq_starts");
            b.batch.context_lens = b.take(context_lens, "context_lens");
            b.batch.block_tables = b.take(block_tables, "block_tables");
            b.batch.lora_slots = b.take(lora_slots, "lora_slots");
            b.batch.logits_indices = b.take(logits_indices, "logits_indices");
            std::vector<const LoraAdapter*> slots;
            for (const auto& a : adapters) slots.push_back(a.get());
            const int64_t n_out =
                b.batch.logits_indices.dim() == 1 ? b.batch.logits_indices.size(0) : 0;
            py::array_t<float> logits({n_out, model.config().vocab_size});
            const Tensor out(logits.mutable_data(), DType::kFloat32,
                             {n_out, model.config().vocab_size});
            {
              py::gil_scoped_release release;
              model.forward(b.batch, cache, slots, out);
            }
            return logits;
          },
          py::arg("token_ids"), py::arg("seq_starts"), py::arg("context_lens"),
          py::arg("block_tables"), py::arg("lora_slots"), py::arg("logits_indices"),
          py::arg("kv_cache"), py::arg("adapters"),
          "Run one packed batch; returns logits [len(logits_indices), vocab] float32.");
}

}  // namespace lorart::bindings

#include <pybind11/stl.h>

#include <memory>
#include <string>
#include <vector>

#include "bindings/array_interop.h"
#include "bindings/bindings.h"
#include "core/buffer.h"
#include "core/checked_math.h"
#include "core/errors.h"
#include "executor/executor_config.h"
#include "kernels/ops.h"
#include "lora/lora_validation.h"
#include "model/dora.h"
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

// A Python integer (int, numpy integer: anything with __index__) as int64. pybind11's own caster
// answers 2**70 with TypeError ("incompatible function arguments"); a size out of range is a
// ValueError, and the C++ range check that follows names the field's own limit.
int64_t int64_arg(py::handle value, const char* name) {
  if (PyBool_Check(value.ptr()) || !PyIndex_Check(value.ptr())) {
    throw py::type_error(std::string(name) + " must be an integer, got " +
                         std::string(py::str(py::type::of(value).attr("__name__"))));
  }
  const auto index = py::reinterpret_steal<py::object>(PyNumber_Index(value.ptr()));
  if (!index) throw py::error_already_set();
  int overflow = 0;
  const long long out = PyLong_AsLongLongAndOverflow(index.ptr(), &overflow);
  if (overflow != 0) {
    raise<InvalidArgument>(name, " = ", std::string(py::str(index)),
                           " is out of the int64 range (limit ", kInt64Max, ")");
  }
  return out;
}

}  // namespace

void bind_model(py::module_& m) {
  m.def("host_memory_limit", &host_memory_limit,
        "The most bytes one host allocation of the core may take: physical memory, or the "
        "cgroup's memory limit when lower. Larger sizes raise ValueError before allocating.");
  m.def("set_num_threads", &ops::set_cpu_threads, py::arg("threads"),
        "OpenMP threads of the CPU kernels, for the calling thread (the executor sets its own).");
  m.def("get_num_threads", &ops::cpu_threads);

  py::class_<ModelWeightsBuilder>(
      m, "ModelWeightsBuilder",
      "Collects HF-named checkpoint tensors into weights of one storage dtype (float32, float16 "
      "or bfloat16): tensors of that dtype are copied as they are, others converted.")
      .def(py::init([](const ModelConfig& config, const std::string& dtype) {
             return std::make_unique<ModelWeightsBuilder>(config, dtype_from_name(dtype, "dtype"));
           }),
           py::arg("config"), py::arg("dtype") = "float32")
      .def_property_readonly(
          "dtype", [](const ModelWeightsBuilder& b) { return std::string(dtype_name(b.dtype())); })
      .def(
          "destination",
          [](py::object self, const std::string& name) {
            const Tensor t = self.cast<ModelWeightsBuilder&>().destination(name);
            // Raw bytes of the tensor's place, kept alive by the builder (the array's base).
            return py::array(py::dtype("uint8"), {static_cast<py::ssize_t>(t.nbytes())},
                             {py::ssize_t{1}}, static_cast<uint8_t*>(t.data()), self);
          },
          py::arg("name"),
          "The bytes tensor `name` occupies in the storage dtype (a writable uint8 array), for a "
          "loader that reads the checkpoint straight into it; counts the tensor as added.")
      .def(
          "add",
          [](ModelWeightsBuilder& b, const std::string& name, py::handle array) {
            BorrowedTensor t = borrow_array(array, name.c_str(), DType::kFloat32);
            py::gil_scoped_release release;
            b.add(name, t.tensor);
          },
          py::arg("name"), py::arg("array"))
      .def("missing", &ModelWeightsBuilder::missing)
      .def_property_readonly("allocated_bytes", &ModelWeightsBuilder::allocated_bytes,
                             "Bytes of weight buffers allocated so far: only those that added "
                             "tensors fill (nothing is allocated ahead of the checkpoint).");

  py::class_<KvCache>(m, "KvCache",
                      "Paged KV pool [layers, 2, blocks, block_size, kv_heads, hd] in `dtype` "
                      "(\"float32\", \"float16\" or \"bfloat16\") on `device`.")
      .def(py::init([](const ModelConfig& config, py::handle num_blocks, py::handle block_size,
                       const std::string& dtype, const std::string& device) {
             return std::make_unique<KvCache>(config, int64_arg(num_blocks, "num_kv_blocks"),
                                              int64_arg(block_size, "block_size"),
                                              parse_device(device, "device"),
                                              dtype_from_name(dtype));
           }),
           py::arg("config"), py::arg("num_blocks"), py::arg("block_size") = 16,
           py::arg("dtype") = "float32", py::arg("device") = "cpu")
      .def_property_readonly("device", [](const KvCache& c) { return c.device().str(); })
      .def_property_readonly("num_blocks", &KvCache::num_blocks)
      .def_property_readonly("block_size", &KvCache::block_size)
      .def_property_readonly("nbytes", &KvCache::nbytes)
      .def_property_readonly("dtype", [](const KvCache& c) { return dtype_name(c.dtype()); })
      .def_static(
          "bytes_per_token",
          [](const ModelConfig& config, const std::string& dtype) {
            return KvCache::bytes_per_token(config, dtype_from_name(dtype));
          },
          py::arg("config"), py::arg("dtype") = "float32")
      .def_static(
          "checked_bytes",
          [](const ModelConfig& config, py::handle num_blocks, py::handle block_size,
             const std::string& dtype) {
            return KvCache::checked_bytes(config, int64_arg(num_blocks, "num_kv_blocks"),
                                          int64_arg(block_size, "block_size"), Device::cpu(),
                                          dtype_from_name(dtype));
          },
          py::arg("config"), py::arg("num_blocks"), py::arg("block_size") = 16,
          py::arg("dtype") = "float32",
          "Bytes such a pool takes; raises ValueError naming the field and the limit where the "
          "constructor would, without allocating.");

  py::class_<LoraAdapter, std::shared_ptr<LoraAdapter>>(
      m, "LoraAdapter",
      "A validated adapter laid out for the forward, in its own storage dtype (float32, float16 "
      "or bfloat16; widened to float32 as the kernels read it).")
      .def(py::init([](const LoraWeights& weights, const LoraConfig& config,
                       const ModelConfig& model_config, py::handle max_lora_rank,
                       std::shared_ptr<LlamaModel> model) {
             const int64_t rank = int64_arg(max_lora_rank, "max_lora_rank");
             validate_lora(&weights, &config, model_config.lora_target(), LoraLimits{rank, {}});
             std::vector<float> scales;
             if (model != nullptr) {
               if (!(LoraAdapter::shape_of(model->config()) ==
                     LoraAdapter::shape_of(model_config))) {
                 raise<InvalidArgument>("model is not of model_config's shape");
               }
               scales = dora_scales(ExecContext::cpu(0), model->weights(), weights, config);
             }
             // Validated above: laid out without checking the rows a second time.
             return std::make_shared<LoraAdapter>(LoraAdapter::from_validated(
                 weights, config, model_config, model != nullptr ? &scales : nullptr));
           }),
           py::arg("weights"), py::arg("config"), py::arg("model_config"),
           py::arg("max_lora_rank") = 64, py::arg("model") = py::none(),
           "`model` (the LlamaModel it will run on) is needed for DoRA rows: their row norms are "
           "taken against its weights.")
      .def_property_readonly("vocab_size", &LoraAdapter::vocab_size,
                             "Its own vocabulary (rows of its embed_tokens / lm_head); 0 when it "
                             "keeps the model's.")
      .def_property_readonly("max_rank", &LoraAdapter::max_rank)
      .def_property_readonly(
          "dtype", [](const LoraAdapter& a) { return std::string(dtype_name(a.dtype())); })
      .def_property_readonly("nbytes", &LoraAdapter::nbytes,
                             "Bytes it holds: rank * (in + out) values per adapted module; this "
                             "is what it costs on the LoRA cache's device level.");

  py::class_<LlamaModel, std::shared_ptr<LlamaModel>>(
      m, "LlamaModel", "Llama-family forward over a packed, paged batch.")
      .def(py::init([](const ModelConfig& config, ModelWeightsBuilder& builder,
                       py::handle max_num_tokens, py::handle max_lora_rank,
                       const std::string& device_name) {
             const int64_t tokens = int64_arg(max_num_tokens, "max_num_tokens");
             const int64_t rank = int64_arg(max_lora_rank, "max_lora_rank");
             const Device device = parse_device(device_name, "device");
             require_device(device);
             LlamaModel::workspace_bytes(config, tokens, rank, device);  // before the weights
             py::gil_scoped_release release;  // the upload to a GPU takes a while
             return std::make_shared<LlamaModel>(config, ModelWeights(std::move(builder), device),
                                                 tokens, rank);
           }),
           py::arg("config"), py::arg("weights"), py::arg("max_num_tokens") = 2048,
           py::arg("max_lora_rank") = 64, py::arg("device") = "cpu",
           "`device`: 'cpu', 'cuda' or 'cuda:N'; the weights are uploaded there once (DeviceError "
           "when this build has no CUDA backend or the machine no such GPU).")
      .def_property_readonly("device", [](const LlamaModel& model) { return model.device().str(); })
      .def_static(
          "workspace_bytes",
          [](const ModelConfig& config, py::handle max_num_tokens, py::handle max_lora_rank) {
            return LlamaModel::workspace_bytes(config, int64_arg(max_num_tokens, "max_num_tokens"),
                                               int64_arg(max_lora_rank, "max_lora_rank"));
          },
          py::arg("config"), py::arg("max_num_tokens") = 2048, py::arg("max_lora_rank") = 64,
          "Bytes of the workspace such a model allocates; raises ValueError naming the field and "
          "the limit where the constructor would, without allocating.")
      // A copy: a reference would let Python edit the sizes the forward's checks rely on.
      .def_property_readonly("config", [](const LlamaModel& model) { return model.config(); })
      .def_property_readonly("max_num_tokens", &LlamaModel::max_num_tokens)
      .def_property_readonly("max_lora_rank", &LlamaModel::max_lora_rank)
      .def_property_readonly("weight_bytes", &LlamaModel::weight_bytes)
      .def_property_readonly(
          "weight_dtype",
          [](const LlamaModel& model) { return std::string(dtype_name(model.weight_dtype())); })
      .def(
          "forward",
          [](LlamaModel& model, py::handle token_ids, py::handle positions, py::handle seq_starts,
             py::handle context_lens, py::handle block_tables, py::handle lora_slots,
             py::handle logits_indices, KvCache& cache,
             const std::vector<std::shared_ptr<LoraAdapter>>& adapters,
             const std::string& precision) {
            const ExecContext ctx{model.device(), nullptr, 0,
                                  precision_from_name(precision, "precision")};
            BorrowedBatch b;
            b.batch.token_ids = b.take(token_ids, "token_ids");
            b.batch.positions = b.take(positions, "positions");
            b.batch.seq_starts = b.take(seq_starts, "seq_starts");
            b.batch.context_lens = b.take(context_lens, "context_lens");
            b.batch.block_tables = b.take(block_tables, "block_tables");
            b.batch.lora_slots = b.take(lora_slots, "lora_slots");
            b.batch.logits_indices = b.take(logits_indices, "logits_indices");
            LoraTable table(model.config());
            for (const auto& a : adapters) {
              if (a == nullptr) raise<InvalidArgument>("adapters must not hold None");
              table.add(*a);
            }
            model.validate(b.batch, cache, table);  // before the logits are allocated
            const int64_t n_out = b.batch.logits_indices.size(0);
            const int64_t width = model.logits_width(table);
            py::array_t<float> logits({n_out, width});
            const Tensor out(logits.mutable_data(), DType::kFloat32, {n_out, width});
            {
              py::gil_scoped_release release;
              if (model.device().is_cpu()) {
                model.forward(ctx, b.batch, cache, table, out);
              } else {  // on the default stream, then back (the synchronous copy waits for it)
                const Buffer on_device =
                    Buffer::allocate(out.nbytes(), model.device(), "the forward's logits");
                model.forward(
                    ctx, b.batch, cache, table,
                    Tensor(on_device.data(), DType::kFloat32, {n_out, width}, model.device()));
                copy_bytes(out.data(), Device::cpu(), on_device.data(), model.device(),
                           out.nbytes());
              }
            }
            return logits;
          },
          py::arg("token_ids"), py::arg("positions"), py::arg("seq_starts"),
          py::arg("context_lens"), py::arg("block_tables"), py::arg("lora_slots"),
          py::arg("logits_indices"), py::arg("kv_cache"), py::arg("adapters"),
          py::arg("precision") = "float32",
          "Run one packed batch at `precision` ('float32' exact, or 'bfloat16'); returns logits "
          "[len(logits_indices), W] float32, W the widest vocabulary of the adapters (the "
          "model's or an adapter's own); a row's columns past its vocabulary are -inf.");
}

}  // namespace lorart::bindings

#include <pybind11/stl.h>

#include <optional>
#include <string>

#include "bindings/array_interop.h"
#include "bindings/bindings.h"
#include "core/buffer.h"
#include "core/errors.h"
#include "lora/lora_tensors.h"
#include "lora/lora_validation.h"
#include "lora/module_ids.h"
#include "model/model_config.h"

namespace lorart::bindings {

namespace {

// Adapters live in host memory (the host level of the LoRA cache); device tensors are copied.
BorrowedTensor on_host(BorrowedTensor b) {
  if (b.tensor.device().is_cpu()) return b;
  if (!b.tensor.is_contiguous()) raise<InvalidArgument>("device tensor must be contiguous");
  auto buffer = std::make_shared<Buffer>(Buffer::copy_of(b.tensor, Device::cpu()));
  std::array<int64_t, Tensor::kMaxDims> shape{}, strides{};
  for (int i = 0; i < b.tensor.dim(); ++i) shape[i] = b.tensor.size(i);
  int64_t s = 1;
  for (int i = b.tensor.dim() - 1; i >= 0; --i) {
    strides[i] = s;
    s *= shape[i];
  }
  return {Tensor(buffer->data(), b.tensor.dtype(), b.tensor.dim(), shape.data(), strides.data()),
          buffer};
}

py::tuple shape_tuple(const Tensor& t) {
  py::tuple out(t.dim());
  for (int i = 0; i < t.dim(); ++i) out[i] = t.size(i);
  return out;
}

}  // namespace

void bind_lora(py::module_& m) {
  m.def(
      "lora_modules",
      [] {
        py::list out;
        for (const LoraModuleInfo& info : lora_module_table()) {
          out.append(py::make_tuple(info.id, info.name, info.hf_name, tp_split_name(info.tp_split),
                                    info.description));
        }
        return out;
      },
      "The module-id table: [(id, name, hf_name, tp_split, description)] for all 18 ids.");

  py::class_<LoraConfig>(m, "LoraConfig",
                         "[rows, 3] int32: [module_id, layer_idx, adapter_size] per row. "
                         "Accepts numpy arrays, torch tensors (DLPack) or nested lists, 2-D or "
                         "TensorRT-LLM's 3-D [1, rows, 3]; wraps the array without a copy.")
      .def(py::init([](py::handle array) {
             BorrowedTensor b = on_host(borrow_array(array, "lora_config", DType::kInt32));
             return LoraConfig(b.tensor, b.owner);
           }),
           py::arg("array"))
      .def(
          "numpy",
          [](py::object self) { return numpy_view(self.cast<const LoraConfig&>().tensor(), self); },
          "Read-only numpy view [rows, 3] (no copy).")
      .def_property_readonly("shape", [](const LoraConfig& c) { return shape_tuple(c.tensor()); })
      .def_property_readonly("num_rows", &LoraConfig::num_rows)
      .def("__len__", &LoraConfig::num_rows)
      .def("__repr__", [](const LoraConfig& c) {
        return "LoraConfig(shape=" + c.tensor().shape_str() + ", dtype=int32)";
      });

  py::class_<LoraWeights>(m, "LoraWeights",
                          "[rows, max_row] float32/float16/bfloat16: row i = flatten(A_i) ++ "
                          "flatten(B_i) ++ zero padding, scaling folded into B. Accepts numpy "
                          "arrays, torch tensors (DLPack) or nested lists, 2-D or 3-D [1, rows, "
                          "max_row]; wraps the array without a copy.")
      .def(py::init([](py::handle array) {
             BorrowedTensor b = on_host(borrow_array(array, "lora_weights", DType::kFloat32));
             return LoraWeights(b.tensor, b.owner);
           }),
           py::arg("array"))
      .def(
          "numpy",
          [](py::object self) {
            return numpy_view(self.cast<const LoraWeights&>().tensor(), self);
          },
          "Read-only numpy view [rows, max_row] (no copy; bfloat16 as ml_dtypes.bfloat16).")
      .def_property_readonly("shape", [](const LoraWeights& w) { return shape_tuple(w.tensor()); })
      .def_property_readonly(
          "dtype", [](const LoraWeights& w) { return std::string(dtype_name(w.dtype())); })
      .def_property_readonly("num_rows", &LoraWeights::num_rows)
      .def_property_readonly("nbytes", &LoraWeights::nbytes)
      .def(
          "to",
          [](const LoraWeights& w, const std::string& dtype) {
            return w.to(dtype_from_name(dtype, "dtype"));
          },
          py::arg("dtype"), "An owning copy converted to dtype (round-to-nearest-even).")
      .def("__len__", &LoraWeights::num_rows)
      .def("__repr__", [](const LoraWeights& w) {
        return "LoraWeights(shape=" + w.tensor().shape_str() + ", dtype=" + dtype_name(w.dtype()) +
               ")";
      });

  m.def(
      "validate_lora",
      [](const LoraWeights* weights, const LoraConfig* config, const ModelConfig& model,
         int64_t max_lora_rank, std::optional<std::string> dtype) {
        LoraLimits limits;
        limits.max_lora_rank = max_lora_rank;
        if (dtype) limits.dtype = dtype_from_name(*dtype, "dtype");
        validate_lora(weights, config, model.lora_target(), limits);
      },
      py::arg("weights").none(true), py::arg("config").none(true), py::arg("model_config"),
      py::arg("max_lora_rank") = 64, py::arg("dtype") = py::none(),
      "Raise lorart.LoraError for the first rule the adapter breaks (see DESIGN.md).");
}

}  // namespace lorart::bindings

#include <pybind11/stl.h>

#include <array>
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
                         "[rows, 3] int32: [module_id, layer_idx, adapter_size] per row, or "
                         "[rows, 4] with TensorRT-LLM's is_dora column (0 or 1). Accepts numpy "
                         "arrays, torch tensors (DLPack) or nested lists, 2-D or TensorRT-LLM's "
                         "3-D [1, rows, 3 or 4]; wraps the array without a copy.")
      .def(py::init([](py::handle array) {
             BorrowedTensor b = on_host(borrow_array(array, "lora_config", DType::kInt32));
             return LoraConfig(b.tensor, b.owner);
           }),
           py::arg("array"))
      .def(
          "numpy",
          [](py::object self) { return numpy_view(self.cast<const LoraConfig&>().tensor(), self); },
          "Read-only numpy view [rows, 3 or 4] (no copy).")
      .def_property_readonly("num_columns", &LoraConfig::num_columns)
      .def_property_readonly("shape", [](const LoraConfig& c) { return shape_tuple(c.tensor()); })
      .def_property_readonly("num_rows", &LoraConfig::num_rows)
      .def("__len__", &LoraConfig::num_rows)
      .def("__repr__", [](const LoraConfig& c) {
        return "LoraConfig(shape=" + c.tensor().shape_str() + ", dtype=int32)";
      });

  py::class_<LoraEmbeddings, std::shared_ptr<LoraEmbeddings>> embeddings_class(
      m, "LoraEmbeddings",
      "An adapter's embedding-side parts, each optional: embed_tokens [V, H] and lm_head [V, H] "
      "(PEFT modules_to_save: replacement tables, V may exceed the base vocabulary), "
      "embed_lora_a [r, V] and embed_lora_b [H, r] (LoRA on embed_tokens), lm_head_lora_a "
      "[r, H] and lm_head_lora_b [V, r] (LoRA on lm_head); B parts carry the scaling. "
      "float32, float16 or bfloat16 arrays, wrapped without a copy; the same array given as "
      "embed_tokens and lm_head keeps them tied (stored once). Attach it to LoraWeights.");
  embeddings_class
      .def(py::init([](py::object embed_tokens, py::object lm_head, py::object embed_lora_a,
                       py::object embed_lora_b, py::object lm_head_lora_a,
                       py::object lm_head_lora_b) {
             std::array<LoraEmbeddings::Input, LoraEmbeddings::kNumParts> parts;
             const std::array<py::object, LoraEmbeddings::kNumParts> given = {
                 embed_tokens, lm_head, embed_lora_a, embed_lora_b, lm_head_lora_a, lm_head_lora_b};
             for (int p = 0; p < LoraEmbeddings::kNumParts; ++p) {
               if (given[p].is_none()) continue;
               if (p == LoraEmbeddings::kLmHead && given[p].is(embed_tokens)) {
                 parts[p] = parts[LoraEmbeddings::kEmbedTokens];  // kept tied: one array
                 continue;
               }
               BorrowedTensor b =
                   on_host(borrow_array(given[p], LoraEmbeddings::part_name(p), DType::kFloat32));
               parts[p] = {b.tensor, b.owner};
             }
             return std::make_shared<LoraEmbeddings>(parts);
           }),
           py::kw_only(), py::arg("embed_tokens") = py::none(), py::arg("lm_head") = py::none(),
           py::arg("embed_lora_a") = py::none(), py::arg("embed_lora_b") = py::none(),
           py::arg("lm_head_lora_a") = py::none(), py::arg("lm_head_lora_b") = py::none())
      .def_property_readonly(
          "vocab_size",
          [](const LoraEmbeddings& e) -> py::object {
            return e.vocab_size() > 0 ? py::int_(e.vocab_size()) : py::object(py::none());
          },
          "Rows of embed_tokens / lm_head (the adapter's vocabulary), None when it keeps the "
          "model's.")
      .def_property_readonly("nbytes", &LoraEmbeddings::nbytes)
      .def_property_readonly("lm_head_is_embed_tokens", &LoraEmbeddings::lm_head_is_embed_tokens)
      .def("__repr__", [](const LoraEmbeddings& e) {
        std::string out = "LoraEmbeddings(";
        bool first = true;
        for (int p = 0; p < LoraEmbeddings::kNumParts; ++p) {
          if (!e.has(p)) continue;
          out += std::string(first ? "" : ", ") + LoraEmbeddings::part_name(p) + "=" +
                 e.part(p).shape_str() + " " + dtype_name(e.part(p).dtype());
          first = false;
        }
        return out + ")";
      });
  for (int p = 0; p < LoraEmbeddings::kNumParts; ++p) {
    embeddings_class.def_property_readonly(
        LoraEmbeddings::part_name(p),
        [p](py::object self) -> py::object {
          const auto& e = self.cast<const LoraEmbeddings&>();
          if (!e.has(p)) return py::none();
          return numpy_view(e.part(p), self);
        },
        "Read-only numpy view (no copy), or None.");
  }

  py::class_<LoraWeights>(m, "LoraWeights",
                          "[rows, max_row] float32/float16/bfloat16: row i = flatten(A_i) ++ "
                          "flatten(B_i) ++ zero padding, scaling folded into B. Accepts numpy "
                          "arrays, torch tensors (DLPack) or nested lists, 2-D or 3-D [1, rows, "
                          "max_row]; wraps the array without a copy. A DoRA row (is_dora = 1 in "
                          "LoraConfig) appends its magnitude [Ho]. `embeddings` "
                          "(LoraEmbeddings) are the adapter's embedding-side parts; with them "
                          "the rows may be empty ([0, 0]).")
      .def(py::init([](py::handle array, std::shared_ptr<LoraEmbeddings> embeddings) {
             BorrowedTensor b = on_host(borrow_array(array, "lora_weights", DType::kFloat32));
             return LoraWeights(b.tensor, b.owner, std::move(embeddings));
           }),
           py::arg("array"), py::arg("embeddings") = py::none())
      .def_property_readonly(
          "embeddings",
          [](const LoraWeights& w) {
            return std::const_pointer_cast<LoraEmbeddings>(w.shared_embeddings());
          },
          "The embedding-side parts (LoraEmbeddings), or None.")
      .def(
          "numpy",
          [](py::object self) {
            return numpy_view(self.cast<const LoraWeights&>().tensor(), self);
          },
          "Read-only numpy view [rows, max_row] of the rows (no copy; bfloat16 as "
          "ml_dtypes.bfloat16).")
      .def_property_readonly("shape", [](const LoraWeights& w) { return shape_tuple(w.tensor()); })
      .def_property_readonly(
          "dtype", [](const LoraWeights& w) { return std::string(dtype_name(w.dtype())); })
      .def_property_readonly("num_rows", &LoraWeights::num_rows)
      .def_property_readonly("nbytes", &LoraWeights::nbytes,
                             "Bytes of the rows and the embedding-side parts.")
      .def(
          "to",
          [](const LoraWeights& w, const std::string& dtype) {
            return w.to(dtype_from_name(dtype, "dtype"));
          },
          py::arg("dtype"),
          "An owning copy, rows and embedding-side parts converted to dtype "
          "(round-to-nearest-even).")
      .def("__len__", &LoraWeights::num_rows)
      .def("__repr__", [](const LoraWeights& w) {
        return "LoraWeights(shape=" + w.tensor().shape_str() + ", dtype=" + dtype_name(w.dtype()) +
               (w.embeddings() != nullptr ? ", embeddings=...)" : ")");
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

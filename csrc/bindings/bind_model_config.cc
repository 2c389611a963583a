#include <pybind11/stl.h>

#include <string>

#include "bindings/bindings.h"
#include "bindings/repr.h"
#include "model/model_config.h"

namespace lorart::bindings {

namespace {

// The fields its rope_type reads.
std::string repr_rope_scaling(const RopeScaling& r) {
  std::string out = "RopeScaling(rope_type=" + repr_str(r.rope_type);
  if (r.rope_type != "default") out += ", factor=" + repr_float(r.factor);
  if (r.rope_type == "llama3") {
    out +=
        ", low_freq_factor=" + repr_float(r.low_freq_factor) +
        ", high_freq_factor=" + repr_float(r.high_freq_factor) +
        ", original_max_position_embeddings=" + std::to_string(r.original_max_position_embeddings);
  }
  return out + ")";
}

// The shape, then the optional features only where they are on.
std::string repr_model_config(const ModelConfig& c) {
  std::string out = "ModelConfig(architecture=" + repr_str(c.architecture) +
                    ", vocab_size=" + std::to_string(c.vocab_size) +
                    ", hidden_size=" + std::to_string(c.hidden_size) +
                    ", intermediate_size=" + std::to_string(c.intermediate_size) +
                    ", num_layers=" + std::to_string(c.num_layers) +
                    ", num_attention_heads=" + std::to_string(c.num_attention_heads) +
                    ", num_kv_heads=" + std::to_string(c.num_kv_heads) +
                    ", head_dim=" + std::to_string(c.head_dim) +
                    ", max_position_embeddings=" + std::to_string(c.max_position_embeddings) +
                    ", rms_norm_eps=" + repr_float(c.rms_norm_eps) +
                    ", rope_theta=" + repr_float(c.rope_theta);
  if (c.rope_scaling.rope_type != "default") {
    out += ", rope_scaling=" + repr_rope_scaling(c.rope_scaling);
  }
  if (c.tie_word_embeddings) out += ", tie_word_embeddings=True";
  if (c.attention_bias) out += ", attention_bias=True";
  if (c.sliding_window > 0) out += ", sliding_window=" + std::to_string(c.sliding_window);
  return out + ", dtype=" + repr_str(dtype_name(c.dtype)) + ")";
}

}  // namespace

void bind_model_config(py::module_& m) {
  py::class_<RopeScaling>(m, "RopeScaling", "Rotary embedding scaling (default, linear, llama3).")
      .def(py::init<>())
      .def_readwrite("rope_type", &RopeScaling::rope_type)
      .def_readwrite("factor", &RopeScaling::factor)
      .def_readwrite("low_freq_factor", &RopeScaling::low_freq_factor)
      .def_readwrite("high_freq_factor", &RopeScaling::high_freq_factor)
      .def_readwrite("original_max_position_embeddings",
                     &RopeScaling::original_max_position_embeddings)
      .def("__repr__", &repr_rope_scaling);

  py::class_<ModelConfig>(m, "ModelConfig",
                          "Shape of a Llama-family model; see lorart.hf.load_config.")
      .def(py::init<>())
      .def_readwrite("architecture", &ModelConfig::architecture)
      .def_readwrite("vocab_size", &ModelConfig::vocab_size)
      .def_readwrite("hidden_size", &ModelConfig::hidden_size)
      .def_readwrite("intermediate_size", &ModelConfig::intermediate_size)
      .def_readwrite("num_layers", &ModelConfig::num_layers)
      .def_readwrite("num_attention_heads", &ModelConfig::num_attention_heads)
      .def_readwrite("num_kv_heads", &ModelConfig::num_kv_heads)
      .def_readwrite("head_dim", &ModelConfig::head_dim)
      .def_readwrite("max_position_embeddings", &ModelConfig::max_position_embeddings)
      .def_readwrite("rms_norm_eps", &ModelConfig::rms_norm_eps)
      .def_readwrite("rope_theta", &ModelConfig::rope_theta)
      .def_readwrite("rope_scaling", &ModelConfig::rope_scaling)
      .def_readwrite("tie_word_embeddings", &ModelConfig::tie_word_embeddings)
      .def_readwrite("attention_bias", &ModelConfig::attention_bias)
      .def_readwrite("sliding_window", &ModelConfig::sliding_window)
      .def_readwrite("bos_token_id", &ModelConfig::bos_token_id)
      .def_readwrite("eos_token_ids", &ModelConfig::eos_token_ids)
      .def_property(
          "dtype", [](const ModelConfig& c) { return std::string(dtype_name(c.dtype)); },
          [](ModelConfig& c, const std::string& name) {
            c.dtype = dtype_from_name(name, "ModelConfig.dtype");
          },
          "The checkpoint's stored dtype: 'float32', 'float16' or 'bfloat16'.")
      .def_property_readonly_static(
          "supported_architectures",
          [](py::object) { return ModelConfig::supported_architectures(); })
      .def(
          "copy", [](const ModelConfig& c) { return c; }, "An independent copy.")
      .def("validate", &ModelConfig::validate,
           "Raise ValueError naming the first missing or inconsistent field.")
      .def("lora_module_ids", &ModelConfig::lora_module_ids,
           "LoRA module ids this model has, ascending.")
      .def("has_lora_module", &ModelConfig::has_lora_module, py::arg("module_id"))
      .def(
          "lora_module_dims",
          [](const ModelConfig& c, int32_t id) {
            const LoraModuleDims d = c.lora_module_dims(id);
            return py::make_tuple(d.in, d.out);
          },
          py::arg("module_id"), "(in, out) sizes of a module's LoRA pair: A [r, in], B [out, r].")
      .def("__repr__", &repr_model_config);
}

}  // namespace lorart::bindings

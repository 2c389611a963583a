#include "bindings/bindings.h"

PYBIND11_MODULE(_core, m) {
  m.doc() = "lorart core: tensors, LoRA format and validation, model configuration (C++)";
  lorart::bindings::bind_core(m);
  lorart::bindings::bind_model_config(m);
  lorart::bindings::bind_lora(m);
  lorart::bindings::bind_model(m);
  lorart::bindings::bind_executor(m);
  lorart::bindings::bind_ops(m);
}

// Registration entry points of the lorart._core module, one per binding file.
#pragma once

#include <pybind11/pybind11.h>

namespace lorart::bindings {

namespace py = pybind11;

void bind_core(py::module_& m);          // errors, build info
void bind_model_config(py::module_& m);  // ModelConfig, RopeScaling
void bind_lora(py::module_& m);          // module-id table, LoraWeights, LoraConfig, validation
void bind_model(py::module_& m);         // weights builder, KV cache, LoRA adapter, forward
void bind_executor(py::module_& m);      // request/response types, configs, Executor
void bind_ops(py::module_& m);           // lorart._core.ops: the kernel ops, tests/benchmarks only

}  // namespace lorart::bindings

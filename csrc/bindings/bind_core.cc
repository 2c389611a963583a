#include <string>

#include "bindings/bindings.h"
#include "core/buffer.h"
#include "core/cuda/device_memory.h"
#include "core/errors.h"

namespace lorart::bindings {

namespace {

PyObject* lora_error_type = nullptr;
PyObject* device_error_type = nullptr;

PyObject* new_exception_type(py::module_& m, const char* name, PyObject* base, const char* doc) {
  const std::string qualified = std::string("lorart.") + name;
  PyObject* type = PyErr_NewExceptionWithDoc(qualified.c_str(), doc, base, nullptr);
  if (type == nullptr) throw py::error_already_set();
  m.add_object(name, py::handle(type));
  return type;
}

}  // namespace

void bind_core(py::module_& m) {
  lora_error_type = new_exception_type(
      m, "LoraError", PyExc_ValueError,
      "A LoRA adapter (weights, config or task) is malformed or does not fit the model.");
  device_error_type = new_exception_type(
      m, "DeviceError", PyExc_RuntimeError,
      "A device (CUDA) was asked for that this build or machine lacks, or a device call failed.");

  // Most-derived first: LoraError is an InvalidArgument.
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const LoraError& e) {
      PyErr_SetString(lora_error_type, e.what());
    } catch (const InvalidArgument& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    } catch (const DeviceError& e) {
      PyErr_SetString(device_error_type, e.what());
    } catch (const Error& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what());
    }
  });

  m.def(
      "build_info",
      [] {
        py::dict info;
        info["cuda"] = cuda_backend_built();
#if LORART_WITH_CUDA
        info["cuda_archs"] = std::string(LORART_CUDA_ARCHS_STRING);
        info["cuda_runtime"] = cuda::runtime_version();
#endif
        info["cuda_device_count"] = cuda_device_count();
        return info;
      },
      "How this lorart._core was built: {'cuda': bool, 'cuda_archs', 'cuda_runtime', "
      "'cuda_device_count'}.");
}

}  // namespace lorart::bindings

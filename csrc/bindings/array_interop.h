// Moving arrays across the binding: numpy arrays and DLPack-capable objects (torch tensors) become
// core Tensors without a copy when dtype and layout allow; core Tensors become numpy views. Only
// the binding layer includes pybind11.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <memory>
#include <optional>

#include "core/tensor.h"

namespace lorart::bindings {

namespace py = pybind11;

struct BorrowedTensor {
  Tensor tensor;                      // view of the caller's memory (or of a converted copy)
  std::shared_ptr<const void> owner;  // keeps that memory alive; releases it under the GIL
};

// numpy array, object with __dlpack__ (torch tensor), or anything np.asarray accepts (lists:
// their values must fit `list_dtype`, which they are converted to). The result is always
// native-endian, aligned to its element size and row-major: anything else (a big-endian dtype, a
// byte offset, a strided or reversed view) is copied once with its values preserved; a CUDA
// tensor that would need such a copy is refused. Throws InvalidArgument naming `field`.
BorrowedTensor borrow_array(py::handle obj, const char* field, DType list_dtype);

// A numpy view of `t` (host memory) whose lifetime is tied to `base`.
py::array numpy_view(const Tensor& t, py::handle base);

// numpy dtype for a core dtype (bfloat16 through ml_dtypes).
py::dtype numpy_dtype(DType dtype);

}  // namespace lorart::bindings

#include "bindings/array_interop.h"

#include <array>
#include <string>

#include "bindings/dlpack_abi.h"
#include "core/errors.h"

namespace lorart::bindings {

namespace {

// Owner that drops a Python reference; the last holder may be a non-Python thread.
std::shared_ptr<const void> keep_alive(py::object obj) {
  auto* held = new py::object(std::move(obj));
  return std::shared_ptr<const void>(held, [](const void* p) {
    py::gil_scoped_acquire gil;
    delete static_cast<const py::object*>(p);
  });
}

DType dtype_of_numpy(const py::dtype& dt, const char* field) {
  const char kind = dt.kind();
  const auto size = dt.itemsize();
  if (kind == 'f' && size == 4) return DType::kFloat32;
  if (kind == 'f' && size == 2) return DType::kFloat16;
  if (kind == 'i' && size == 4) return DType::kInt32;
  if (kind == 'i' && size == 8) return DType::kInt64;
  if (size == 2 && py::str(dt.attr("name")).cast<std::string>() == "bfloat16") {
    return DType::kBFloat16;
  }
  raise<InvalidArgument>(field, " has unsupported dtype ", py::str(dt).cast<std::string>(),
                         " (supported: float32, float16, bfloat16, int32, int64)");
}

DType dtype_of_dlpack(const dlpack::DataType& dt, const char* field) {
  if (dt.lanes == 1) {
    if (dt.code == dlpack::kFloat && dt.bits == 32) return DType::kFloat32;
    if (dt.code == dlpack::kFloat && dt.bits == 16) return DType::kFloat16;
    if (dt.code == dlpack::kBfloat && dt.bits == 16) return DType::kBFloat16;
    if (dt.code == dlpack::kInt && dt.bits == 32) return DType::kInt32;
    if (dt.code == dlpack::kInt && dt.bits == 64) return DType::kInt64;
  }
  raise<InvalidArgument>(field, " has unsupported DLPack dtype (code ", int(dt.code), ", bits ",
                         int(dt.bits), ", lanes ", dt.lanes,
                         "); supported: float32, float16, bfloat16, int32, int64");
}

BorrowedTensor from_numpy(py::array arr, const char* field) {
  if (!(arr.flags() & py::array::c_style)) {
    arr = py::module_::import("numpy").attr("ascontiguousarray")(arr);
  }
  const DType dtype = dtype_of_numpy(arr.dtype(), field);
  const int ndim = static_cast<int>(arr.ndim());
  if (ndim > Tensor::kMaxDims) {
    raise<InvalidArgument>(field, " has ", ndim, " dims; at most ", Tensor::kMaxDims);
  }
  std::array<int64_t, Tensor::kMaxDims> shape{}, strides{};
  for (int i = 0; i < ndim; ++i) {
    shape[i] = arr.shape(i);
    strides[i] = arr.strides(i) / static_cast<int64_t>(dtype_size(dtype));
  }
  Tensor t(const_cast<void*>(arr.data()), dtype, ndim, shape.data(), strides.data());
  return {t, keep_alive(arr)};
}

BorrowedTensor from_dlpack(py::object obj, const char* field) {
  if (py::hasattr(obj, "is_contiguous") && !obj.attr("is_contiguous")().cast<bool>()) {
    obj = obj.attr("contiguous")();
  }
  py::object capsule = obj.attr("__dlpack__")();
  auto* managed =
      static_cast<dlpack::ManagedTensor*>(PyCapsule_GetPointer(capsule.ptr(), "dltensor"));
  if (managed == nullptr) {
    PyErr_Clear();
    raise<InvalidArgument>(field, ": __dlpack__() did not return a 'dltensor' capsule");
  }
  // We now own the managed tensor: rename the capsule so its destructor does not free it too.
  PyCapsule_SetName(capsule.ptr(), "used_dltensor");
  std::shared_ptr<const void> owner(managed, [](const void* p) {
    auto* m = static_cast<dlpack::ManagedTensor*>(const_cast<void*>(p));
    if (m->deleter != nullptr) {
      py::gil_scoped_acquire gil;
      m->deleter(m);
    }
  });
  const dlpack::TensorView& dl = managed->dl_tensor;
  const DType dtype = dtype_of_dlpack(dl.dtype, field);
  Device device = Device::cpu();
  if (dl.device.device_type == dlpack::kCuda) {
    device = Device::cuda(dl.device.device_id);
  } else if (dl.device.device_type != dlpack::kCpu && dl.device.device_type != dlpack::kCudaHost) {
    raise<InvalidArgument>(field, " lives on DLPack device type ", dl.device.device_type,
                           "; lorart accepts CPU and CUDA tensors");
  }
  if (dl.ndim > Tensor::kMaxDims) {
    raise<InvalidArgument>(field, " has ", dl.ndim, " dims; at most ", Tensor::kMaxDims);
  }
  std::array<int64_t, Tensor::kMaxDims> strides{};
  int64_t compact = 1;
  for (int i = dl.ndim - 1; i >= 0; --i) {
    strides[i] = dl.strides != nullptr ? dl.strides[i] : compact;
    compact *= dl.shape[i];
  }
  void* data = static_cast<char*>(dl.data) + dl.byte_offset;
  return {Tensor(data, dtype, dl.ndim, dl.shape, strides.data(), device), owner};
}

}  // namespace

BorrowedTensor borrow_array(py::handle obj, const char* field, DType list_dtype) {
  if (obj.is_none()) raise<InvalidArgument>(field, " is None; expected an array");
  if (py::isinstance<py::array>(obj))
    return from_numpy(py::reinterpret_borrow<py::array>(obj), field);
  if (py::hasattr(obj, "__dlpack__"))
    return from_dlpack(py::reinterpret_borrow<py::object>(obj), field);
  py::object arr = py::module_::import("numpy").attr("asarray")(obj, numpy_dtype(list_dtype));
  return from_numpy(arr.cast<py::array>(), field);
}

py::dtype numpy_dtype(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return py::dtype("float32");
    case DType::kFloat16:
      return py::dtype("float16");
    case DType::kInt32:
      return py::dtype("int32");
    case DType::kInt64:
      return py::dtype("int64");
    case DType::kBFloat16:
      return py::dtype::from_args(py::module_::import("ml_dtypes").attr("bfloat16"));
  }
  raise<InvalidArgument>("no numpy dtype for ", dtype_name(dtype));
}

py::array numpy_view(const Tensor& t, py::handle base) {
  if (!t.device().is_cpu()) {
    raise<InvalidArgument>("cannot view a ", t.device().str(), " tensor as a numpy array");
  }
  std::vector<py::ssize_t> shape, strides;
  for (int i = 0; i < t.dim(); ++i) {
    shape.push_back(t.size(i));
    strides.push_back(t.stride(i) * static_cast<py::ssize_t>(dtype_size(t.dtype())));
  }
  py::array out(numpy_dtype(t.dtype()), shape, strides, t.data(), base);
  // The core objects are immutable once built: hand out read-only views.
  py::detail::array_proxy(out.ptr())->flags &= ~py::detail::npy_api::NPY_ARRAY_WRITEABLE_;
  return out;
}

}  // namespace lorart::bindings

#include "bindings/array_interop.h"

#include <array>
#include <cstdint>
#include <cstring>
#include <string>

#include "bindings/dlpack_abi.h"
#include "core/buffer.h"
#include "core/checked_math.h"
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

// Row-major strides (elements) for `shape`.
std::array<int64_t, Tensor::kMaxDims> compact_strides(int ndim, const int64_t* shape) {
  std::array<int64_t, Tensor::kMaxDims> strides{};
  int64_t step = 1;
  for (int i = ndim - 1; i >= 0; --i) {
    strides[i] = step;
    step *= shape[i];
  }
  return strides;
}

// A copy of `shape` elements of `item` bytes fits int64 and this machine's memory (a broadcast
// view of a few bytes can stand for petabytes), else InvalidArgument naming `field`.
void check_copy_size(int ndim, const int64_t* shape, int64_t item, const char* field) {
  int64_t bytes = item;
  for (int i = 0; i < ndim; ++i) bytes = checked_mul(bytes, shape[i], field);
  check_allocation(static_cast<size_t>(bytes), Device::cpu(), field);
}

void check_ndim(int64_t ndim, const char* field) {
  if (ndim < 0 || ndim > Tensor::kMaxDims) {
    raise<InvalidArgument>(field, " has ", ndim, " dims; at most ", Tensor::kMaxDims);
  }
}

BorrowedTensor from_numpy(py::array arr, const char* field) {
  const DType dtype = dtype_of_numpy(arr.dtype(), field);
  check_ndim(arr.ndim(), field);
  // The core reads arrays in place as native, aligned, row-major memory. Anything else (a
  // big-endian dtype, a byte offset such as np.frombuffer(buf, offset=1), a strided view) is
  // copied once into a fresh array that is; the values are preserved.
  const bool native = arr.dtype().attr("isnative").cast<bool>();
  const bool aligned = (arr.flags() & py::detail::npy_api::NPY_ARRAY_ALIGNED_) != 0;
  if (!native || !aligned || !(arr.flags() & py::array::c_style)) {
    std::array<int64_t, Tensor::kMaxDims> dims{};
    for (int i = 0; i < arr.ndim(); ++i) dims[i] = arr.shape(i);
    check_copy_size(static_cast<int>(arr.ndim()), dims.data(), arr.itemsize(), field);
    arr = py::module_::import("numpy").attr("array")(
        arr, py::arg("dtype") = arr.dtype().attr("newbyteorder")("="), py::arg("order") = "C",
        py::arg("copy") = true);
  }
  const int ndim = static_cast<int>(arr.ndim());
  std::array<int64_t, Tensor::kMaxDims> shape{};
  for (int i = 0; i < ndim; ++i) shape[i] = arr.shape(i);
  // numpy leaves the strides of extent-1 dims arbitrary in a C-contiguous array: use our own.
  const auto strides = compact_strides(ndim, shape.data());
  Tensor t(const_cast<void*>(arr.data()), dtype, ndim, shape.data(), strides.data());
  return {t, keep_alive(arr)};
}

// Copies a strided host view element by element into an owning, aligned, row-major buffer.
BorrowedTensor compact_copy(const char* src, DType dtype, int ndim, const int64_t* shape,
                            const int64_t* strides, const char* field) {
  const size_t item = dtype_size(dtype);
  check_copy_size(ndim, shape, static_cast<int64_t>(item), field);
  int64_t numel = 1;
  for (int i = 0; i < ndim; ++i) numel *= shape[i];
  auto buffer = std::make_shared<Buffer>(Buffer::allocate(static_cast<size_t>(numel) * item));
  char* dst = static_cast<char*>(buffer->data());
  std::array<int64_t, Tensor::kMaxDims> index{};
  for (int64_t k = 0; k < numel; ++k) {
    int64_t offset = 0;
    for (int i = 0; i < ndim; ++i) offset += index[i] * strides[i];
    std::memcpy(dst + k * item, src + offset * static_cast<int64_t>(item), item);
    for (int i = ndim - 1; i >= 0 && ++index[i] == shape[i]; --i) index[i] = 0;
  }
  const auto compact = compact_strides(ndim, shape);
  return {Tensor(buffer->data(), dtype, ndim, shape, compact.data()), buffer};
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
  check_ndim(dl.ndim, field);
  int64_t numel = 1;
  for (int i = 0; i < dl.ndim; ++i) {
    if (dl.shape[i] < 0) raise<InvalidArgument>(field, " has a negative DLPack extent");
    numel *= dl.shape[i];
  }
  const auto compact = compact_strides(dl.ndim, dl.shape);
  bool is_compact = true;  // null strides mean row-major; extent-1 dims take any stride
  for (int i = 0; dl.strides != nullptr && numel != 0 && i < dl.ndim; ++i) {
    if (dl.shape[i] != 1 && dl.strides[i] != compact[i]) is_compact = false;
  }
  char* data = static_cast<char*>(dl.data) + dl.byte_offset;
  const bool aligned = reinterpret_cast<uintptr_t>(data) % dtype_size(dtype) == 0;
  if (is_compact && aligned) {
    return {Tensor(data, dtype, dl.ndim, dl.shape, compact.data(), device), owner};
  }
  if (!device.is_cpu()) {
    raise<InvalidArgument>(field, " is a ", device.str(), " tensor with ",
                           aligned ? "non-row-major strides" : "a misaligned data pointer",
                           "; pass a contiguous copy (.contiguous() / .clone())");
  }
  // Another producer's strided view (or a misaligned one, e.g. torch.frombuffer at a byte
  // offset): one compact, aligned copy.
  return compact_copy(data, dtype, dl.ndim, dl.shape,
                      dl.strides != nullptr ? dl.strides : compact.data(), field);
}

// Lists and other array-likes: numpy infers the element type, then values are checked against
// `target` before the cast (np.asarray(x, dtype=int32) would truncate 1.5 and wrap 2**40).
py::array from_array_like(py::handle obj, const char* field, DType target) {
  py::module_ np = py::module_::import("numpy");
  py::array arr;
  try {
    arr = np.attr("asarray")(obj).cast<py::array>();
  } catch (py::error_already_set& e) {
    raise<InvalidArgument>(field, ": cannot read ", py::str(py::type::of(obj)).cast<std::string>(),
                           " as an array (", e.what(), ")");
  }
  const char kind = arr.dtype().kind();
  const bool integral = target == DType::kInt32 || target == DType::kInt64;
  const bool empty = arr.size() == 0;
  if (integral && !empty && kind != 'i' && kind != 'u') {
    raise<InvalidArgument>(field, " must hold integers, got values of dtype ",
                           py::str(arr.dtype()).cast<std::string>());
  }
  if (!integral && !empty && kind != 'i' && kind != 'u' && kind != 'f') {
    raise<InvalidArgument>(field, " must hold numbers, got values of dtype ",
                           py::str(arr.dtype()).cast<std::string>());
  }
  if (integral && !empty) {
    py::object info = np.attr("iinfo")(numpy_dtype(target));
    py::object lo = arr.attr("min")(), hi = arr.attr("max")();
    if (lo < info.attr("min") || hi > info.attr("max")) {
      raise<InvalidArgument>(field, " holds ",
                             py::str(lo < info.attr("min") ? lo : hi).cast<std::string>(),
                             ", outside ", dtype_name(target));
    }
  }
  return arr.attr("astype")(numpy_dtype(target));
}

}  // namespace

BorrowedTensor borrow_array(py::handle obj, const char* field, DType list_dtype) {
  if (obj.is_none()) raise<InvalidArgument>(field, " is None; expected an array");
  if (py::isinstance<py::array>(obj))
    return from_numpy(py::reinterpret_borrow<py::array>(obj), field);
  if (py::hasattr(obj, "__dlpack__"))
    return from_dlpack(py::reinterpret_borrow<py::object>(obj), field);
  return from_numpy(from_array_like(obj, field, list_dtype), field);
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

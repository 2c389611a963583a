#include "core/tensor.h"

#include <sstream>

#include "core/checked_math.h"
#include "core/errors.h"

namespace lorart {

namespace {

void check_ndim(int ndim) {
  if (ndim < 0 || ndim > Tensor::kMaxDims) {
    raise<InvalidArgument>("tensor rank must be in [0, ", Tensor::kMaxDims, "], got ", ndim);
  }
}

}  // namespace

Tensor::Tensor(void* data, DType dtype, std::initializer_list<int64_t> shape, Device device)
    : data_(data), dtype_(dtype), device_(device), ndim_(static_cast<int>(shape.size())) {
  check_ndim(ndim_);
  int axis = 0;
  for (int64_t extent : shape) {
    if (extent < 0) raise<InvalidArgument>("tensor extent must be >= 0, got ", extent);
    shape_[axis++] = extent;
  }
  check_nbytes();
  int64_t stride = 1;
  for (int i = ndim_ - 1; i >= 0; --i) {
    strides_[i] = stride;
    stride *= shape_[i];
  }
}

Tensor::Tensor(void* data, DType dtype, int ndim, const int64_t* shape, const int64_t* strides,
               Device device)
    : data_(data), dtype_(dtype), device_(device), ndim_(ndim) {
  check_ndim(ndim);
  for (int i = 0; i < ndim; ++i) {
    if (shape[i] < 0) raise<InvalidArgument>("tensor extent must be >= 0, got ", shape[i]);
    shape_[i] = shape[i];
    strides_[i] = strides[i];
  }
  check_nbytes();
}

void Tensor::check_nbytes() const {
  int64_t n = static_cast<int64_t>(dtype_size(dtype_));
  bool overflow = false;
  for (int i = 0; i < ndim_; ++i) {
    if (shape_[i] == 0) return;
    overflow = __builtin_mul_overflow(n, shape_[i], &n) || overflow;
  }
  if (overflow) {
    raise<InvalidArgument>("tensor ", describe(), " would hold more than ", kInt64Max, " bytes");
  }
}

int64_t Tensor::size(int axis) const {
  const int a = axis < 0 ? axis + ndim_ : axis;
  if (a < 0 || a >= ndim_) raise<InvalidArgument>("axis ", axis, " out of range for ", describe());
  return shape_[a];
}

int64_t Tensor::stride(int axis) const {
  const int a = axis < 0 ? axis + ndim_ : axis;
  if (a < 0 || a >= ndim_) raise<InvalidArgument>("axis ", axis, " out of range for ", describe());
  return strides_[a];
}

int64_t Tensor::numel() const {
  int64_t n = 1;
  for (int i = 0; i < ndim_; ++i) n *= shape_[i];
  return n;
}

bool Tensor::is_contiguous() const {
  int64_t expected = 1;
  for (int i = ndim_ - 1; i >= 0; --i) {
    // Extents of 1 (and empty tensors) place no constraint on the stride.
    if (shape_[i] != 1 && strides_[i] != expected) return numel() == 0;
    expected *= shape_[i];
  }
  return true;
}

Tensor Tensor::reshape(std::initializer_list<int64_t> shape) const {
  if (!is_contiguous())
    raise<InvalidArgument>("reshape needs a contiguous tensor, got ", describe());
  Tensor out(data_, dtype_, shape, device_);
  if (out.numel() != numel()) {
    raise<InvalidArgument>("cannot reshape ", describe(), " to ", out.shape_str(), ": ", numel(),
                           " elements vs ", out.numel());
  }
  return out;
}

Tensor Tensor::slice_rows(int64_t begin, int64_t end) const {
  if (ndim_ < 1 || begin < 0 || end < begin || end > shape_[0]) {
    raise<InvalidArgument>("slice_rows [", begin, ", ", end, ") out of range for ", describe());
  }
  Tensor out = *this;
  out.data_ = static_cast<char*>(data_) + begin * strides_[0] * dtype_size(dtype_);
  out.shape_[0] = end - begin;
  return out;
}

std::string Tensor::shape_str() const {
  std::ostringstream s;
  s << "[";
  for (int i = 0; i < ndim_; ++i) s << (i ? ", " : "") << shape_[i];
  s << "]";
  return s.str();
}

std::string Tensor::describe() const {
  return shape_str() + " " + dtype_name(dtype_) + " " + device_.str();
}

}  // namespace lorart

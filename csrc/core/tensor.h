// Tensor: a non-owning view of memory (data pointer, dtype, device, shape, strides in elements).
// It never allocates, so kernels and the per-step path can pass it by value. Whoever creates a
// Tensor keeps the memory alive (a Buffer, a Python array held by the binding layer, ...).
#pragma once

#include <array>
#include <cstdint>
#include <initializer_list>
#include <string>

#include "core/device.h"
#include "core/dtype.h"

namespace lorart {

class Tensor {
 public:
  static constexpr int kMaxDims = 6;

  Tensor() = default;
  // Contiguous (row-major) view. Extents must be >= 0 and hold at most INT64_MAX bytes in all.
  Tensor(void* data, DType dtype, std::initializer_list<int64_t> shape,
         Device device = Device::cpu());
  // General strided view; `shape` and `strides` (elements) have `ndim` entries.
  Tensor(void* data, DType dtype, int ndim, const int64_t* shape, const int64_t* strides,
         Device device = Device::cpu());

  void* data() const { return data_; }
  template <class T>
  T* data_as() const {
    return static_cast<T*>(data_);
  }
  DType dtype() const { return dtype_; }
  Device device() const { return device_; }
  int dim() const { return ndim_; }
  int64_t size(int axis) const;  // negative axis counts from the end
  int64_t stride(int axis) const;
  int64_t numel() const;
  size_t nbytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype_); }
  bool is_contiguous() const;
  bool defined() const { return data_ != nullptr || numel() == 0; }

  // Same memory, new contiguous shape with the same number of elements (contiguous views only).
  Tensor reshape(std::initializer_list<int64_t> shape) const;
  // Rows [begin, end) of axis 0.
  Tensor slice_rows(int64_t begin, int64_t end) const;

  // "[2, 3] float32 cpu", for error messages.
  std::string describe() const;
  std::string shape_str() const;

 private:
  // numel() and nbytes() must not wrap (Buffer::view compares them with its size): throws
  // InvalidArgument for a shape of more than INT64_MAX bytes.
  void check_nbytes() const;

  void* data_ = nullptr;
  DType dtype_ = DType::kFloat32;
  Device device_ = Device::cpu();
  int ndim_ = 0;
  std::array<int64_t, kMaxDims> shape_{};
  std::array<int64_t, kMaxDims> strides_{};
};

}  // namespace lorart

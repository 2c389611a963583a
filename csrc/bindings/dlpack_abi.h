// The DLPack exchange ABI (data layout of the `dltensor` capsule, DLPack v0.x "unversioned" form),
// declared here from the public specification so the binding layer can read torch tensors without
// linking anything. Only the fields lorart reads are named; layout must match the spec exactly.
#pragma once

#include <cstdint>

namespace lorart::bindings::dlpack {

enum DeviceCode : int32_t { kCpu = 1, kCuda = 2, kCudaHost = 3 };
enum TypeCode : uint8_t { kInt = 0, kUInt = 1, kFloat = 2, kBfloat = 4 };

struct Device {
  int32_t device_type;
  int32_t device_id;
};

struct DataType {
  uint8_t code;
  uint8_t bits;
  uint16_t lanes;
};

struct TensorView {
  void* data;
  Device device;
  int32_t ndim;
  DataType dtype;
  int64_t* shape;
  int64_t* strides;  // in elements; null means compact row-major
  uint64_t byte_offset;
};

struct ManagedTensor {
  TensorView dl_tensor;
  void* manager_ctx;
  void (*deleter)(ManagedTensor* self);
};

}  // namespace lorart::bindings::dlpack

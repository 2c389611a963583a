// DeviceGuard: makes a CUDA device current for a scope and restores the caller's device after,
// so a wrapper that allocates, copies or creates a stream on device N never moves the calling
// thread to N. For the .cu files of core/cuda/ only.
#pragma once

#include <cuda_runtime.h>

#include "core/cuda/cuda_check.h"

namespace lorart::cuda {

class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) check(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() { cudaSetDevice(previous_); }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

}  // namespace lorart::cuda

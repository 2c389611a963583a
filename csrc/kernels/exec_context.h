// ExecContext: where and how an op runs. Every op entry point (kernels/ops.h) takes one; the
// ModelRunner owns the context of its forward passes. On the CPU it names the thread pool (the
// OpenMP team of the calling thread, `num_threads` wide); on CUDA it will carry the stream.
#pragma once

#include "core/device.h"
#include "core/dtype.h"

namespace lorart {

struct ExecContext {
  Device device = Device::cpu();
  void* stream = nullptr;  // cudaStream_t of a CUDA context; unused on the CPU
  int num_threads = 0;     // CPU: OpenMP threads per op; 0 = the calling thread's default
  Precision precision = Precision::kFloat32;  // of the matmuls (ops::linear)

  static ExecContext cpu(int num_threads = 0, Precision precision = Precision::kFloat32) {
    return {Device::cpu(), nullptr, num_threads, precision};
  }
};

}  // namespace lorart

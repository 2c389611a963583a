#include <cuda_runtime.h>

#include "core/cuda/cuda_check.h"
#include "core/cuda/device_guard.cuh"
#include "core/cuda/device_memory.h"
#include "core/errors.h"

namespace lorart::cuda {

void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    cudaGetLastError();  // clear the non-sticky error so later calls are not poisoned
    raise<DeviceError>(what, " failed: ", cudaGetErrorName(status), " (",
                       cudaGetErrorString(status), ")");
  }
}

void check_launch(const char* kernel) {
  const cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess) {
    raise<DeviceError>("launch of ", kernel, " failed: ", cudaGetErrorName(status), " (",
                       cudaGetErrorString(status), ")");
  }
}

int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return count;
}

std::string runtime_version() {
  return std::to_string(CUDART_VERSION / 1000) + "." + std::to_string(CUDART_VERSION % 1000 / 10);
}

size_t total_memory(int device) {
  DeviceGuard guard(device);
  size_t free = 0, total = 0;
  check(cudaMemGetInfo(&free, &total), "cudaMemGetInfo");
  return total;
}

void set_current_device(int device) {
  int current = 0;
  check(cudaGetDevice(&current), "cudaGetDevice");
  if (current != device) check(cudaSetDevice(device), "cudaSetDevice");
}

size_t free_memory(int device) {
  DeviceGuard guard(device);
  size_t free = 0, total = 0;
  check(cudaMemGetInfo(&free, &total), "cudaMemGetInfo");
  return free;
}

void* malloc_on(int device, size_t bytes) {
  DeviceGuard guard(device);
  void* ptr = nullptr;
  check(cudaMalloc(&ptr, bytes), "cudaMalloc");
  return ptr;
}

void free_on(int device, void* ptr) noexcept {
  int previous = 0;
  if (cudaGetDevice(&previous) != cudaSuccess) return;
  cudaSetDevice(device);
  cudaFree(ptr);
  cudaSetDevice(previous);
}

void memset_zero(int device, void* ptr, size_t bytes) {
  DeviceGuard guard(device);
  check(cudaMemset(ptr, 0, bytes), "cudaMemset");
}

void memcpy_any(void* dst, bool dst_on_device, const void* src, bool src_on_device, size_t bytes) {
  const cudaMemcpyKind kind =
      dst_on_device ? (src_on_device ? cudaMemcpyDeviceToDevice : cudaMemcpyHostToDevice)
                    : (src_on_device ? cudaMemcpyDeviceToHost : cudaMemcpyHostToHost);
  check(cudaMemcpy(dst, src, bytes, kind), "cudaMemcpy");
}

void memcpy_async(void* dst, bool dst_on_device, const void* src, bool src_on_device, size_t bytes,
                  void* stream) {
  const cudaMemcpyKind kind =
      dst_on_device ? (src_on_device ? cudaMemcpyDeviceToDevice : cudaMemcpyHostToDevice)
                    : (src_on_device ? cudaMemcpyDeviceToHost : cudaMemcpyHostToHost);
  check(cudaMemcpyAsync(dst, src, bytes, kind, static_cast<cudaStream_t>(stream)),
        "cudaMemcpyAsync");
}

void* stream_create(int device) {
  DeviceGuard guard(device);
  cudaStream_t stream = nullptr;
  check(cudaStreamCreate(&stream), "cudaStreamCreate");
  return stream;
}

void stream_destroy(int device, void* stream) noexcept {
  if (stream == nullptr) return;
  int previous = 0;
  if (cudaGetDevice(&previous) != cudaSuccess) return;
  cudaSetDevice(device);
  cudaStreamDestroy(static_cast<cudaStream_t>(stream));
  cudaSetDevice(previous);
}

void stream_synchronize(void* stream) {
  check(cudaStreamSynchronize(static_cast<cudaStream_t>(stream)), "cudaStreamSynchronize");
}

}  // namespace lorart::cuda

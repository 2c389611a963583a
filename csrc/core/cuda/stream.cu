#include <cuda_runtime.h>

#include "core/cuda/cuda_check.h"
#include "core/cuda/device_guard.cuh"
#include "core/cuda/stream.h"

namespace lorart::cuda {

namespace {
cudaStream_t as_stream(void* s) { return static_cast<cudaStream_t>(s); }
cudaEvent_t as_event(void* e) { return static_cast<cudaEvent_t>(e); }
}  // namespace

void* host_alloc_pinned(size_t bytes) {
  void* ptr = nullptr;
  LORART_CUDA_CHECK(cudaHostAlloc(&ptr, bytes, cudaHostAllocPortable));
  return ptr;
}

void host_free_pinned(void* ptr) noexcept {
  if (ptr != nullptr) cudaFreeHost(ptr);
}

void* stream_create_nonblocking(int device) {
  const DeviceGuard guard(device);
  cudaStream_t s = nullptr;
  LORART_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  return s;
}

void* event_create(int device) {
  const DeviceGuard guard(device);
  cudaEvent_t e = nullptr;
  LORART_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
  return e;
}

void event_destroy(void* event) noexcept {
  if (event != nullptr) cudaEventDestroy(as_event(event));
}

void event_record(void* event, void* stream) {
  LORART_CUDA_CHECK(cudaEventRecord(as_event(event), as_stream(stream)));
}

void event_synchronize(void* event) { LORART_CUDA_CHECK(cudaEventSynchronize(as_event(event))); }

bool event_done(void* event) {
  const cudaError_t status = cudaEventQuery(as_event(event));
  if (status == cudaErrorNotReady) {
    cudaGetLastError();  // not an error: clear it
    return false;
  }
  LORART_CUDA_CHECK(status);
  return true;
}

void stream_wait_event(void* stream, void* event) {
  LORART_CUDA_CHECK(cudaStreamWaitEvent(as_stream(stream), as_event(event), 0));
}

void memcpy_to_device_async(void* dst, const void* src, size_t bytes, void* stream) {
  if (bytes == 0) return;
  LORART_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, as_stream(stream)));
}

}  // namespace lorart::cuda

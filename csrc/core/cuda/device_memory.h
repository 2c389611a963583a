// Thin wrappers over the CUDA runtime for device memory. Compiled only when the CUDA backend is
// built (LORART_WITH_CUDA); callers go through Buffer, which checks the device first. Every
// failure throws DeviceError with the CUDA error string.
#pragma once

#include <cstddef>
#include <string>

namespace lorart::cuda {

// Visible devices; 0 when there is no driver or no GPU (never throws for that case).
int device_count();
// "13.0"-style runtime version this backend was built against.
std::string runtime_version();
// Total memory of the device in bytes (what an allocation can never exceed).
size_t total_memory(int device);
// Free memory of the device in bytes now (cudaMemGetInfo).
size_t free_memory(int device);
void* malloc_on(int device, size_t bytes);
void free_on(int device, void* ptr) noexcept;
void memset_zero(int device, void* ptr, size_t bytes);
// Synchronous copy; the flags say which side is device memory.
void memcpy_any(void* dst, bool dst_on_device, const void* src, bool src_on_device, size_t bytes);
// Copy queued on `stream` (a cudaStream_t); from pageable host memory it returns once the source
// has been read, so the caller may reuse it; to host memory the bytes are there only after
// stream_synchronize.
void memcpy_async(void* dst, bool dst_on_device, const void* src, bool src_on_device, size_t bytes,
                  void* stream);
// A stream on `device` that synchronises with the legacy default stream (so the synchronous
// copies of Buffer stay ordered with the kernels queued on it).
void* stream_create(int device);
void stream_destroy(int device, void* stream) noexcept;
void stream_synchronize(void* stream);
// Makes `device` the calling thread's current device (kernel launches go to its streams).
void set_current_device(int device);

}  // namespace lorart::cuda

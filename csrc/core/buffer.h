// Buffer: an owning, move-only allocation on the host (64-byte aligned) or on a CUDA device.
// It is the only thing in the core that allocates tensor memory; Tensors are views into it.
// Thread-compatible: distinct Buffers may be used from distinct threads.
#pragma once

#include <cstddef>
#include <initializer_list>
#include <string_view>

#include "core/device.h"
#include "core/tensor.h"

namespace lorart {

class Buffer {
 public:
  Buffer() = default;
  // Uninitialised memory of `bytes` on `device`; `what` names it in errors ("KV cache"). Throws
  // InvalidArgument when `bytes` exceeds the device's memory (host_memory_limit() on the host,
  // the GPU's total memory on CUDA), DeviceError when a CUDA device is asked for and this build
  // has no CUDA backend or the machine has no such device, Error when the allocator fails. Never
  // returns fewer bytes than asked for.
  static Buffer allocate(size_t bytes, Device device = Device::cpu(),
                         std::string_view what = "buffer");
  // An owning copy of a contiguous tensor, placed on `device`.
  static Buffer copy_of(const Tensor& src, Device device);

  ~Buffer();
  Buffer(Buffer&& other) noexcept;
  Buffer& operator=(Buffer&& other) noexcept;
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;

  void* data() const { return data_; }
  size_t size() const { return bytes_; }
  Device device() const { return device_; }

  void zero();
  // Copies `bytes` from `src` (on `src_device`) to the start of this buffer.
  void copy_from(const void* src, Device src_device, size_t bytes);
  // A contiguous view of the first numel*dtype_size bytes.
  Tensor view(DType dtype, std::initializer_list<int64_t> shape) const;

 private:
  Buffer(void* data, size_t bytes, Device device) : data_(data), bytes_(bytes), device_(device) {}
  void release() noexcept;

  void* data_ = nullptr;
  size_t bytes_ = 0;
  Device device_ = Device::cpu();
};

// Copies between any two devices (host<->host, host<->device, device<->device).
void copy_bytes(void* dst, Device dst_device, const void* src, Device src_device, size_t bytes);

// As copy_bytes, queued on `stream` (a cudaStream_t; ignored, and the copy done at once, when
// both sides are host memory). From host memory it returns once the source has been read; bytes
// copied to the host are there only after the stream is synchronised (DeviceStream).
void copy_bytes_async(void* dst, Device dst_device, const void* src, Device src_device,
                      size_t bytes, void* stream);

// The most bytes one host Buffer may hold: the machine's physical memory, or the memory limit of
// this process's cgroup (v2 memory.max, v1 memory.limit_in_bytes) when that is lower. Read once.
size_t host_memory_limit();

// What Buffer::allocate checks before it allocates: throws InvalidArgument naming `what`, the
// bytes and the limit when `bytes` exceed the memory of `device`. For callers that want to refuse
// a size before they do other expensive work (loading weights).
void check_allocation(size_t bytes, Device device, std::string_view what);

// Throws DeviceError naming `device` when this build has no CUDA backend or the machine has no
// such CUDA device (a CPU device is always there). For callers that want to refuse a device
// before they do expensive work (loading weights).
void require_device(Device device);

// Free memory of a CUDA device now, in bytes (what the KV pool is sized from). Throws DeviceError
// as require_device does, and InvalidArgument for the CPU (it has no such figure).
size_t device_free_memory(Device device);

// Number of CUDA devices visible (0 when the build has no CUDA backend or no driver/GPU).
int cuda_device_count();
bool cuda_backend_built();

}  // namespace lorart

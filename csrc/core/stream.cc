#include "core/stream.h"

#include <utility>

#include "core/buffer.h"
#include "core/cuda/device_memory.h"

namespace lorart {

DeviceStream DeviceStream::create(Device device) {
  require_device(device);
  DeviceStream out;
  out.device_ = device;
#if LORART_WITH_CUDA
  if (device.is_cuda()) out.stream_ = cuda::stream_create(device.index);
#endif
  return out;
}

DeviceStream::~DeviceStream() { release(); }

DeviceStream::DeviceStream(DeviceStream&& other) noexcept
    : device_(other.device_), stream_(std::exchange(other.stream_, nullptr)) {}

DeviceStream& DeviceStream::operator=(DeviceStream&& other) noexcept {
  if (this != &other) {
    release();
    device_ = other.device_;
    stream_ = std::exchange(other.stream_, nullptr);
  }
  return *this;
}

void DeviceStream::synchronize() const {
#if LORART_WITH_CUDA
  if (stream_ != nullptr) cuda::stream_synchronize(stream_);
#endif
}

void synchronize_stream(Device device, void* stream) {
#if LORART_WITH_CUDA
  if (device.is_cuda()) cuda::stream_synchronize(stream);
#else
  (void)device;
  (void)stream;
#endif
}

void set_current_device(Device device) {
  if (device.is_cpu()) return;
  require_device(device);
#if LORART_WITH_CUDA
  cuda::set_current_device(device.index);
#endif
}

void DeviceStream::release() noexcept {
#if LORART_WITH_CUDA
  if (stream_ != nullptr) cuda::stream_destroy(device_.index, stream_);
#endif
  stream_ = nullptr;
}

}  // namespace lorart

// DeviceStream: an owning, move-only handle of one CUDA stream (the stream of a ModelRunner's
// ExecContext), or of nothing on the CPU. Created and destroyed here so that code outside the
// .cu files never includes CUDA headers. Thread-compatible.
#pragma once

#include "core/device.h"

namespace lorart {

class DeviceStream {
 public:
  DeviceStream() = default;
  // A new stream on `device`; an empty handle (get() == nullptr) for the CPU. Throws DeviceError
  // when `device` is a CUDA device this build or machine does not have (require_device).
  static DeviceStream create(Device device);

  ~DeviceStream();
  DeviceStream(DeviceStream&& other) noexcept;
  DeviceStream& operator=(DeviceStream&& other) noexcept;
  DeviceStream(const DeviceStream&) = delete;
  DeviceStream& operator=(const DeviceStream&) = delete;

  void* get() const { return stream_; }  // the cudaStream_t; null on the CPU
  Device device() const { return device_; }
  // Waits for everything queued on the stream (no-op on the CPU). Throws DeviceError for a fault
  // of a kernel queued on it.
  void synchronize() const;

 private:
  void release() noexcept;

  Device device_ = Device::cpu();
  void* stream_ = nullptr;
};

// Waits for everything queued on `stream` (a cudaStream_t of `device`; null = the legacy default
// stream); a no-op on the CPU. Throws DeviceError for a fault of a kernel queued on it.
void synchronize_stream(Device device, void* stream);

// Makes a CUDA `device` the calling thread's current device, so that the kernels it launches
// go to that device's streams (a thread starts on device 0); a no-op for the CPU. Throws
// DeviceError as require_device does.
void set_current_device(Device device);

}  // namespace lorart

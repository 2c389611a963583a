// Host->device copies off the compute stream, for the LoRA cache's device level and the per-step
// LoRA slot table. Same interface on both backends:
// - StagingBuffer: host memory the copies read from: page-locked (cudaHostAlloc) when the target
//   is a CUDA device, so cudaMemcpyAsync does not fall back to a synchronous staged copy; plain
//   64-byte aligned host memory for the CPU backend.
// - CopyStream: for a CUDA device, its own non-blocking stream and one event; for the CPU, copies
//   run at once (memcpy) and the event is always complete.
// Protocol: write into the staging buffer, copy(), record(); before the compute stream reads the
// destination, make_wait(compute_stream) (device-side wait, the host goes on); before the staging
// buffer is written again, wait() (host-side). Not thread-safe; one owner.
#pragma once

#include <cstddef>

#include "core/device.h"

namespace lorart {

class StagingBuffer {
 public:
  StagingBuffer() = default;
  // Throws DeviceError for a CUDA device when this build has no CUDA backend.
  StagingBuffer(size_t bytes, Device target);
  ~StagingBuffer();
  StagingBuffer(StagingBuffer&& other) noexcept;
  StagingBuffer& operator=(StagingBuffer&& other) noexcept;
  StagingBuffer(const StagingBuffer&) = delete;
  StagingBuffer& operator=(const StagingBuffer&) = delete;

  void* data() const { return data_; }
  size_t size() const { return bytes_; }
  bool pinned() const { return pinned_; }

 private:
  void release() noexcept;
  void* data_ = nullptr;
  size_t bytes_ = 0;
  bool pinned_ = false;
};

class CopyStream {
 public:
  // Throws DeviceError for a CUDA device when this build has no CUDA backend or no such device.
  // Copies go on a non-blocking stream of its own, overlapping the compute stream's work.
  explicit CopyStream(Device device);
  ~CopyStream();
  CopyStream(const CopyStream&) = delete;
  CopyStream& operator=(const CopyStream&) = delete;

  Device device() const { return device_; }
  // dst on device(), src in host memory (a StagingBuffer's for an asynchronous copy).
  void copy(void* dst, const void* src, size_t bytes);
  // Marks the end of the copies queued so far.
  void record();
  // Host waits for the recorded copies (then the staging buffer may be rewritten).
  void wait();
  // Whether the recorded copies are complete, without blocking.
  bool done();
  // `compute_stream` (a cudaStream_t; null = the legacy default stream) waits on the device for
  // the recorded copies; no-op on the CPU.
  void make_wait(void* compute_stream);
  void* stream() const { return stream_; }  // null on the CPU

 private:
  Device device_;
  void* stream_ = nullptr;
  void* event_ = nullptr;
  bool recorded_ = false;
};

}  // namespace lorart

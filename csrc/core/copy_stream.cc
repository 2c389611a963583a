#include "core/copy_stream.h"

#include <cstdlib>
#include <cstring>
#include <utility>

#include "core/buffer.h"
#include "core/errors.h"
#if LORART_WITH_CUDA
#include "core/cuda/device_memory.h"
#include "core/cuda/stream.h"
#endif

namespace lorart {

namespace {

constexpr size_t kAlignment = 64;

void require_backend(Device device, const char* what) {
  if (device.is_cpu()) return;
#if LORART_WITH_CUDA
  const int count = cuda_device_count();
  if (device.index < 0 || device.index >= count) {
    raise<DeviceError>(what, ": CUDA device ", device.index, " is not available (", count,
                       " CUDA device(s) visible)");
  }
#else
  raise<DeviceError>(what, ": this lorart build has no CUDA backend");
#endif
}

}  // namespace

StagingBuffer::StagingBuffer(size_t bytes, Device target) {
  require_backend(target, "LoRA staging buffer");
  if (bytes == 0) return;
  check_allocation(bytes, Device::cpu(), "LoRA staging buffer");
#if LORART_WITH_CUDA
  if (target.is_cuda()) {
    data_ = cuda::host_alloc_pinned(bytes);
    bytes_ = bytes;
    pinned_ = true;
    return;
  }
#endif
  data_ = std::aligned_alloc(kAlignment, (bytes + kAlignment - 1) / kAlignment * kAlignment);
  if (data_ == nullptr) raise<Error>("host allocation of ", bytes, " bytes for staging failed");
  bytes_ = bytes;
}

StagingBuffer::~StagingBuffer() { release(); }

StagingBuffer::StagingBuffer(StagingBuffer&& other) noexcept
    : data_(std::exchange(other.data_, nullptr)),
      bytes_(std::exchange(other.bytes_, 0)),
      pinned_(std::exchange(other.pinned_, false)) {}

StagingBuffer& StagingBuffer::operator=(StagingBuffer&& other) noexcept {
  if (this != &other) {
    release();
    data_ = std::exchange(other.data_, nullptr);
    bytes_ = std::exchange(other.bytes_, 0);
    pinned_ = std::exchange(other.pinned_, false);
  }
  return *this;
}

void StagingBuffer::release() noexcept {
  if (data_ == nullptr) return;
#if LORART_WITH_CUDA
  if (pinned_) {
    cuda::host_free_pinned(data_);
    data_ = nullptr;
    return;
  }
#endif
  std::free(data_);
  data_ = nullptr;
}

CopyStream::CopyStream(Device device) : device_(device) {
  require_backend(device, "LoRA copy stream");
#if LORART_WITH_CUDA
  if (device.is_cuda()) {
    event_ = cuda::event_create(device.index);
    try {
      stream_ = cuda::stream_create_nonblocking(device.index);
    } catch (...) {
      cuda::event_destroy(event_);  // the destructor does not run for a throwing constructor
      throw;
    }
  }
#endif
}

CopyStream::~CopyStream() {
#if LORART_WITH_CUDA
  if (event_ != nullptr) {
    // Queued copies read staging memory their owner may free next: let them finish.
    try {
      wait();
    } catch (...) {
    }
    cuda::event_destroy(event_);
    cuda::stream_destroy(device_.index, stream_);
  }
#endif
}

void CopyStream::copy(void* dst, const void* src, size_t bytes) {
  if (bytes == 0) return;
#if LORART_WITH_CUDA
  if (device_.is_cuda()) {
    cuda::memcpy_to_device_async(dst, src, bytes, stream_);
    return;
  }
#endif
  std::memcpy(dst, src, bytes);
}

void CopyStream::record() {
#if LORART_WITH_CUDA
  if (device_.is_cuda()) {
    cuda::event_record(event_, stream_);
    recorded_ = true;
  }
#endif
}

void CopyStream::wait() {
#if LORART_WITH_CUDA
  if (recorded_) cuda::event_synchronize(event_);
#endif
}

bool CopyStream::done() {
#if LORART_WITH_CUDA
  if (recorded_) return cuda::event_done(event_);
#endif
  return true;
}

void CopyStream::make_wait(void* compute_stream) {
#if LORART_WITH_CUDA
  if (recorded_) cuda::stream_wait_event(compute_stream, event_);
#else
  (void)compute_stream;
#endif
}

}  // namespace lorart

#include "core/buffer.h"

#include <cstdlib>
#include <cstring>
#include <new>
#include <utility>

#include "core/cuda/device_memory.h"
#include "core/errors.h"

namespace lorart {

namespace {

constexpr size_t kHostAlignment = 64;

#if !LORART_WITH_CUDA
[[noreturn]] void no_cuda_backend(const char* what) {
  raise<DeviceError>(what, ": this lorart build has no CUDA backend (rebuild with nvcc on PATH, ",
                     "or -C cmake.define.LORART_CUDA=ON)");
}
#endif

#if LORART_WITH_CUDA
void check_cuda_device(Device device) {
  const int count = cuda::device_count();
  if (device.index < 0 || device.index >= count) {
    raise<DeviceError>("CUDA device ", device.index, " is not available (", count,
                       " CUDA device(s) visible)");
  }
}
#endif

}  // namespace

Buffer Buffer::allocate(size_t bytes, Device device) {
  if (device.is_cpu()) {
    if (bytes == 0) return Buffer(nullptr, 0, device);
    const size_t rounded = (bytes + kHostAlignment - 1) / kHostAlignment * kHostAlignment;
    void* data = std::aligned_alloc(kHostAlignment, rounded);
    if (data == nullptr) raise<Error>("host allocation of ", bytes, " bytes failed");
    return Buffer(data, bytes, device);
  }
#if LORART_WITH_CUDA
  check_cuda_device(device);  // even for 0 bytes: a Buffer on a missing device is a bug
  if (bytes == 0) return Buffer(nullptr, 0, device);
  return Buffer(cuda::malloc_on(device.index, bytes), bytes, device);
#else
  no_cuda_backend("CUDA memory");
#endif
}

Buffer Buffer::copy_of(const Tensor& src, Device device) {
  if (!src.is_contiguous()) {
    raise<InvalidArgument>("Buffer::copy_of needs a contiguous tensor, got ", src.describe());
  }
  Buffer out = allocate(src.nbytes(), device);
  out.copy_from(src.data(), src.device(), src.nbytes());
  return out;
}

Buffer::~Buffer() { release(); }

Buffer::Buffer(Buffer&& other) noexcept
    : data_(std::exchange(other.data_, nullptr)),
      bytes_(std::exchange(other.bytes_, 0)),
      device_(other.device_) {}

Buffer& Buffer::operator=(Buffer&& other) noexcept {
  if (this != &other) {
    release();
    data_ = std::exchange(other.data_, nullptr);
    bytes_ = std::exchange(other.bytes_, 0);
    device_ = other.device_;
  }
  return *this;
}

void Buffer::release() noexcept {
  if (data_ == nullptr) return;
  if (device_.is_cpu()) {
    std::free(data_);
  } else {
#if LORART_WITH_CUDA
    cuda::free_on(device_.index, data_);
#endif
  }
  data_ = nullptr;
  bytes_ = 0;
}

void Buffer::zero() {
  if (bytes_ == 0) return;
  if (device_.is_cpu()) {
    std::memset(data_, 0, bytes_);
    return;
  }
#if LORART_WITH_CUDA
  cuda::memset_zero(device_.index, data_, bytes_);
#endif
}

void Buffer::copy_from(const void* src, Device src_device, size_t bytes) {
  if (bytes > bytes_) {
    raise<InvalidArgument>("copy of ", bytes, " bytes into a buffer of ", bytes_, " bytes");
  }
  copy_bytes(data_, device_, src, src_device, bytes);
}

Tensor Buffer::view(DType dtype, std::initializer_list<int64_t> shape) const {
  Tensor out(data_, dtype, shape, device_);
  if (out.nbytes() > bytes_) {
    raise<InvalidArgument>("view ", out.describe(), " needs ", out.nbytes(), " bytes; buffer has ",
                           bytes_);
  }
  return out;
}

void copy_bytes(void* dst, Device dst_device, const void* src, Device src_device, size_t bytes) {
  if (bytes == 0) return;
  if (dst_device.is_cpu() && src_device.is_cpu()) {
    std::memcpy(dst, src, bytes);
    return;
  }
#if LORART_WITH_CUDA
  cuda::memcpy_any(dst, dst_device.is_cuda(), src, src_device.is_cuda(), bytes);
#else
  no_cuda_backend("copy to or from CUDA memory");
#endif
}

int cuda_device_count() {
#if LORART_WITH_CUDA
  return cuda::device_count();
#else
  return 0;
#endif
}

bool cuda_backend_built() { return LORART_WITH_CUDA != 0; }

}  // namespace lorart

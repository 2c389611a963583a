#include "core/buffer.h"

#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <limits>
#include <new>
#include <string>
#include <utility>

#include "core/cuda/device_memory.h"
#include "core/errors.h"

namespace lorart {

namespace {

constexpr size_t kHostAlignment = 64;

// A cgroup memory limit file's value; SIZE_MAX when it is absent, "max" or unreadable.
size_t cgroup_limit(const char* path) {
  std::ifstream file(path);
  unsigned long long value = 0;
  if (!(file >> value) || value == 0) return std::numeric_limits<size_t>::max();
  return static_cast<size_t>(value);
}

size_t read_host_memory_limit() {
  const long pages = sysconf(_SC_PHYS_PAGES);
  const long page_size = sysconf(_SC_PAGESIZE);
  size_t limit = std::numeric_limits<size_t>::max();
  if (pages > 0 && page_size > 0) {
    limit = static_cast<size_t>(pages) * static_cast<size_t>(page_size);
  }
  limit = std::min(limit, cgroup_limit("/sys/fs/cgroup/memory.max"));
  return std::min(limit, cgroup_limit("/sys/fs/cgroup/memory/memory.limit_in_bytes"));
}

[[noreturn]] void too_large(std::string_view what, size_t bytes, size_t limit, const char* whose) {
  raise<InvalidArgument>("cannot allocate ", what, ": ", bytes, " bytes (", bytes >> 20,
                         " MiB) exceed ", whose, " of ", limit, " bytes (", limit >> 20, " MiB)");
}

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

size_t host_memory_limit() {
  static const size_t limit = read_host_memory_limit();
  return limit;
}

void check_allocation(size_t bytes, Device device, std::string_view what) {
  if (device.is_cpu()) {
    const size_t limit = host_memory_limit();
    if (bytes > limit) too_large(what, bytes, limit, "this host's memory limit");
    return;
  }
#if LORART_WITH_CUDA
  check_cuda_device(device);
  if (bytes == 0) return;
  const size_t total = cuda::total_memory(device.index);
  if (bytes > total) too_large(what, bytes, total, "the CUDA device's memory");
#else
  no_cuda_backend("CUDA memory");
#endif
}

size_t device_free_memory(Device device) {
  if (device.is_cpu())
    raise<InvalidArgument>("device_free_memory: the CPU has no free-memory figure");
#if LORART_WITH_CUDA
  check_cuda_device(device);
  return cuda::free_memory(device.index);
#else
  no_cuda_backend("CUDA memory");
#endif
}

Buffer Buffer::allocate(size_t bytes, Device device, std::string_view what) {
  if (device.is_cpu()) {
    if (bytes == 0) return Buffer(nullptr, 0, device);
    check_allocation(bytes, device, what);  // also keeps the rounding below from wrapping
    const size_t rounded = (bytes + kHostAlignment - 1) / kHostAlignment * kHostAlignment;
    void* data = std::aligned_alloc(kHostAlignment, rounded);
    if (data == nullptr) raise<Error>("host allocation of ", bytes, " bytes for ", what, " failed");
    return Buffer(data, bytes, device);
  }
#if LORART_WITH_CUDA
  check_cuda_device(device);  // even for 0 bytes: a Buffer on a missing device is a bug
  if (bytes == 0) return Buffer(nullptr, 0, device);
  check_allocation(bytes, device, what);
  return Buffer(cuda::malloc_on(device.index, bytes), bytes, device);
#else
  no_cuda_backend("CUDA memory");
#endif
}

Buffer Buffer::copy_of(const Tensor& src, Device device) {
  if (!src.is_contiguous()) {
    raise<InvalidArgument>("Buffer::copy_of needs a contiguous tensor, got ", src.describe());
  }
  Buffer out = allocate(src.nbytes(), device, "a copy of a tensor");
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

void require_device(Device device) {
  if (device.is_cpu()) return;
#if LORART_WITH_CUDA
  const int count = cuda::device_count();
  if (device.index < 0 || device.index >= count) {
    raise<DeviceError>("device ", device.str(), " is not available (", count,
                       " CUDA device(s) visible)");
  }
#else
  raise<DeviceError>("device ", device.str(), ": this lorart build has no CUDA backend (rebuild ",
                     "with nvcc on PATH, or -C cmake.define.LORART_CUDA=ON)");
#endif
}

void copy_bytes_async(void* dst, Device dst_device, const void* src, Device src_device,
                      size_t bytes, void* stream) {
  if (bytes == 0) return;
  if (dst_device.is_cpu() && src_device.is_cpu()) {
    std::memcpy(dst, src, bytes);
    return;
  }
#if LORART_WITH_CUDA
  cuda::memcpy_async(dst, dst_device.is_cuda(), src, src_device.is_cuda(), bytes, stream);
#else
  (void)stream;
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

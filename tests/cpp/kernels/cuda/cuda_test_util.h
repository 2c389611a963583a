// Helpers shared by the GPU tests (tests/cpp/**/cuda/): a skip that says why, and device arrays
// filled from and read back into host vectors, poisoned before each kernel runs so an element the
// kernel fails to write shows as NaN rather than as a stale right answer. Compiled only with the
// CUDA backend; plain C++ (Buffer and copy_bytes), so test files stay .cc.
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "core/buffer.h"

namespace lorart::testing_util {

// Skips the test, naming the reason, when this machine has no CUDA device.
#define LORART_REQUIRE_GPU()                                                      \
  do {                                                                            \
    if (::lorart::cuda_device_count() == 0) {                                     \
      GTEST_SKIP() << "no CUDA device on this machine: the GPU test did not run"; \
    }                                                                             \
  } while (0)

// A device copy of a host vector of T (trivially copyable).
template <class T>
class DeviceArray {
 public:
  explicit DeviceArray(const std::vector<T>& host, int device = 0)
      : size_(static_cast<int64_t>(host.size())),
        buffer_(Buffer::allocate(std::max<size_t>(1, host.size() * sizeof(T)), Device::cuda(device),
                                 "test array")) {
    if (!host.empty()) {
      copy_bytes(buffer_.data(), buffer_.device(), host.data(), Device::cpu(),
                 host.size() * sizeof(T));
    }
  }
  // `n` elements whose every byte is 0xFF (NaN for float types, -1 for integers).
  static DeviceArray poisoned(int64_t n, int device = 0) {
    std::vector<T> host(static_cast<size_t>(n));
    if (n > 0) std::memset(host.data(), 0xFF, host.size() * sizeof(T));
    return DeviceArray(host, device);
  }
  std::vector<T> to_host() const {
    std::vector<T> host(static_cast<size_t>(size_));
    if (size_ > 0) {
      copy_bytes(host.data(), Device::cpu(), buffer_.data(), buffer_.device(),
                 host.size() * sizeof(T));
    }
    return host;
  }
  T* data() const { return static_cast<T*>(buffer_.data()); }
  int64_t size() const { return size_; }
  Device device() const { return buffer_.device(); }

 private:
  int64_t size_;
  Buffer buffer_;
};

}  // namespace lorart::testing_util

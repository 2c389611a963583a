#include "core/stream.h"

#include <gtest/gtest.h>

#include <utility>

#include "core/buffer.h"
#include "core/errors.h"
#include "test_util.h"

namespace lorart {
namespace {

using testing_util::expect_error;

TEST(DeviceStreamTest, CpuStreamIsEmptyAndSynchronizesAtOnce) {
  DeviceStream s = DeviceStream::create(Device::cpu());
  EXPECT_EQ(s.get(), nullptr);
  EXPECT_EQ(s.device(), Device::cpu());
  EXPECT_NO_THROW(s.synchronize());
  EXPECT_NO_THROW(synchronize_stream(Device::cpu(), nullptr));
}

// A stream on a CUDA device this build or machine lacks is refused, naming the device.
TEST(DeviceStreamTest, AMissingCudaDeviceIsADeviceError) {
  const Device missing = Device::cuda(cuda_device_count());
  expect_error<DeviceError>([&] { DeviceStream::create(missing); }, "device " + missing.str());
}

// Host-to-host async copies are done when the call returns (no stream involved).
TEST(DeviceStreamTest, HostCopiesAreImmediate) {
  int src[3] = {1, 2, 3}, dst[3] = {0, 0, 0};
  copy_bytes_async(dst, Device::cpu(), src, Device::cpu(), sizeof(src), nullptr);
  EXPECT_EQ(dst[0], 1);
  EXPECT_EQ(dst[2], 3);
}

TEST(DeviceStreamTest, MovedFromStreamOwnsNothing) {
  DeviceStream a = DeviceStream::create(Device::cpu());
  DeviceStream b = std::move(a);
  EXPECT_EQ(a.get(), nullptr);  // NOLINT(bugprone-use-after-move): the moved-from state is the test
  EXPECT_EQ(b.device(), Device::cpu());
}

}  // namespace
}  // namespace lorart

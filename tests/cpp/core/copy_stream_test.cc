#include "core/copy_stream.h"

#include <gtest/gtest.h>

#include <cstring>
#include <vector>

#include "core/buffer.h"
#include "core/errors.h"
#include "test_util.h"

namespace lorart {
namespace {

using testing_util::expect_error;

// The CPU backend's path: plain host staging, copies at once, events always complete.
TEST(CopyStreamTest, CpuCopiesAtOnceAndIsAlwaysDone) {
  StagingBuffer staging(100, Device::cpu());
  ASSERT_NE(staging.data(), nullptr);
  EXPECT_EQ(staging.size(), 100u);
  EXPECT_FALSE(staging.pinned());
  EXPECT_EQ(reinterpret_cast<uintptr_t>(staging.data()) % 64, 0u);
  std::memset(staging.data(), 7, 100);
  std::vector<char> dst(100, 0);
  CopyStream copies(Device::cpu());
  EXPECT_EQ(copies.stream(), nullptr);
  copies.copy(dst.data(), staging.data(), 100);
  copies.record();
  EXPECT_TRUE(copies.done());
  copies.wait();
  copies.make_wait(nullptr);
  EXPECT_EQ(dst, std::vector<char>(100, 7));
  StagingBuffer moved = std::move(staging);
  EXPECT_EQ(staging.data(), nullptr);  // NOLINT(bugprone-use-after-move): moved-from is empty
  EXPECT_EQ(moved.size(), 100u);
}

TEST(CopyStreamTest, CudaWithoutABackendOrDeviceIsAClearError) {
  if (cuda_device_count() > 0) GTEST_SKIP() << "a CUDA device is present";
  const std::string why =
      cuda_backend_built() ? "CUDA device 0 is not available" : "has no CUDA backend";
  expect_error<DeviceError>([] { CopyStream(Device::cuda(0)); }, why);
  expect_error<DeviceError>([] { StagingBuffer(16, Device::cuda(0)); }, why);
}

}  // namespace
}  // namespace lorart

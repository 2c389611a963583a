// GPU test of the pinned staging + copy stream path (core/copy_stream.h on CUDA).
#include "core/copy_stream.h"

#include <gtest/gtest.h>

#include <cstring>
#include <numeric>
#include <vector>

#include "core/buffer.h"
#include "kernels/cuda/cuda_test_util.h"

namespace lorart {
namespace {

TEST(CudaCopyStreamTest, PinnedStagingCopiesOnItsStreamAndWaitsOnEvents) {
  LORART_REQUIRE_GPU();
  const size_t n = (size_t{1} << 20) + 3;  // odd size
  StagingBuffer staging(n * sizeof(int32_t), Device::cuda(0));
  EXPECT_TRUE(staging.pinned());
  auto* host = static_cast<int32_t*>(staging.data());
  std::iota(host, host + n, 17);
  Buffer device = Buffer::allocate(n * sizeof(int32_t), Device::cuda(0));
  std::vector<int32_t> poison(n, -1);
  device.copy_from(poison.data(), Device::cpu(), n * sizeof(int32_t));
  CopyStream copies(Device::cuda(0));
  ASSERT_NE(copies.stream(), nullptr);
  copies.copy(device.data(), staging.data(), n * sizeof(int32_t));
  copies.record();
  copies.make_wait(nullptr);  // the legacy default stream waits on the device
  copies.wait();
  EXPECT_TRUE(copies.done());
  std::vector<int32_t> back(n, 0);
  copy_bytes(back.data(), Device::cpu(), device.data(), Device::cuda(0), n * sizeof(int32_t));
  for (size_t i = 0; i < n; i += 4099) ASSERT_EQ(back[i], static_cast<int32_t>(17 + i)) << i;
  EXPECT_EQ(back[n - 1], static_cast<int32_t>(17 + n - 1));
}

}  // namespace
}  // namespace lorart

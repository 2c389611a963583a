#include "core/buffer.h"

#include <gtest/gtest.h>

#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <string>
#include <typeinfo>
#include <utility>
#include <vector>

#include "core/errors.h"
#include "test_util.h"

namespace lorart {
namespace {

using testing_util::expect_error;

std::vector<uint8_t> iota_bytes(size_t n) {
  std::vector<uint8_t> bytes(n);
  std::iota(bytes.begin(), bytes.end(), uint8_t{1});
  return bytes;
}

TEST(BufferTest, HostAllocateIsAlignedAndSized) {
  // Several live allocations, so a 16-byte-aligned allocator cannot pass by luck.
  std::vector<Buffer> buffers;
  for (size_t bytes : {1, 3, 17, 100, 64, 1000, 5, 200}) {
    buffers.push_back(Buffer::allocate(bytes));
    const Buffer& buffer = buffers.back();
    ASSERT_NE(buffer.data(), nullptr);
    EXPECT_EQ(buffer.size(), bytes);
    EXPECT_EQ(buffer.device(), Device::cpu());
    EXPECT_EQ(reinterpret_cast<uintptr_t>(buffer.data()) % 64, 0u) << bytes << " bytes";
  }
}

TEST(BufferTest, HostLimitIsThePhysicalMemoryOrLower) {
  const size_t limit = host_memory_limit();
  const size_t physical = static_cast<size_t>(sysconf(_SC_PHYS_PAGES)) * sysconf(_SC_PAGESIZE);
  EXPECT_GT(limit, size_t{1} << 26);  // every machine that runs the tests has 64 MiB
  EXPECT_LE(limit, physical);
  EXPECT_NO_THROW(check_allocation(limit, Device::cpu(), "x"));
}

TEST(BufferTest, AllocationsOverTheHostLimitAreRefusedNamingWhatAndTheLimit) {
  const size_t limit = host_memory_limit();
  const std::string limit_text = std::to_string(limit) + " bytes";
  // SIZE_MAX once rounded up to the alignment wrapped to 0: a 0-byte buffer claiming SIZE_MAX.
  for (size_t bytes :
       {limit + 1, std::numeric_limits<size_t>::max(), std::numeric_limits<size_t>::max() - 10}) {
    SCOPED_TRACE(bytes);
    expect_error<InvalidArgument>([&] { Buffer::allocate(bytes, Device::cpu(), "the KV cache"); },
                                  "cannot allocate the KV cache: " + std::to_string(bytes) +
                                      " bytes (" + std::to_string(bytes >> 20) +
                                      " MiB) exceed this host's memory limit of " + limit_text);
    expect_error<InvalidArgument>([&] { check_allocation(bytes, Device::cpu(), "weights"); },
                                  "cannot allocate weights: ");
  }
  expect_error<InvalidArgument>([&] { Buffer::allocate(limit + 1); }, "cannot allocate buffer: ");
}

TEST(BufferTest, ZeroBytesHasNoMemory) {
  const Buffer buffer = Buffer::allocate(0);
  EXPECT_EQ(buffer.data(), nullptr);
  EXPECT_EQ(buffer.size(), 0u);
  EXPECT_EQ(buffer.view(DType::kFloat32, {0, 4}).numel(), 0);
  const Buffer empty;
  EXPECT_EQ(empty.data(), nullptr);
  EXPECT_EQ(empty.size(), 0u);
}

TEST(BufferTest, CopyFromViewAndZero) {
  Buffer buffer = Buffer::allocate(6 * sizeof(float));
  const std::vector<float> src = {1, 2, 3, 4, 5, 6};
  buffer.copy_from(src.data(), Device::cpu(), src.size() * sizeof(float));

  const Tensor view = buffer.view(DType::kFloat32, {2, 3});
  EXPECT_EQ(view.data(), buffer.data());
  EXPECT_EQ(view.device(), Device::cpu());
  EXPECT_EQ(view.shape_str(), "[2, 3]");
  EXPECT_EQ(view.data_as<float>()[4], 5.0f);
  EXPECT_TRUE(std::equal(src.begin(), src.end(), view.data_as<const float>()));

  // A smaller view of the start is fine.
  EXPECT_EQ(buffer.view(DType::kFloat16, {3}).data_as<uint16_t>()[0], 0x0000);

  buffer.zero();
  for (int i = 0; i < 6; ++i) EXPECT_EQ(view.data_as<float>()[i], 0.0f) << i;
}

TEST(BufferTest, PartialCopyLeavesTheRest) {
  Buffer buffer = Buffer::allocate(8);
  buffer.zero();
  const std::vector<uint8_t> src = iota_bytes(3);
  buffer.copy_from(src.data(), Device::cpu(), 3);
  const auto* bytes = static_cast<const uint8_t*>(buffer.data());
  EXPECT_EQ(std::vector<uint8_t>(bytes, bytes + 8), (std::vector<uint8_t>{1, 2, 3, 0, 0, 0, 0, 0}));
}

TEST(BufferTest, CopyOrViewLargerThanBufferThrows) {
  Buffer buffer = Buffer::allocate(16);
  const std::vector<uint8_t> src = iota_bytes(20);
  expect_error<InvalidArgument>([&] { buffer.copy_from(src.data(), Device::cpu(), 20); },
                                "copy of 20 bytes into a buffer of 16 bytes");
  expect_error<InvalidArgument>([&] { buffer.view(DType::kFloat32, {5}); },
                                "view [5] float32 cpu needs 20 bytes; buffer has 16");
  expect_error<InvalidArgument>([&] { buffer.view(DType::kInt64, {2, 2}); },
                                "needs 32 bytes; buffer has 16");
  EXPECT_EQ(buffer.view(DType::kInt64, {2}).nbytes(), 16u);
}

TEST(BufferTest, MoveTransfersOwnershipAndEmptiesTheSource) {
  Buffer a = Buffer::allocate(32);
  void* const data = a.data();

  Buffer b(std::move(a));
  EXPECT_EQ(b.data(), data);
  EXPECT_EQ(b.size(), 32u);
  EXPECT_EQ(a.data(), nullptr);  // NOLINT(bugprone-use-after-move): moved-from state is specified
  EXPECT_EQ(a.size(), 0u);

  Buffer c = Buffer::allocate(8);
  c = std::move(b);
  EXPECT_EQ(c.data(), data);
  EXPECT_EQ(c.size(), 32u);
  EXPECT_EQ(b.data(), nullptr);  // NOLINT(bugprone-use-after-move)
  EXPECT_EQ(b.size(), 0u);

  Buffer& alias = c;
  c = std::move(alias);
  EXPECT_EQ(c.data(), data);
  EXPECT_EQ(c.size(), 32u);
}

TEST(BufferTest, CopyOfTensorOwnsItsOwnBytes) {
  std::vector<int32_t> src = {7, 8, 9, 10};
  const Tensor t(src.data(), DType::kInt32, {2, 2});
  const Buffer copy = Buffer::copy_of(t, Device::cpu());
  EXPECT_EQ(copy.size(), 16u);
  EXPECT_NE(copy.data(), src.data());
  src[0] = 0;
  EXPECT_EQ(static_cast<const int32_t*>(copy.data())[0], 7);
  EXPECT_EQ(static_cast<const int32_t*>(copy.data())[3], 10);

  const int64_t shape[2] = {2, 2};
  const int64_t strides[2] = {1, 2};
  const Tensor transposed(src.data(), DType::kInt32, 2, shape, strides);
  expect_error<InvalidArgument>([&] { Buffer::copy_of(transposed, Device::cpu()); },
                                "Buffer::copy_of needs a contiguous tensor, got [2, 2] int32 cpu");
}

TEST(BufferTest, CudaBackendMatchesTheBuildFlag) {
  EXPECT_EQ(cuda_backend_built(), LORART_WITH_CUDA != 0);
  EXPECT_GE(cuda_device_count(), 0);
  if (!cuda_backend_built()) {
    EXPECT_EQ(cuda_device_count(), 0);
  }
}

// Which branch runs depends on the build and the machine; each is a real path.
TEST(BufferTest, CudaAllocationFollowsBackendAndDevices) {
  if (!cuda_backend_built()) {
    expect_error<DeviceError>([] { device_free_memory(Device::cuda()); },
                              "CUDA memory: this lorart build has no CUDA backend");
    expect_error<DeviceError>([] { Buffer::allocate(16, Device::cuda()); },
                              "CUDA memory: this lorart build has no CUDA backend");
    expect_error<DeviceError>([] { Buffer::allocate(0, Device::cuda()); },
                              "CUDA memory: this lorart build has no CUDA backend");
    Buffer host = Buffer::allocate(16);
    expect_error<DeviceError>(
        [&] { copy_bytes(host.data(), Device::cpu(), host.data(), Device::cuda(), 16); },
        "copy to or from CUDA memory: this lorart build has no CUDA backend");
    return;
  }
  const int count = cuda_device_count();
  expect_error<InvalidArgument>([] { device_free_memory(Device::cpu()); },
                                "the CPU has no free-memory figure");
  expect_error<DeviceError>([&] { device_free_memory(Device::cuda(count)); }, "is not available");
  if (count > 0) {
    EXPECT_GT(device_free_memory(Device::cuda()), 0u);
  }
  expect_error<DeviceError>([&] { Buffer::allocate(16, Device::cuda(count)); },
                            "CUDA device " + std::to_string(count) + " is not available (" +
                                std::to_string(count) + " CUDA device(s) visible)");
  expect_error<DeviceError>([] { Buffer::allocate(16, Device::cuda(-1)); },
                            "CUDA device -1 is not available");
  // Even an empty buffer may not claim a device that does not exist.
  expect_error<DeviceError>([&] { Buffer::allocate(0, Device::cuda(count)); }, "is not available");
  if (count == 0) {
    expect_error<DeviceError>([] { Buffer::allocate(16, Device::cuda()); },
                              "CUDA device 0 is not available (0 CUDA device(s) visible)");
    return;
  }

  const std::vector<uint8_t> src = iota_bytes(256);
  Buffer device = Buffer::allocate(src.size(), Device::cuda());
  ASSERT_NE(device.data(), nullptr);
  EXPECT_EQ(device.device(), Device::cuda());
  device.copy_from(src.data(), Device::cpu(), src.size());

  Buffer host = Buffer::allocate(src.size());
  copy_bytes(host.data(), Device::cpu(), device.data(), Device::cuda(), src.size());
  EXPECT_EQ(std::memcmp(host.data(), src.data(), src.size()), 0);

  // device -> device, then zero the source and read both back.
  Buffer device2 = Buffer::allocate(src.size(), Device::cuda());
  device2.copy_from(device.data(), Device::cuda(), src.size());
  device.zero();
  std::vector<uint8_t> back(src.size(), 0xff);
  copy_bytes(back.data(), Device::cpu(), device.data(), Device::cuda(), back.size());
  EXPECT_EQ(back, std::vector<uint8_t>(src.size(), 0));
  copy_bytes(back.data(), Device::cpu(), device2.data(), Device::cuda(), back.size());
  EXPECT_EQ(back, src);

  const Tensor t(const_cast<uint8_t*>(src.data()), DType::kInt32, {64});
  const Buffer copied = Buffer::copy_of(t, Device::cuda());
  EXPECT_EQ(copied.view(DType::kInt32, {64}).device(), Device::cuda());
  copy_bytes(back.data(), Device::cpu(), copied.data(), Device::cuda(), back.size());
  EXPECT_EQ(back, src);
}

}  // namespace
}  // namespace lorart

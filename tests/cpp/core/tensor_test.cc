#include "core/tensor.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <string>
#include <typeinfo>
#include <vector>

#include "core/errors.h"
#include "test_util.h"

namespace lorart {
namespace {

using testing_util::expect_error;

TEST(TensorTest, ContiguousShapeStridesAndSizes) {
  std::vector<uint16_t> storage(24);
  const Tensor t(storage.data(), DType::kFloat16, {2, 3, 4});
  EXPECT_EQ(t.data(), storage.data());
  EXPECT_EQ(t.dtype(), DType::kFloat16);
  EXPECT_EQ(t.device(), Device::cpu());
  EXPECT_EQ(t.dim(), 3);
  EXPECT_EQ(t.size(0), 2);
  EXPECT_EQ(t.size(1), 3);
  EXPECT_EQ(t.size(2), 4);
  EXPECT_EQ(t.size(-1), 4);
  EXPECT_EQ(t.size(-3), 2);
  EXPECT_EQ(t.stride(0), 12);
  EXPECT_EQ(t.stride(1), 4);
  EXPECT_EQ(t.stride(2), 1);
  EXPECT_EQ(t.stride(-2), 4);
  EXPECT_EQ(t.numel(), 24);
  EXPECT_EQ(t.nbytes(), 48u);
  EXPECT_TRUE(t.is_contiguous());
  EXPECT_TRUE(t.defined());
  EXPECT_EQ(t.shape_str(), "[2, 3, 4]");
  EXPECT_EQ(t.describe(), "[2, 3, 4] float16 cpu");
}

TEST(TensorTest, DescribeNamesDtypeAndDevice) {
  const Tensor t(nullptr, DType::kInt64, {5}, Device::cuda(1));
  EXPECT_EQ(t.describe(), "[5] int64 cuda:1");
  EXPECT_EQ(t.nbytes(), 40u);
  EXPECT_EQ(Tensor(nullptr, DType::kInt32, {}).describe(), "[] int32 cpu");
}

TEST(TensorTest, ScalarAndEmptyTensors) {
  float value = 1.0f;
  const Tensor scalar(&value, DType::kFloat32, {});
  EXPECT_EQ(scalar.dim(), 0);
  EXPECT_EQ(scalar.numel(), 1);
  EXPECT_EQ(scalar.nbytes(), 4u);
  EXPECT_TRUE(scalar.is_contiguous());

  const Tensor empty(nullptr, DType::kFloat32, {3, 0});
  EXPECT_EQ(empty.numel(), 0);
  EXPECT_EQ(empty.nbytes(), 0u);
  EXPECT_TRUE(empty.defined());
  EXPECT_FALSE(Tensor().defined());  // rank 0 means one element, and there is no pointer
}

TEST(TensorTest, AxisOutOfRangeThrows) {
  std::vector<float> storage(6);
  const Tensor t(storage.data(), DType::kFloat32, {2, 3});
  expect_error<InvalidArgument>([&] { t.size(2); }, "axis 2 out of range for [2, 3] float32 cpu");
  expect_error<InvalidArgument>([&] { t.size(-3); }, "axis -3 out of range");
  expect_error<InvalidArgument>([&] { t.stride(5); }, "axis 5 out of range");
}

TEST(TensorTest, RejectsBadRankAndNegativeExtent) {
  expect_error<InvalidArgument>([] { Tensor(nullptr, DType::kFloat32, {1, 1, 1, 1, 1, 1, 1}); },
                                "tensor rank must be in [0, 6], got 7");
  expect_error<InvalidArgument>([] { Tensor(nullptr, DType::kFloat32, {2, -1}); },
                                "tensor extent must be >= 0, got -1");
  const int64_t shape[2] = {2, -3};
  const int64_t strides[2] = {1, 1};
  expect_error<InvalidArgument>([&] { Tensor(nullptr, DType::kFloat32, 2, shape, strides); },
                                "tensor extent must be >= 0, got -3");
  expect_error<InvalidArgument>([&] { Tensor(nullptr, DType::kFloat32, -1, shape, strides); },
                                "tensor rank must be in [0, 6], got -1");
}

TEST(TensorTest, ShapesOfMoreThanInt64MaxBytesAreRefused) {
  // 2^31 * 2^31 * 4 bytes wraps to 0: the view check of a Buffer would pass it.
  expect_error<InvalidArgument>(
      [] { Tensor(nullptr, DType::kFloat32, {int64_t{1} << 31, int64_t{1} << 31, 4}); },
      "tensor [2147483648, 2147483648, 4] float32 cpu would hold more than 9223372036854775807 "
      "bytes");
  // The element count fits; the bytes do not.
  expect_error<InvalidArgument>([] { Tensor(nullptr, DType::kInt64, {int64_t{1} << 61}); },
                                "would hold more than");
  const int64_t shape[2] = {int64_t{1} << 40, int64_t{1} << 30};
  const int64_t strides[2] = {1, 1};
  expect_error<InvalidArgument>([&] { Tensor(nullptr, DType::kFloat16, 2, shape, strides); },
                                "would hold more than");
  // Empty tensors hold 0 bytes whatever the other extents.
  EXPECT_EQ(Tensor(nullptr, DType::kFloat32, {int64_t{1} << 62, 0, int64_t{1} << 62}).nbytes(), 0u);
  EXPECT_EQ(Tensor(nullptr, DType::kFloat32, {int64_t{1} << 60}).nbytes(), uint64_t{1} << 62);
}

TEST(TensorTest, StridedViewsAndContiguity) {
  std::vector<float> storage(6);
  // The transpose of a contiguous [2, 3]: shape [3, 2], strides [1, 3].
  const int64_t shape[2] = {3, 2};
  const int64_t transposed[2] = {1, 3};
  const Tensor t(storage.data(), DType::kFloat32, 2, shape, transposed);
  EXPECT_EQ(t.stride(0), 1);
  EXPECT_EQ(t.stride(1), 3);
  EXPECT_EQ(t.numel(), 6);
  EXPECT_FALSE(t.is_contiguous());

  const int64_t row_major[2] = {2, 1};
  EXPECT_TRUE(Tensor(storage.data(), DType::kFloat32, 2, shape, row_major).is_contiguous());

  // Every second row of a [6, 1] array: same shape as a contiguous [3, 1], but not contiguous.
  const int64_t col_shape[2] = {3, 1};
  const int64_t col_strides[2] = {2, 1};
  EXPECT_FALSE(Tensor(storage.data(), DType::kFloat32, 2, col_shape, col_strides).is_contiguous());

  // A size-1 axis may carry any stride.
  const int64_t unit_shape[2] = {1, 6};
  const int64_t odd_strides[2] = {99, 1};
  EXPECT_TRUE(Tensor(storage.data(), DType::kFloat32, 2, unit_shape, odd_strides).is_contiguous());

  // An empty tensor is contiguous whatever its strides.
  const int64_t empty_shape[2] = {0, 3};
  EXPECT_TRUE(Tensor(storage.data(), DType::kFloat32, 2, empty_shape, transposed).is_contiguous());
}

TEST(TensorTest, ReshapeKeepsMemory) {
  std::vector<int32_t> storage(12);
  const Tensor t(storage.data(), DType::kInt32, {3, 4}, Device::cpu());
  const Tensor r = t.reshape({2, 2, 3});
  EXPECT_EQ(r.data(), storage.data());
  EXPECT_EQ(r.dtype(), DType::kInt32);
  EXPECT_EQ(r.shape_str(), "[2, 2, 3]");
  EXPECT_EQ(r.stride(0), 6);
  EXPECT_EQ(r.stride(1), 3);
  EXPECT_EQ(r.stride(2), 1);
  EXPECT_EQ(t.reshape({12}).size(0), 12);

  const Tensor on_gpu(nullptr, DType::kFloat32, {2, 3}, Device::cuda(0));
  EXPECT_EQ(on_gpu.reshape({6}).device(), Device::cuda(0));
}

TEST(TensorTest, ReshapeErrors) {
  std::vector<float> storage(6);
  const Tensor t(storage.data(), DType::kFloat32, {2, 3});
  expect_error<InvalidArgument>([&] { t.reshape({4, 2}); },
                                "cannot reshape [2, 3] float32 cpu to [4, 2]: 6 elements vs 8");
  expect_error<InvalidArgument>([&] { t.reshape({5}); }, "6 elements vs 5");

  const int64_t shape[2] = {3, 2};
  const int64_t strides[2] = {1, 3};
  const Tensor transposed(storage.data(), DType::kFloat32, 2, shape, strides);
  expect_error<InvalidArgument>([&] { transposed.reshape({6}); },
                                "reshape needs a contiguous tensor, got [3, 2] float32 cpu");
}

TEST(TensorTest, SliceRowsOffsetsThePointer) {
  std::vector<float> storage(12);
  for (size_t i = 0; i < storage.size(); ++i) storage[i] = static_cast<float>(i);
  const Tensor t(storage.data(), DType::kFloat32, {4, 3});
  const Tensor rows = t.slice_rows(1, 3);
  EXPECT_EQ(rows.data(), storage.data() + 3);
  EXPECT_EQ(rows.data_as<float>()[0], 3.0f);
  EXPECT_EQ(rows.shape_str(), "[2, 3]");
  EXPECT_EQ(rows.stride(0), 3);
  EXPECT_TRUE(rows.is_contiguous());

  const Tensor empty = t.slice_rows(4, 4);
  EXPECT_EQ(empty.size(0), 0);
  EXPECT_EQ(empty.data(), storage.data() + 12);
  EXPECT_EQ(t.slice_rows(0, 4).data(), storage.data());

  // The offset is in bytes of the dtype, along the row stride (not the row length).
  std::vector<uint16_t> halves(20);
  const int64_t shape[2] = {4, 3};
  const int64_t strides[2] = {5, 1};
  const Tensor padded(halves.data(), DType::kFloat16, 2, shape, strides);
  EXPECT_EQ(padded.slice_rows(2, 4).data(), halves.data() + 10);
}

TEST(TensorTest, SliceRowsRangeErrors) {
  std::vector<float> storage(12);
  const Tensor t(storage.data(), DType::kFloat32, {4, 3});
  expect_error<InvalidArgument>([&] { t.slice_rows(2, 5); },
                                "slice_rows [2, 5) out of range for [4, 3] float32 cpu");
  expect_error<InvalidArgument>([&] { t.slice_rows(-1, 2); }, "slice_rows [-1, 2) out of range");
  expect_error<InvalidArgument>([&] { t.slice_rows(3, 2); }, "slice_rows [3, 2) out of range");
  float scalar = 0.0f;
  expect_error<InvalidArgument>([&] { Tensor(&scalar, DType::kFloat32, {}).slice_rows(0, 0); },
                                "out of range for [] float32 cpu");
}

}  // namespace
}  // namespace lorart

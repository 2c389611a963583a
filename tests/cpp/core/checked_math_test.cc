#include "core/checked_math.h"

#include <gtest/gtest.h>

#include <cstdint>

#include "core/errors.h"
#include "test_util.h"

namespace lorart {
namespace {

using testing_util::expect_error;

constexpr int64_t kBig = int64_t{1} << 51;  // the num_kv_blocks of issue 8

TEST(CheckedMathTest, ExactResultsWithinRange) {
  EXPECT_EQ(checked_mul(3, 7, "x"), 21);
  EXPECT_EQ(checked_mul(0, kInt64Max, "x"), 0);
  EXPECT_EQ(checked_mul(kInt64Max, 1, "x"), kInt64Max);
  EXPECT_EQ(checked_add(kInt64Max - 1, 1, "x"), kInt64Max);
  EXPECT_EQ(checked_product({3, 2, 16, 64, 4}, "x"), 3 * 2 * 16 * 64 * 4);
  EXPECT_EQ(checked_product({}, "x"), 1);
  // A zero factor makes the product 0 even where a prefix of it overflows.
  EXPECT_EQ(checked_product({kBig, kBig, 0}, "x"), 0);
}

TEST(CheckedMathTest, OverflowNamesTheQuantityOperandsAndLimit) {
  expect_error<InvalidArgument>([] { checked_mul(kBig, 1 << 13, "KV cache bytes"); },
                                "KV cache bytes = 2251799813685248 * 8192 overflows int64 (limit "
                                "9223372036854775807)");
  expect_error<InvalidArgument>([] { checked_add(kInt64Max, 1, "total"); },
                                "total = 9223372036854775807 + 1 overflows int64");
  // The product of issue 8: 3 layers * 2 * 2^51 blocks * 16 * 64 * 4 wraps to exactly 0 in size_t.
  expect_error<InvalidArgument>(
      [] { checked_product({3, 2, kBig, 16, 64, 4}, "KV cache bytes"); },
      "KV cache bytes = 3 * 2 * 2251799813685248 * 16 * 64 * 4 overflows int64 (limit "
      "9223372036854775807)");
}

TEST(CheckedMathTest, NegativeSizesAreRefused) {
  expect_error<InvalidArgument>([] { checked_mul(-2, 3, "rows"); }, "rows: negative size -2");
  expect_error<InvalidArgument>([] { checked_add(2, -3, "rows"); }, "rows: negative size -3");
  expect_error<InvalidArgument>([] { checked_product({2, -1, 0}, "rows"); },
                                "rows: negative size -1");
}

}  // namespace
}  // namespace lorart

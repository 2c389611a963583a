// CUDA-graph buckets and the choice of a step's graph (pure host logic).
#include "runtime/cuda_graph_plan.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <string>
#include <vector>

#include "core/errors.h"
#include "test_util.h"

namespace lorart {
namespace {

using testing_util::expect_error;
using Sizes = std::vector<int64_t>;

TEST(CudaGraphPlanTest, BucketsArePowersOfTwoThenTheMaximum) {
  EXPECT_EQ(cuda_graph_batch_sizes(1), (Sizes{1}));
  EXPECT_EQ(cuda_graph_batch_sizes(2), (Sizes{1, 2}));
  EXPECT_EQ(cuda_graph_batch_sizes(8), (Sizes{1, 2, 4, 8}));
  EXPECT_EQ(cuda_graph_batch_sizes(12), (Sizes{1, 2, 4, 8, 12}));
  EXPECT_EQ(cuda_graph_batch_sizes(17), (Sizes{1, 2, 4, 8, 16, 17}));
  const Sizes largest = cuda_graph_batch_sizes(int64_t{1} << 16);
  EXPECT_EQ(largest.size(), 17u);
  EXPECT_EQ(largest.back(), int64_t{1} << 16);
  expect_error<InvalidArgument>([] { cuda_graph_batch_sizes(0); },
                                "max_batch_size must be in [1, 65536], got 0");
  expect_error<InvalidArgument>([] { cuda_graph_batch_sizes(65537); },
                                "max_batch_size must be in [1, 65536], got 65537");
}

GraphStepShape decode(int64_t seqs, int64_t kv_len = 100) { return {seqs, seqs, seqs, kv_len}; }

TEST(CudaGraphPlanTest, ADecodeStepUsesTheSmallestBucketThatHoldsIt) {
  const Sizes buckets = cuda_graph_batch_sizes(48);  // 1 2 4 8 16 32 48
  const int64_t expected[][2] = {{1, 1},  {2, 2},   {3, 4},   {4, 4},   {5, 8},
                                 {9, 16}, {17, 32}, {32, 32}, {33, 48}, {48, 48}};
  for (const auto& e : expected) {
    const GraphChoice c = choose_cuda_graph(buckets, decode(e[0]), 0);
    EXPECT_TRUE(c.capturable) << e[0];
    EXPECT_EQ(c.batch_size, e[1]) << e[0];
    EXPECT_EQ(c.padding, e[1] - e[0]) << e[0];
  }
}

TEST(CudaGraphPlanTest, OtherStepsRunEagerlyAndSayWhy) {
  const Sizes buckets = cuda_graph_batch_sizes(16);
  auto reason = [&](GraphStepShape s, int64_t max_kv = 0) {
    const GraphChoice c = choose_cuda_graph(buckets, s, max_kv);
    EXPECT_FALSE(c.capturable);
    EXPECT_EQ(c.batch_size, 0);
    EXPECT_EQ(c.padding, 0);
    return std::string(c.reason);
  };
  EXPECT_EQ(reason(decode(0)), "an empty step");
  EXPECT_EQ(reason({4, 9, 4, 100}), "not decode-only (a prefill chunk or a multi-token step)");
  EXPECT_EQ(reason({4, 4, 5, 100}), "not one logits row per sequence");
  EXPECT_EQ(reason(decode(17)), "more sequences than the largest bucket");
  EXPECT_EQ(reason(decode(4, 4097), 4096), "a context longer than the graphs were captured for");
  EXPECT_TRUE(choose_cuda_graph(buckets, decode(4, 4096), 4096).capturable);
  EXPECT_EQ(std::string(choose_cuda_graph({}, decode(1), 0).reason), "no CUDA graph buckets");
}

}  // namespace
}  // namespace lorart

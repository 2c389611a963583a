// GPU tests of cuda::lora_gemm (csrc/kernels/cuda/lora/) through ops::lora_gemm_slices: mixed
// ranks (including ranks above the kernel's 64-rank staging block and ranks that are not
// multiples of a warp), float32 / float16 / bfloat16 adapters, base tokens and slots that leave a
// module alone, runs that cross token tiles, the fused qkv slices with overlapping columns
// (fused qkv + q on one adapter) and an odd column offset, input widths with a partial last chunk
// against the CPU op on the same inputs; poisoned columns outside the slices stay untouched; and
// batch invariance (a token's row is bitwise the same alone, in a decode batch and in a prefill
// batch). Each skips, saying so, without a GPU.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "core/dtype.h"
#include "core/errors.h"
#include "core/stream.h"
#include "kernels/cuda/cuda_test_util.h"
#include "kernels/exec_context.h"
#include "kernels/ops.h"
#include "test_util.h"

namespace lorart {
namespace {

using testing_util::DeviceArray;
using testing_util::random_floats;

// One adapter's pair for one slice: host bytes in `dtype` and their device copy.
struct HostPair {
  std::vector<uint8_t> a, b_t;
  DType dtype;
  int32_t rank;
};

std::vector<uint8_t> as_dtype(const std::vector<float>& f, DType dtype) {
  std::vector<uint8_t> bytes(std::max<size_t>(1, f.size() * dtype_size(dtype)));
  convert_floats(f.data(), DType::kFloat32, bytes.data(), dtype, f.size());
  return bytes;
}

HostPair make_pair(int32_t rank, int64_t in, int64_t out, DType dtype, uint32_t seed) {
  return {as_dtype(random_floats(rank * in, seed, -0.1f, 0.1f), dtype),
          as_dtype(random_floats(rank * out, seed + 1, -0.1f, 0.1f), dtype), dtype, rank};
}

struct Problem {
  int64_t tokens, in, width;  // y is [tokens, width]
  std::vector<LoraSlice> slices;
  std::vector<std::vector<HostPair>> pairs;  // [slot][slice]
  std::vector<LoraRun> runs;
};

// Runs the op on `device` and returns y.
std::vector<float> run(const Problem& pb, const std::vector<float>& x, const std::vector<float>& y0,
                       bool cuda) {
  const int32_t num_slots = static_cast<int32_t>(pb.pairs.size());
  const int64_t per_slot = static_cast<int64_t>(pb.slices.size());
  std::vector<DeviceArray<uint8_t>> device_weights;
  std::vector<LoraPair> table(num_slots * per_slot);
  for (int32_t s = 0; s < num_slots; ++s) {
    for (int64_t i = 0; i < per_slot; ++i) {
      const HostPair& hp = pb.pairs[s][i];
      LoraPair& p = table[s * per_slot + i];
      p.dtype = hp.dtype;
      p.rank = hp.rank;
      if (cuda) {
        device_weights.emplace_back(hp.a);
        p.a = device_weights.back().data();
        device_weights.emplace_back(hp.b_t);
        p.b_t = device_weights.back().data();
      } else {
        p.a = hp.a.data();
        p.b_t = hp.b_t.data();
      }
    }
  }
  std::vector<LoraSlice> slices = pb.slices;
  for (int64_t i = 0; i < per_slot; ++i) slices[i].pair_index = i;
  int32_t max_rank = 1;
  for (const auto& slot : pb.pairs) {
    for (const HostPair& hp : slot) max_rank = std::max(max_rank, hp.rank);
  }
  ops::LoraBatch batch;
  batch.runs = pb.runs.data();
  batch.num_runs = static_cast<int32_t>(pb.runs.size());
  batch.pairs = table.data();
  batch.num_slots = num_slots;
  batch.pairs_per_slot = per_slot;
  if (!cuda) {
    const ExecContext ctx = ExecContext::cpu();
    std::vector<float> y = y0;
    std::vector<float> scratch(ops::lora_scratch_floats(ctx, pb.tokens, max_rank, pb.in, 1));
    ops::lora_gemm_slices(
        ctx, Tensor(const_cast<float*>(x.data()), DType::kFloat32, {pb.tokens, pb.in}),
        Tensor(y.data(), DType::kFloat32, {pb.tokens, pb.width}), slices.data(),
        static_cast<int32_t>(slices.size()), batch,
        Tensor(scratch.data(), DType::kFloat32, {static_cast<int64_t>(scratch.size())}));
    return y;
  }
  const Device gpu = Device::cuda(0);
  const ExecContext ctx{gpu};
  DeviceArray<LoraRun> runs(pb.runs);
  DeviceArray<LoraPair> pairs(table);
  batch.device_runs = runs.data();
  batch.device_pairs = pairs.data();
  DeviceArray<float> dx(x), dy(y0);
  const int64_t scratch_floats = ops::lora_scratch_floats(ctx, pb.tokens, max_rank, pb.in,
                                                          static_cast<int32_t>(slices.size()));
  auto scratch = DeviceArray<float>::poisoned(std::max<int64_t>(1, scratch_floats));
  ops::lora_gemm_slices(ctx, Tensor(dx.data(), DType::kFloat32, {pb.tokens, pb.in}, gpu),
                        Tensor(dy.data(), DType::kFloat32, {pb.tokens, pb.width}, gpu),
                        slices.data(), static_cast<int32_t>(slices.size()), batch,
                        Tensor(scratch.data(), DType::kFloat32, {scratch.size()}, gpu));
  synchronize_stream(gpu, nullptr);
  return dy.to_host();
}

// Compares the CUDA result with the CPU op's: both accumulate in float32 in different orders,
// so the bound is relative to the magnitude of the terms (|x| <= 1, |a|, |b| <= 0.1).
void expect_matches_cpu(const Problem& pb, uint32_t seed) {
  const std::vector<float> x = random_floats(pb.tokens * pb.in, seed);
  std::vector<float> y0 = random_floats(pb.tokens * pb.width, seed + 1);
  const std::vector<float> want = run(pb, x, y0, false);
  const std::vector<float> got = run(pb, x, y0, true);
  const float tol = 1e-5f * static_cast<float>(pb.in) * 0.01f + 1e-5f;
  for (size_t i = 0; i < want.size(); ++i) {
    ASSERT_NEAR(got[i], want[i], tol) << "token " << i / pb.width << " column " << i % pb.width;
  }
}

TEST(CudaLoraGemm, MixedRanksDtypesAndBaseTokensMatchTheCpuOp) {
  LORART_REQUIRE_GPU();
  Problem pb{40, 1000, 700, {{0, 0, 700}}, {}, {}};
  const DType dtypes[] = {DType::kBFloat16, DType::kFloat16, DType::kFloat32, DType::kBFloat16};
  const int32_t ranks[] = {8, 0, 77, 33};  // slot 1 leaves the module alone; 77 > one staged block
  for (int s = 0; s < 4; ++s)
    pb.pairs.push_back({make_pair(ranks[s], 1000, 700, dtypes[s], 10 + s)});
  // Runs cross the 4- and 16-token tiles; tokens 0-2, 20-21 and 39 are base tokens (no run).
  pb.runs = {{3, 5, 0}, {5, 6, 2}, {6, 19, 3}, {19, 20, 1}, {22, 39, 2}};
  expect_matches_cpu(pb, 1);
  pb.tokens = 300;  // the prefill tile
  pb.runs = {{0, 7, 3}, {7, 150, 0}, {151, 299, 2}};
  expect_matches_cpu(pb, 2);
}

TEST(CudaLoraGemm, FusedQkvSlicesWithOverlappingColumnsMatchTheCpuOp) {
  LORART_REQUIRE_GPU();
  // fused qkv [0, 96), q [0, 64), k [64, 80), v [81, 97): an odd offset, and v's last column
  // beyond fused qkv's. Column 80 and 97..99 belong to no slice and must stay untouched.
  Problem pb{24, 520, 100, {{0, 0, 96}, {0, 0, 64}, {0, 64, 16}, {0, 81, 16}}, {}, {}};
  for (int s = 0; s < 3; ++s) {
    std::vector<HostPair> slot;
    for (size_t i = 0; i < pb.slices.size(); ++i) {
      const int32_t rank = (s == 1 && i == 0) ? 0 : static_cast<int32_t>(4 + 13 * s + 5 * i);
      slot.push_back(make_pair(rank, 520, pb.slices[i].out,
                               s == 2 ? DType::kFloat32 : DType::kBFloat16, 100 + 10 * s + i));
    }
    pb.pairs.push_back(slot);
  }
  pb.runs = {{0, 9, 0}, {9, 10, 1}, {10, 24, 2}};
  expect_matches_cpu(pb, 3);
}

TEST(CudaLoraGemm, ATokensRowDoesNotDependOnItsBatch) {
  LORART_REQUIRE_GPU();
  const int64_t in = 4096, out = 1024;
  std::vector<std::vector<HostPair>> pairs;
  for (int s = 0; s < 8; ++s) {
    pairs.push_back({make_pair(8 << (s % 4), in, out, DType::kBFloat16, 200 + s)});
  }
  // Token 0 uses slot 5; the batches put it alone, among 64 decode tokens, and inside a long run
  // of a 400-token prefill step (other tile size, other runs).
  const std::vector<float> x_row = random_floats(in, 7);
  auto row_of = [&](int64_t tokens, const std::vector<LoraRun>& runs, int64_t at) {
    Problem pb{tokens, in, out, {{0, 0, out}}, pairs, runs};
    std::vector<float> x = random_floats(tokens * in, 8);
    std::copy(x_row.begin(), x_row.end(), x.begin() + at * in);
    const std::vector<float> y0(tokens * out, 0.5f);
    const std::vector<float> y = run(pb, x, y0, true);
    return std::vector<float>(y.begin() + at * out, y.begin() + (at + 1) * out);
  };
  const std::vector<float> alone = row_of(1, {{0, 1, 5}}, 0);
  std::vector<LoraRun> decode;
  for (int32_t t = 0; t < 64; ++t) decode.push_back({t, t + 1, t == 37 ? 5 : t % 8});
  const std::vector<float> in_decode = row_of(64, decode, 37);
  const std::vector<float> in_prefill =
      row_of(400, {{0, 100, 2}, {100, 380, 5}, {380, 400, 1}}, 201);
  EXPECT_EQ(std::memcmp(alone.data(), in_decode.data(), out * sizeof(float)), 0);
  EXPECT_EQ(std::memcmp(alone.data(), in_prefill.data(), out * sizeof(float)), 0);
}

TEST(CudaLoraGemm, RefusesHostOnlyTablesAndSmallScratch) {
  LORART_REQUIRE_GPU();
  const Device gpu = Device::cuda(0);
  const ExecContext ctx{gpu};
  DeviceArray<float> x(std::vector<float>(4 * 600, 1.0f)), y(std::vector<float>(4 * 32, 0.0f));
  const HostPair hp = make_pair(8, 600, 32, DType::kFloat32, 1);
  DeviceArray<uint8_t> a(hp.a), b(hp.b_t);
  const LoraPair pair{a.data(), b.data(), DType::kFloat32, 8, nullptr};
  const LoraRun runs[] = {{0, 4, 0}};
  ops::LoraBatch batch;
  batch.runs = runs;
  batch.num_runs = 1;
  batch.pairs = &pair;
  batch.num_slots = 1;
  batch.pairs_per_slot = 1;
  DeviceArray<float> scratch(
      std::vector<float>(4 * 8, 0.0f));  // CPU-sized: CUDA needs 3 chunks' partials
  const Tensor tx(x.data(), DType::kFloat32, {4, 600}, gpu),
      ty(y.data(), DType::kFloat32, {4, 32}, gpu);
  const Tensor ts(scratch.data(), DType::kFloat32, {scratch.size()}, gpu);
  EXPECT_THROW(ops::lora_gemm(ctx, tx, ty, 32, batch, 0, ts), InvalidArgument);  // no device table
  DeviceArray<LoraRun> druns(std::vector<LoraRun>(runs, runs + 1));
  DeviceArray<LoraPair> dpairs(std::vector<LoraPair>{pair});
  batch.device_runs = druns.data();
  batch.device_pairs = dpairs.data();
  EXPECT_THROW(ops::lora_gemm(ctx, tx, ty, 32, batch, 0, ts), InvalidArgument);  // scratch
}

}  // namespace
}  // namespace lorart

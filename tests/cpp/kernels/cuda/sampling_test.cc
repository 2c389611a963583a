// CUDA ops::sample against the CPU sampler (the reference): the same tokens and RNG states for
// every mode (greedy, temperature, top-k, top-p), seeds, -inf masks, ties, non-finite rows and
// per-row vocabularies, over several steps (each step's states feed the next), with more rows
// than the launch has blocks. Tokens and states must match exactly: both backends sum the same
// float weights in the same order in double. They could differ only where CUDA's double exp and
// glibc's round a weight to different floats and u lands in that one-ulp sliver (see
// sampling.cu); a seed that hit it would fail here, naming the row. log p(token) is summed in a
// different (fixed) order on the GPU, so it is compared within 1e-6 relative (double sums of <=
// 2^17 terms rounded to float).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "core/errors.h"
#include "kernels/cuda/cuda_test_util.h"
#include "kernels/ops.h"
#include "test_util.h"

namespace lorart {
namespace {

using testing_util::DeviceArray;
using testing_util::expect_error;

constexpr float kInf = std::numeric_limits<float>::infinity();

ExecContext cuda_context() { return {Device::cuda(0), nullptr, 0, Precision::kFloat32}; }

struct Case {
  std::vector<float> logits;  // [n_rows, vocab]
  int64_t n_rows = 0, vocab = 0;
  std::vector<int32_t> rows;
  std::vector<SamplingParams> params;
  std::vector<uint64_t> states;
};

// Random logits with the awkward rows mixed in: masks, ties, all -inf, NaN, +inf.
Case make_case(uint64_t seed, int64_t vocab, int64_t n_rows, int32_t n_samples) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> unit(0.0f, 1.0f);
  Case c;
  c.n_rows = n_rows;
  c.vocab = vocab;
  c.logits.resize(static_cast<size_t>(n_rows * vocab));
  for (int64_t r = 0; r < n_rows; ++r) {
    float* row = c.logits.data() + r * vocab;
    const float scale = 0.5f + 4.0f * unit(gen);
    const int kind = static_cast<int>(r % 8);
    for (int64_t j = 0; j < vocab; ++j) {
      float v = scale * normal(gen);
      if (kind == 1) v = std::round(v);                                   // many ties
      if (kind == 2 && unit(gen) < 0.4f) v = -kInf;                       // a mask
      if (kind == 3) v = (j % 3 == 0) ? 0.0f : -0.0f;                     // signed zeros tie
      if (kind == 4) v = -kInf;                                           // everything masked
      if (kind == 5 && unit(gen) < 0.3f) v = -80.0f * unit(gen) * scale;  // underflowing tails
      row[j] = v;
    }
    if (kind == 6 && vocab > 1) row[vocab / 2] = std::nanf("");
    if (kind == 7 && vocab > 2) row[vocab - 2] = kInf;
  }
  static const int32_t kTopK[] = {0, 0, 1, 2, 5, 50, 1000};
  static const float kTopP[] = {1.0f, 1.0f, 0.9f, 0.5f, 0.01f, 0.999999f};
  static const float kTemp[] = {0.0f, 1.0f, 0.7f, 2.0f, 0.05f, 1e-30f};
  for (int32_t i = 0; i < n_samples; ++i) {
    c.rows.push_back(static_cast<int32_t>(gen() % static_cast<uint64_t>(n_rows)));
    SamplingParams sp{};
    sp.top_k = kTopK[gen() % 7];
    sp.top_p = kTopP[gen() % 6];
    sp.temperature = kTemp[gen() % 6];
    // A third of the rows have a smaller vocabulary of their own (an adapter's).
    sp.vocab = gen() % 3 == 0 ? 1 + static_cast<int64_t>(gen() % static_cast<uint64_t>(vocab)) : 0;
    c.params.push_back(sp);
    c.states.push_back(gen());
  }
  return c;
}

struct Result {
  std::vector<int32_t> tokens;
  std::vector<float> log_probs;
  std::vector<uint64_t> states;
};

Result run_cpu(const Case& c, std::vector<uint64_t> states) {
  Result out;
  const auto n = static_cast<int64_t>(c.rows.size());
  out.tokens.assign(static_cast<size_t>(n), 0);
  out.log_probs.assign(static_cast<size_t>(n), 0.0f);
  std::vector<std::pair<float, int32_t>> scratch(static_cast<size_t>(c.vocab));
  std::vector<float> logits = c.logits;
  std::vector<int32_t> rows = c.rows;
  ops::sample(ExecContext::cpu(), Tensor(logits.data(), DType::kFloat32, {c.n_rows, c.vocab}),
              Tensor(rows.data(), DType::kInt32, {n}), c.params.data(), states.data(),
              Tensor(out.tokens.data(), DType::kInt32, {n}),
              Tensor(out.log_probs.data(), DType::kFloat32, {n}), scratch.data());
  out.states = states;
  return out;
}

Result run_gpu(const Case& c, const std::vector<uint64_t>& states, bool log_probs) {
  const ExecContext ctx = cuda_context();
  const auto n = static_cast<int64_t>(c.rows.size());
  DeviceArray<float> logits(c.logits);
  DeviceArray<int32_t> rows(c.rows);
  DeviceArray<SamplingParams> params(c.params);
  DeviceArray<uint64_t> rng(states);
  // Poison values no correct run writes (-1 and NaN are real outputs).
  DeviceArray<int32_t> tokens(std::vector<int32_t>(static_cast<size_t>(n), 0x7f7f7f7f));
  DeviceArray<float> lp(std::vector<float>(static_cast<size_t>(n), 12345.0f));
  const int64_t ws_bytes = ops::sample_workspace_bytes(ctx, n, c.vocab);
  auto ws = DeviceArray<uint8_t>::poisoned(ws_bytes);
  ops::SampleDeviceArgs dev;
  dev.params = params.data();
  dev.rng_states = rng.data();
  dev.workspace = ws.data();
  dev.workspace_bytes = ws_bytes;
  ops::sample(ctx, Tensor(logits.data(), DType::kFloat32, {c.n_rows, c.vocab}, ctx.device),
              Tensor(rows.data(), DType::kInt32, {n}, ctx.device), c.params.data(), nullptr,
              Tensor(tokens.data(), DType::kInt32, {n}, ctx.device),
              log_probs ? Tensor(lp.data(), DType::kFloat32, {n}, ctx.device) : Tensor(), nullptr,
              dev);
  Result out{tokens.to_host(), lp.to_host(), rng.to_host()};
  if (!log_probs) {
    for (float v : out.log_probs) EXPECT_EQ(v, 12345.0f) << "log_probs written though not asked";
  }
  return out;
}

void expect_same(const Case& c, const Result& cpu, const Result& gpu, bool log_probs) {
  for (size_t i = 0; i < c.rows.size(); ++i) {
    const SamplingParams& sp = c.params[i];
    SCOPED_TRACE(::testing::Message()
                 << "sample " << i << " row " << c.rows[i] << " top_k " << sp.top_k << " top_p "
                 << sp.top_p << " temperature " << sp.temperature << " vocab " << sp.vocab);
    EXPECT_EQ(gpu.tokens[i], cpu.tokens[i]);
    EXPECT_EQ(gpu.states[i], cpu.states[i]);
    if (!log_probs) continue;
    const float a = gpu.log_probs[i], b = cpu.log_probs[i];
    if (std::isnan(b)) {
      EXPECT_TRUE(std::isnan(a)) << a;
    } else {
      EXPECT_NEAR(a, b, 1e-6f * std::max(1.0f, std::fabs(b)));
    }
  }
}

TEST(CudaSamplingTest, MatchesTheCpuSamplerOverSteps) {
  LORART_REQUIRE_GPU();
  struct Shape {
    int64_t vocab, rows;
    int32_t samples;
  };
  const Shape shapes[] = {{1, 3, 5}, {7, 16, 40}, {1000, 24, 100}, {50257, 16, 70}, {4096, 9, 3}};
  uint64_t seed = 1;
  for (const Shape& s : shapes) {
    for (int trial = 0; trial < 2; ++trial, ++seed) {
      SCOPED_TRACE(::testing::Message() << "vocab " << s.vocab << " seed " << seed);
      const Case c = make_case(seed, s.vocab, s.rows, s.samples);
      const bool log_probs = trial == 0;
      std::vector<uint64_t> cpu_states = c.states, gpu_states = c.states;
      for (int step = 0; step < 3; ++step) {
        const Result cpu = run_cpu(c, cpu_states);
        const Result gpu = run_gpu(c, gpu_states, log_probs);
        expect_same(c, cpu, gpu, log_probs);
        cpu_states = cpu.states;
        gpu_states = gpu.states;
      }
    }
  }
}

TEST(CudaSamplingTest, NonFiniteRowsGetMinusOneAndKeepTheirState) {
  LORART_REQUIRE_GPU();
  Case c;
  c.vocab = 5;
  c.n_rows = 3;
  c.logits = {0, 1, std::nanf(""), 2, 3, 0, 1, kInf, 2, 3, 0, -kInf, 1, 2, 3};
  c.rows = {0, 1, 2};
  c.params = {{0, 1.0f, 1.0f}, {3, 0.9f, 0.8f}, {0, 1.0f, 1.0f}};
  c.states = {11, 22, 33};
  const Result gpu = run_gpu(c, c.states, true);
  EXPECT_EQ(gpu.tokens[0], -1);
  EXPECT_EQ(gpu.tokens[1], -1);
  EXPECT_EQ(gpu.states[0], 11u);
  EXPECT_EQ(gpu.states[1], 22u);
  EXPECT_EQ(gpu.log_probs[0], 0.0f);
  EXPECT_GE(gpu.tokens[2], 0);
  EXPECT_NE(gpu.tokens[2], 1) << "a masked token was drawn";
  EXPECT_NE(gpu.states[2], 33u);
  expect_same(c, run_cpu(c, c.states), gpu, true);
}

// Host-side checks of the CUDA path: they run (and must fail cleanly) before any launch.
TEST(CudaSamplingTest, RefusesMissingDeviceArraysAndShortWorkspace) {
  const ExecContext ctx = cuda_context();
  float fake_logits = 0.0f;
  int32_t fake_rows = 0, fake_tokens = 0;
  SamplingParams params{0, 1.0f, 1.0f};
  const Tensor logits(&fake_logits, DType::kFloat32, {1, 1}, ctx.device);
  const Tensor rows(&fake_rows, DType::kInt32, {1}, ctx.device);
  const Tensor tokens(&fake_tokens, DType::kInt32, {1}, ctx.device);
  expect_error<InvalidArgument>(
      [&] { ops::sample(ctx, logits, rows, &params, nullptr, tokens, Tensor(), nullptr); },
      "needs the device copies of params and rng_states");
  ops::SampleDeviceArgs dev;
  uint64_t state = 0;
  alignas(256) static char fake_workspace[512];
  dev.params = &params;
  dev.rng_states = &state;
  dev.workspace = fake_workspace;
  dev.workspace_bytes = ops::sample_workspace_bytes(ctx, 1, 1) - 1;
  EXPECT_GT(ops::sample_workspace_bytes(ctx, 1, 1), 0);
  EXPECT_EQ(ops::sample_workspace_bytes(ExecContext::cpu(), 1, 1), 0);
  expect_error<InvalidArgument>(
      [&] { ops::sample(ctx, logits, rows, &params, nullptr, tokens, Tensor(), nullptr, dev); },
      "bytes of device workspace, got");
  dev.workspace = fake_workspace + 8;
  dev.workspace_bytes = 1 << 20;
  expect_error<InvalidArgument>(
      [&] { ops::sample(ctx, logits, rows, &params, nullptr, tokens, Tensor(), nullptr, dev); },
      "256-byte aligned");
}

}  // namespace
}  // namespace lorart

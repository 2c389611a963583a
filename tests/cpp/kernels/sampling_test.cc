// ops::sample: greedy, temperature, top-k, top-p, per-request RNG and log-probs.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <set>
#include <utility>
#include <vector>

#include "core/errors.h"
#include "kernels/ops.h"
#include "test_util.h"

namespace lorart {
namespace {

struct Sampler {
  explicit Sampler(uint64_t seed) : state(seed) {}
  int32_t operator()(const std::vector<float>& logits, SamplingParams params,
                     float* log_prob = nullptr) {
    scratch.resize(logits.size());
    int32_t row = 0, token = -1;
    float lp = 0.0f;
    ops::sample(ExecContext::cpu(),
                Tensor(const_cast<float*>(logits.data()), DType::kFloat32,
                       {1, static_cast<int64_t>(logits.size())}),
                Tensor(&row, DType::kInt32, {1}), &params, &state,
                Tensor(&token, DType::kInt32, {1}),
                log_prob != nullptr ? Tensor(&lp, DType::kFloat32, {1}) : Tensor(), scratch.data());
    if (log_prob != nullptr) *log_prob = lp;
    return token;
  }
  uint64_t state;
  std::vector<std::pair<float, int32_t>> scratch;
};

std::vector<double> softmax(const std::vector<float>& logits, double temperature = 1.0) {
  double top = logits[0];
  for (float l : logits) top = std::max<double>(top, l);
  std::vector<double> p(logits.size());
  double total = 0.0;
  for (size_t i = 0; i < logits.size(); ++i)
    total += p[i] = std::exp((logits[i] - top) / temperature);
  for (double& v : p) v /= total;
  return p;
}

std::vector<double> frequencies(Sampler& sampler, const std::vector<float>& logits,
                                SamplingParams params, int draws) {
  std::vector<double> counts(logits.size(), 0.0);
  for (int i = 0; i < draws; ++i) {
    const int32_t token = sampler(logits, params);
    EXPECT_GE(token, 0);
    EXPECT_LT(token, static_cast<int32_t>(logits.size()));
    if (token >= 0 && token < static_cast<int32_t>(logits.size())) counts[token] += 1.0;
  }
  for (double& c : counts) c /= draws;
  return counts;
}

TEST(SamplingTest, GreedyIsArgmaxWithTiesToTheLowestId) {
  const std::vector<float> logits = {1.0f, 3.0f, -2.0f, 3.0f, 2.5f};
  Sampler s(1);
  for (int i = 0; i < 20; ++i) {
    EXPECT_EQ(s(logits, SamplingParams{0, 1.0f, 0.0f}), 1) << "temperature 0";
    EXPECT_EQ(s(logits, SamplingParams{1, 1.0f, 1.0f}), 1) << "top_k 1";
    EXPECT_EQ(s(logits, SamplingParams{1, 0.5f, 5.0f}), 1) << "top_k 1, hot";
  }
  EXPECT_EQ(s({-5.0f, -7.0f, -6.0f}, SamplingParams{0, 1.0f, 0.0f}), 0);
  EXPECT_EQ(s({-7.0f, -6.0f, -5.0f}, SamplingParams{1, 1.0f, 1.0f}), 2);
  EXPECT_EQ(s({4.0f, 4.0f, 4.0f, 4.0f}, SamplingParams{0, 1.0f, 0.0f}), 0);
}

TEST(SamplingTest, TopKNeverLeavesTheTopK) {
  const std::vector<float> logits = {0.0f, 2.0f, 0.5f, 1.9f, 1.8f, -1.0f};
  Sampler s(7);
  std::set<int32_t> seen;
  for (int i = 0; i < 4000; ++i) {
    const int32_t token = s(logits, SamplingParams{2, 1.0f, 1.0f});
    ASSERT_TRUE(token == 1 || token == 3) << "draw " << i << " returned " << token;
    seen.insert(token);
  }
  EXPECT_EQ(seen, (std::set<int32_t>{1, 3}));
  // Even a very high temperature keeps the cut.
  for (int i = 0; i < 2000; ++i) {
    const int32_t token = s(logits, SamplingParams{2, 1.0f, 100.0f});
    ASSERT_TRUE(token == 1 || token == 3) << "draw " << i << " returned " << token;
  }
}

TEST(SamplingTest, TopKFrequenciesAreTheRenormalisedSoftmax) {
  const std::vector<float> logits = {0.0f, 1.0f, 2.0f, 0.5f};
  Sampler s(11);
  const std::vector<double> got = frequencies(s, logits, SamplingParams{2, 1.0f, 1.0f}, 20000);
  const double p2 = 1.0 / (1.0 + std::exp(-1.0));  // token 2 vs token 1
  EXPECT_NEAR(got[2], p2, 0.02);
  EXPECT_NEAR(got[1], 1.0 - p2, 0.02);
  EXPECT_EQ(got[0], 0.0);
  EXPECT_EQ(got[3], 0.0);
}

TEST(SamplingTest, SmallTopPReturnsTheArgmax) {
  const std::vector<float> logits = {0.1f, 0.3f, 0.2f, 0.25f, -1.0f};
  Sampler s(3);
  for (int i = 0; i < 1000; ++i) {
    ASSERT_EQ(s(logits, SamplingParams{0, 0.01f, 1.0f}), 1) << "draw " << i;
  }
}

TEST(SamplingTest, TopPKeepsTheShortestPrefixReachingTheMass) {
  // Probabilities 0.5, 0.3, 0.15, 0.05: top_p 0.7 keeps tokens 0 and 1 (mass 0.8).
  const std::vector<float> logits = {std::log(0.5f), std::log(0.3f), std::log(0.15f),
                                     std::log(0.05f)};
  Sampler s(5);
  const std::vector<double> got = frequencies(s, logits, SamplingParams{0, 0.7f, 1.0f}, 20000);
  EXPECT_NEAR(got[0], 0.625, 0.02);
  EXPECT_NEAR(got[1], 0.375, 0.02);
  EXPECT_EQ(got[2], 0.0);
  EXPECT_EQ(got[3], 0.0);
}

TEST(SamplingTest, SameSeedSameTokensDifferentSeedDifferentTokens) {
  const std::vector<float> logits = {0.0f, 0.2f, 0.1f, 0.3f, -0.1f, 0.05f, 0.15f, 0.25f};
  const SamplingParams params{0, 1.0f, 1.0f};
  Sampler a(42), b(42), c(43);
  std::vector<int32_t> ta, tb, tc;
  for (int i = 0; i < 64; ++i) {
    ta.push_back(a(logits, params));
    tb.push_back(b(logits, params));
    tc.push_back(c(logits, params));
  }
  EXPECT_EQ(ta, tb);
  EXPECT_NE(ta, tc);
  EXPECT_EQ(a.state, b.state);
  EXPECT_NE(a.state, 42u) << "the RNG state must advance";
  // The draws are not stuck on one token.
  EXPECT_GT(std::set<int32_t>(ta.begin(), ta.end()).size(), 3u);
}

TEST(SamplingTest, RngAdvancesOncePerSampledToken) {
  // A request's sequence of tokens depends only on its seed and its logits: interleaving other
  // draws with other states must not change it.
  const std::vector<float> logits = {0.0f, 0.5f, 1.0f, 0.7f};
  const SamplingParams params{0, 1.0f, 1.0f};
  Sampler alone(9), batched(9), other(123);
  for (int i = 0; i < 50; ++i) {
    const int32_t expect = alone(logits, params);
    other({5.0f, 0.0f, 0.0f, 0.0f}, params);
    EXPECT_EQ(batched(logits, params), expect) << "draw " << i;
  }
}

TEST(SamplingTest, FrequenciesMatchSoftmaxAtTemperatureOne) {
  const std::vector<float> logits = {0.0f, 1.0f, 2.0f, 0.5f};
  Sampler s(2024);
  const std::vector<double> got = frequencies(s, logits, SamplingParams{0, 1.0f, 1.0f}, 20000);
  const std::vector<double> want = softmax(logits);
  for (size_t i = 0; i < logits.size(); ++i) {
    EXPECT_NEAR(got[i], want[i], 0.02) << "token " << i;
  }
}

TEST(SamplingTest, FrequenciesFollowTheTemperature) {
  const std::vector<float> logits = {0.0f, 1.0f, 2.0f, 0.5f};
  Sampler s(77);
  for (double t : {0.5, 2.0}) {
    const std::vector<double> got =
        frequencies(s, logits, SamplingParams{0, 1.0f, static_cast<float>(t)}, 20000);
    const std::vector<double> want = softmax(logits, t);
    for (size_t i = 0; i < logits.size(); ++i) {
      EXPECT_NEAR(got[i], want[i], 0.02) << "temperature " << t << ", token " << i;
    }
  }
}

TEST(SamplingTest, MaskedLogitsAreNeverSampled) {
  const float inf = std::numeric_limits<float>::infinity();
  const std::vector<float> logits = {-inf, 0.0f, -inf, 0.3f, -inf};
  Sampler s(12);
  std::set<int32_t> seen;
  for (int i = 0; i < 2000; ++i) {
    const int32_t token = s(logits, SamplingParams{0, 1.0f, 1.0f});
    ASSERT_TRUE(token == 1 || token == 3) << "draw " << i << " returned " << token;
    seen.insert(token);
  }
  EXPECT_EQ(seen, (std::set<int32_t>{1, 3}));
}

TEST(SamplingTest, TinyPositiveTemperatureIsAlmostGreedy) {
  // Any finite temperature >= 0 is valid (SamplingConfig::validate). As it goes to 0 the
  // distribution collapses onto the argmax, down to the smallest (denormal) floats, where
  // 1 / temperature overflows to inf.
  const std::vector<float> logits = {0.0f, 5.0f, 1.0f, 4.0f};
  Sampler s(4);
  for (float t : {1e-3f, 1e-20f, 1e-38f, 1e-40f, 1e-45f}) {
    for (int i = 0; i < 20; ++i) {
      ASSERT_EQ(s(logits, SamplingParams{0, 1.0f, t}), 1) << "temperature " << t;
      ASSERT_EQ(s(logits, SamplingParams{3, 0.9f, t}), 1) << "temperature " << t << ", top_k 3";
    }
  }
}

TEST(SamplingTest, LogProbIsLogSoftmaxOfTheUnmodifiedLogits) {
  const std::vector<float> logits = {0.3f, -1.2f, 2.5f, 0.0f, 1.1f, -0.4f};
  const std::vector<double> p = softmax(logits);
  Sampler s(8);
  for (SamplingParams params : {SamplingParams{0, 1.0f, 0.0f}, SamplingParams{0, 1.0f, 1.0f},
                                SamplingParams{3, 0.9f, 1.0f}, SamplingParams{0, 1.0f, 0.7f}}) {
    for (int i = 0; i < 50; ++i) {
      float log_prob = 1.0f;
      const int32_t token = s(logits, params, &log_prob);
      ASSERT_GE(token, 0);
      ASSERT_LT(token, 6);
      EXPECT_NEAR(log_prob, std::log(p[token]), 1e-5)
          << "token " << token << " top_k " << params.top_k << " temperature "
          << params.temperature;
    }
  }
  // Large logits: still finite and exact (the max is subtracted first).
  const std::vector<float> big = {1000.0f, 999.0f, 998.0f};
  float log_prob = 0.0f;
  EXPECT_EQ(s(big, SamplingParams{1, 1.0f, 1.0f}, &log_prob), 0);
  EXPECT_NEAR(log_prob, std::log(softmax(big)[0]), 1e-5);
}

TEST(SampleOpTest, BadParamsAndRowsAreRefusedByName) {
  std::vector<float> logits = {0.1f, 0.9f, 0.3f};
  std::vector<std::pair<float, int32_t>> scratch(3);
  int32_t row = 0, token = -1;
  uint64_t rng = 1;
  const Tensor l(logits.data(), DType::kFloat32, {1, 3});
  auto run = [&](SamplingParams p) {
    ops::sample(ExecContext::cpu(), l, Tensor(&row, DType::kInt32, {1}), &p, &rng,
                Tensor(&token, DType::kInt32, {1}), Tensor(), scratch.data());
  };
  testing_util::expect_error<InvalidArgument>([&] { run({0, 1.0f, -1.0f}); },
                                              "sample: params[0] needs temperature >= 0");
  testing_util::expect_error<InvalidArgument>([&] { run({0, 0.0f, 1.0f}); }, "top_p in (0, 1]");
  row = 1;
  testing_util::expect_error<InvalidArgument>([&] { run({1, 1.0f, 0.0f}); },
                                              "sample: rows[0] = 1 is out of range [0, 1)");
  row = 0;
  run({1, 1.0f, 0.0f});
  EXPECT_EQ(token, 1);
}

// Rows of one step may have different vocabularies (an adapter's own is wider than the base's):
// each row samples, and takes its log-prob, over its first `vocab` logits only.
TEST(SampleOpTest, EachRowSamplesOverItsOwnVocabulary) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  // Row 0: 4 own tokens, then larger logits (and a NaN) past them. Row 1: the whole row of 6.
  // Row 2: a vocab wider than the row means the row.
  std::vector<float> logits = {0.0f, 0.5f, 0.2f, 0.1f, 9.0f, nan,   //
                               0.0f, 0.5f, 0.2f, 0.1f, 9.0f, 1.0f,  //
                               0.0f, 0.5f, 0.2f, 0.1f, 1.0f, 9.0f};
  std::vector<int32_t> rows = {0, 1, 2}, tokens(3, -2);
  std::vector<float> log_probs(3);
  std::vector<uint64_t> rng = {1, 2, 3};
  std::vector<std::pair<float, int32_t>> scratch(6);
  const SamplingParams greedy{1, 1.0f, 0.0f};
  std::vector<SamplingParams> params = {greedy, greedy, greedy};
  params[0].vocab = 4;
  params[2].vocab = 100;
  ops::sample(ExecContext::cpu(), Tensor(logits.data(), DType::kFloat32, {3, 6}),
              Tensor(rows.data(), DType::kInt32, {3}), params.data(), rng.data(),
              Tensor(tokens.data(), DType::kInt32, {3}),
              Tensor(log_probs.data(), DType::kFloat32, {3}), scratch.data());
  EXPECT_EQ(tokens, (std::vector<int32_t>{1, 4, 5}));
  const std::vector<double> own = softmax({0.0f, 0.5f, 0.2f, 0.1f});
  EXPECT_NEAR(log_probs[0], std::log(own[1]), 1e-6);
  EXPECT_NEAR(log_probs[1], std::log(softmax({0.0f, 0.5f, 0.2f, 0.1f, 9.0f, 1.0f})[4]), 1e-6);

  // Random draws never leave the row's vocabulary.
  for (float& v : logits) v = std::isnan(v) ? 0.0f : v;
  params[0] = SamplingParams{0, 1.0f, 1.0f, 2};
  for (int i = 0; i < 500; ++i) {
    ops::sample(ExecContext::cpu(), Tensor(logits.data(), DType::kFloat32, {3, 6}),
                Tensor(rows.data(), DType::kInt32, {1}), params.data(), rng.data(),
                Tensor(tokens.data(), DType::kInt32, {1}), Tensor(), scratch.data());
    ASSERT_TRUE(tokens[0] == 0 || tokens[0] == 1) << "draw " << i << ": " << tokens[0];
  }
  // A NaN or +inf within the row's vocabulary still fails the row.
  logits[3] = inf;
  params[0] = greedy;
  params[0].vocab = 4;
  ops::sample(ExecContext::cpu(), Tensor(logits.data(), DType::kFloat32, {3, 6}),
              Tensor(rows.data(), DType::kInt32, {1}), params.data(), rng.data(),
              Tensor(tokens.data(), DType::kInt32, {1}), Tensor(), scratch.data());
  EXPECT_EQ(tokens[0], -1);
  params[0].vocab = 3;  // the +inf is past it
  ops::sample(ExecContext::cpu(), Tensor(logits.data(), DType::kFloat32, {3, 6}),
              Tensor(rows.data(), DType::kInt32, {1}), params.data(), rng.data(),
              Tensor(tokens.data(), DType::kInt32, {1}), Tensor(), scratch.data());
  EXPECT_EQ(tokens[0], 1);
}

}  // namespace
}  // namespace lorart

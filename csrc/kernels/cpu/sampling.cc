// Token selection: greedy, or temperature / top-k / top-p sampling with a per-request RNG so
// that a request's tokens depend only on its own seed and logits, never on its batch.
#include <algorithm>
#include <cmath>

#include "kernels/cpu/cpu_kernels.h"

namespace lorart::cpu {

namespace {

// splitmix64: tiny, fast, and the same sequence on every platform (unlike std:: distributions).
uint64_t next_random(uint64_t* state) {
  uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

float log_softmax_at(const float* logits, int64_t vocab, int32_t token) {
  float max_logit = logits[0];
  for (int64_t i = 1; i < vocab; ++i) max_logit = std::max(max_logit, logits[i]);
  double total = 0.0;
  for (int64_t i = 0; i < vocab; ++i) total += std::exp(static_cast<double>(logits[i] - max_logit));
  return static_cast<float>(logits[token] - max_logit - std::log(total));
}

int32_t sample_token(const float* logits, int64_t vocab, const SamplingParams& params,
                     uint64_t* rng_state, float* log_prob, std::pair<float, int32_t>* scratch) {
  int32_t token = 0;
  if (params.temperature == 0.0f || params.top_k == 1) {
    for (int64_t i = 1; i < vocab; ++i) {
      if (logits[i] > logits[token]) token = static_cast<int32_t>(i);  // ties: lowest id
    }
  } else {
    const int64_t k = params.top_k > 0 ? std::min<int64_t>(params.top_k, vocab) : vocab;
    for (int64_t i = 0; i < vocab; ++i) scratch[i] = {logits[i], static_cast<int32_t>(i)};
    // Highest logits first; equal logits by token id so the order never depends on the sort.
    auto higher = [](const auto& a, const auto& b) {
      return a.first > b.first || (a.first == b.first && a.second < b.second);
    };
    std::partial_sort(scratch, scratch + k, scratch + vocab, higher);
    // In double: 1 / temperature overflows float for temperatures below ~3e-39.
    const double inv_t = 1.0 / static_cast<double>(params.temperature);
    const double top = scratch[0].first;
    double total = 0.0;
    for (int64_t i = 0; i < k; ++i) {
      scratch[i].first = static_cast<float>(std::exp((scratch[i].first - top) * inv_t));
      total += scratch[i].first;
    }
    // Nucleus: the shortest prefix whose mass reaches top_p (at least one token).
    int64_t keep = k;
    if (params.top_p < 1.0f) {
      double mass = 0.0;
      for (int64_t i = 0; i < k; ++i) {
        mass += scratch[i].first / total;
        if (mass >= params.top_p) {
          keep = i + 1;
          break;
        }
      }
    }
    double kept = 0.0;
    for (int64_t i = 0; i < keep; ++i) kept += scratch[i].first;
    const double u = static_cast<double>(next_random(rng_state) >> 11) * 0x1.0p-53 * kept;
    double acc = 0.0;
    token = scratch[keep - 1].second;
    for (int64_t i = 0; i < keep; ++i) {
      acc += scratch[i].first;
      if (u < acc) {
        token = scratch[i].second;
        break;
      }
    }
  }
  if (log_prob != nullptr) *log_prob = log_softmax_at(logits, vocab, token);
  return token;
}

}  // namespace

void sample(const SampleParams& p, std::pair<float, int32_t>* scratch) {
  for (int32_t i = 0; i < p.num_samples; ++i) {
    const float* row = p.logits + static_cast<int64_t>(p.rows[i]) * p.vocab;
    // The row's own vocabulary (a request whose adapter brings a smaller one than the step's
    // widest): the columns past it are not its tokens.
    const int64_t vocab = p.params[i].vocab > 0 ? std::min(p.params[i].vocab, p.vocab) : p.vocab;
    // -inf masks a token; NaN has no order to sample by and +inf no probability: such a row is
    // the caller's error to report.
    if (std::any_of(row, row + vocab, [](float v) { return std::isnan(v) || v == INFINITY; })) {
      p.tokens[i] = -1;
      if (p.log_probs != nullptr) p.log_probs[i] = 0.0f;
      continue;
    }
    p.tokens[i] = sample_token(row, vocab, p.params[i], &p.rng_states[i],
                               p.log_probs != nullptr ? &p.log_probs[i] : nullptr, scratch);
  }
}

}  // namespace lorart::cpu

// Embedding, RMSNorm, RoPE, SwiGLU, bias and residual adds.
#include <cmath>
#include <cstring>

#include "kernels/cpu/cpu_kernels.h"
#include "kernels/cpu/float_mode.h"

namespace lorart::cpu {

void embedding(const float* table, int64_t hidden, const int32_t* ids, int64_t num_tokens,
               float* out) {
#pragma omp parallel for if (num_tokens * hidden > 65536)
  for (int64_t t = 0; t < num_tokens; ++t) {
    std::memcpy(out + t * hidden, table + static_cast<int64_t>(ids[t]) * hidden,
                hidden * sizeof(float));
  }
}

void rms_norm(const float* x, int64_t x_stride, const float* weight, int64_t num_tokens,
              int64_t hidden, float eps, float* out, int64_t out_stride) {
  const FloatMode mode;
#pragma omp parallel if (num_tokens * hidden > 65536)
  {
    const FloatMode::Scope same(mode);
#pragma omp for
    for (int64_t t = 0; t < num_tokens; ++t) {
      const float* row = x + t * x_stride;
      double sum = 0.0;  // double: the mean of squares is the one reduction that loses digits
      for (int64_t i = 0; i < hidden; ++i) sum += static_cast<double>(row[i]) * row[i];
      const float inv = 1.0f / std::sqrt(static_cast<float>(sum / hidden) + eps);
      float* dst = out + t * out_stride;
      for (int64_t i = 0; i < hidden; ++i) dst[i] = weight[i] * (row[i] * inv);
    }
  }
}

void rope(float* x, int64_t stride, int64_t num_tokens, int32_t num_heads, int32_t head_dim,
          const int32_t* positions, const float* inv_freq) {
  const int32_t half = head_dim / 2;
  const FloatMode mode;
#pragma omp parallel if (num_tokens * num_heads * head_dim > 65536)
  {
    const FloatMode::Scope same(mode);
#pragma omp for
    for (int64_t t = 0; t < num_tokens; ++t) {
      // Angles in float32 as transformers computes them (position * inv_freq, then cos/sin).
      float cos_buf[512], sin_buf[512];
      const float pos = static_cast<float>(positions[t]);
      for (int32_t i = 0; i < half; ++i) {
        const float angle = pos * inv_freq[i];
        cos_buf[i] = static_cast<float>(std::cos(static_cast<double>(angle)));
        sin_buf[i] = static_cast<float>(std::sin(static_cast<double>(angle)));
      }
      for (int32_t h = 0; h < num_heads; ++h) {
        float* v = x + t * stride + static_cast<int64_t>(h) * head_dim;
        for (int32_t i = 0; i < half; ++i) {
          const float a = v[i], b = v[i + half];
          v[i] = a * cos_buf[i] - b * sin_buf[i];
          v[i + half] = b * cos_buf[i] + a * sin_buf[i];
        }
      }
    }
  }
}

void silu_mul(const float* gate_up, int64_t num_tokens, int64_t inter, float* out) {
  const FloatMode mode;
#pragma omp parallel if (num_tokens * inter > 65536)
  {
    const FloatMode::Scope same(mode);
#pragma omp for
    for (int64_t t = 0; t < num_tokens; ++t) {
      const float* g = gate_up + t * 2 * inter;
      const float* u = g + inter;
      float* o = out + t * inter;
      for (int64_t i = 0; i < inter; ++i) o[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
    }
  }
}

void add_bias(float* y, int64_t stride, int64_t num_tokens, int64_t cols, const float* bias) {
  for (int64_t t = 0; t < num_tokens; ++t) {
    float* row = y + t * stride;
    for (int64_t i = 0; i < cols; ++i) row[i] += bias[i];
  }
}

void add(float* y, const float* x, int64_t n) {
  const FloatMode mode;
#pragma omp parallel if (n > 262144)
  {
    const FloatMode::Scope same(mode);
#pragma omp for
    for (int64_t i = 0; i < n; ++i) y[i] += x[i];
  }
}

}  // namespace lorart::cpu

// Embedding, RMSNorm, RoPE, SwiGLU, bias and residual adds, row gathers. Weights (embedding
// table, norm weights, biases) arrive in their storage dtype and are widened exactly to float32.
#include <cmath>
#include <cstring>
#include <vector>

#include "kernels/cpu/cpu_kernels.h"
#include "kernels/cpu/float_mode.h"

namespace lorart::cpu {

namespace {

// `count` values of `w` as float32: the stored values when they are float32, else widened
// (exactly) into `storage`, which belongs to the calling thread.
const float* widened(const WeightRef& w, int64_t count, std::vector<float>& storage) {
  if (w.dtype == DType::kFloat32) return static_cast<const float*>(w.data);
  storage.resize(static_cast<size_t>(count));
  convert_floats(w.data, w.dtype, storage.data(), DType::kFloat32, static_cast<size_t>(count));
  return storage.data();
}

}  // namespace

void embedding(const EmbeddingParams& p) {
  const size_t row_bytes = static_cast<size_t>(p.hidden) * dtype_size(p.table.dtype);
  const auto* table = static_cast<const unsigned char*>(p.table.data);
  const int64_t stride = p.table.stride * static_cast<int64_t>(dtype_size(p.table.dtype));
#pragma omp parallel for if (p.num_tokens * p.hidden > 65536)
  for (int64_t t = 0; t < p.num_tokens; ++t) {
    const unsigned char* row = table + static_cast<int64_t>(p.ids[t]) * stride;
    if (p.table.dtype == DType::kFloat32) {
      std::memcpy(p.out + t * p.hidden, row, row_bytes);
    } else {
      convert_floats(row, p.table.dtype, p.out + t * p.hidden, DType::kFloat32,
                     static_cast<size_t>(p.hidden));
    }
  }
}

namespace {

// One row of RMSNorm; rms_norm and add_rms_norm share it so the fused op is bitwise the two.
inline void normalize_row(const float* row, const float* weight, int64_t hidden, float eps,
                          float* dst) {
  double sum = 0.0;  // double: the mean of squares is the one reduction that loses digits
  for (int64_t i = 0; i < hidden; ++i) sum += static_cast<double>(row[i]) * row[i];
  const float inv = 1.0f / std::sqrt(static_cast<float>(sum / hidden) + eps);
  for (int64_t i = 0; i < hidden; ++i) dst[i] = weight[i] * (row[i] * inv);
}

}  // namespace

void rms_norm(const RmsNormParams& p) {
  thread_local std::vector<float> weight_storage;
  const float* weight = widened(p.weight, p.hidden, weight_storage);
  const FloatMode mode;
#pragma omp parallel if (p.num_tokens * p.hidden > 65536)
  {
    const FloatMode::Scope same(mode);
#pragma omp for
    for (int64_t t = 0; t < p.num_tokens; ++t) {
      normalize_row(p.x + t * p.x_stride, weight, p.hidden, p.eps, p.out + t * p.out_stride);
    }
  }
}

void add_rms_norm(const AddRmsNormParams& p) {
  thread_local std::vector<float> weight_storage;
  const float* weight = widened(p.weight, p.hidden, weight_storage);
  const FloatMode mode;
#pragma omp parallel if (p.num_tokens * p.hidden > 65536)
  {
    const FloatMode::Scope same(mode);
#pragma omp for
    for (int64_t t = 0; t < p.num_tokens; ++t) {
      float* row = p.residual + t * p.residual_stride;
      const float* x = p.x + t * p.x_stride;
      for (int64_t i = 0; i < p.hidden; ++i) row[i] += x[i];
      normalize_row(row, weight, p.hidden, p.eps, p.out + t * p.out_stride);
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

void add_bias(const BiasParams& p) {
  thread_local std::vector<float> bias_storage;
  const float* bias = widened(p.bias, p.cols, bias_storage);
  for (int64_t t = 0; t < p.num_tokens; ++t) {
    float* row = p.y + t * p.y_stride;
    for (int64_t i = 0; i < p.cols; ++i) row[i] += bias[i];
  }
}

void gather_rows(const float* x, int64_t width, const int32_t* rows, int64_t num_rows, float* out) {
  for (int64_t i = 0; i < num_rows; ++i) {
    std::memcpy(out + i * width, x + static_cast<int64_t>(rows[i]) * width, width * sizeof(float));
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

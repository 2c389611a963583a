// DoRA (weight-decomposed LoRA): the per-row scales computed once per adapter against the base
// weights, and their application after the LoRA delta in the forward.
#include <omp.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "core/dtype.h"
#include "kernels/cpu/cpu_kernels.h"

namespace lorart::cpu {

namespace {

float value(const WeightRef& w, int64_t i) { return load_float(w.data, w.dtype, i); }

}  // namespace

void read_weight_row(const WeightRef& w, int64_t row, int64_t cols, float* out) {
  const size_t size = dtype_size(w.dtype);
  const auto* src = static_cast<const unsigned char*>(w.data) + row * w.stride * size;
  convert_floats(src, w.dtype, out, DType::kFloat32, static_cast<size_t>(cols));
  if (w.layout != WeightLayout::kK32Interleaved) return;
  // Block b holds column b + j at 2j and column b + 16 + j at 2j + 1; the tail is in order.
  float block[32];
  for (int64_t b = 0; b + 32 <= cols; b += 32) {
    for (int j = 0; j < 16; ++j) {
      block[j] = out[b + 2 * j];
      block[16 + j] = out[b + 2 * j + 1];
    }
    std::memcpy(out + b, block, sizeof(block));
  }
}

void dora_scales(const DoraScalesParams& p) {
  // W + B A row by row in float32 (PEFT's own arithmetic for a float32 model), its squared norm
  // accumulated in float64. A is widened once.
  std::vector<float> a(static_cast<size_t>(p.rank * p.k));
  for (int64_t i = 0; i < p.rank * p.k; ++i) a[i] = value(p.a, i);
  // The caller's thread budget: this runs on an enqueuing thread beside the executor's loop.
  const int threads = p.threads > 0 ? p.threads : omp_get_max_threads();
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> row(static_cast<size_t>(p.k));
#pragma omp for schedule(static)
    for (int64_t o = 0; o < p.out; ++o) {
      read_weight_row(p.w, p.row_offset + o, p.k, row.data());
      for (int64_t r = 0; r < p.rank; ++r) {  // row += B[o, r] * A[r, :]
        const float b = value(p.b, o * p.rank + r);
        const float* a_r = a.data() + r * p.k;
        for (int64_t c = 0; c < p.k; ++c) row[c] += b * a_r[c];
      }
      double sum = 0.0;
      for (int64_t c = 0; c < p.k; ++c) sum += static_cast<double>(row[c]) * row[c];
      p.scales[o] = static_cast<float>(static_cast<double>(value(p.magnitude, o)) / std::sqrt(sum));
    }
  }
}

void dora_apply(const DoraApplyParams& p) {
  thread_local std::vector<float> bias;  // widened once per call
  bias.assign(static_cast<size_t>(p.out), 0.0f);
  if (p.bias.data != nullptr) {
    for (int64_t o = 0; o < p.out; ++o) bias[o] = value(p.bias, o);
  }
  const float* b = bias.data();
  for (int32_t i = 0; i < p.num_runs; ++i) {
    const LoraRun& run = p.runs[i];
    const float* scale = p.pairs[run.slot * p.slot_stride].dora_scale;
    if (scale == nullptr) continue;
#pragma omp parallel for if (int64_t{run.end - run.begin} * p.out > 65536)
    for (int32_t t = run.begin; t < run.end; ++t) {
      float* y = p.y + static_cast<int64_t>(t) * p.y_stride;
      for (int64_t o = 0; o < p.out; ++o) y[o] = scale[o] * (y[o] - b[o]) + b[o];
    }
  }
}

}  // namespace lorart::cpu

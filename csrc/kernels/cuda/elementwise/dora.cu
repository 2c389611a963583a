// CUDA twins of kernels/cpu/dora.cc's dora_scales and dora_apply.
#include <cuda_runtime.h>

#include <climits>

#include "core/cuda/cuda_check.h"
#include "core/errors.h"
#include "kernels/cuda/elementwise/device_util.cuh"
#include "kernels/cuda/elementwise/elementwise.h"

namespace lorart::cuda {

namespace {

using detail::load_float;

constexpr int kScaleThreads = 256;
constexpr int kApplyThreads = 256;

// One block per output row o: (W + B A)[o, c] formed in float32 with the CPU's roundings (W, then
// each rank's product added in rank order), its square summed in float64 per thread (columns
// c = tid, tid + 256, ...), then block_sum's fixed tree.
__global__ void __launch_bounds__(kScaleThreads) dora_scales_kernel(DoraScalesParams p) {
  __shared__ double partials[kScaleThreads / 32];
  const int64_t o = blockIdx.x;
  const int64_t w_row = (p.row_offset + o) * p.w.stride;
  double sum = 0.0;
  for (int64_t c = threadIdx.x; c < p.k; c += kScaleThreads) {
    float v = load_float(p.w.data, p.w.dtype, w_row + c);
    for (int64_t r = 0; r < p.rank; ++r) {
      const float b = load_float(p.b.data, p.b.dtype, o * p.b.stride + r);
      v = __fadd_rn(v, __fmul_rn(b, load_float(p.a.data, p.a.dtype, r * p.a.stride + c)));
    }
    sum = __dadd_rn(sum, static_cast<double>(v) * v);
  }
  sum = detail::block_sum<kScaleThreads>(sum, partials);
  if (threadIdx.x == 0) {
    const double magnitude = load_float(p.magnitude.data, p.magnitude.dtype, o);
    p.scales[o] = static_cast<float>(__ddiv_rn(magnitude, __dsqrt_rn(sum)));
  }
}

// One block per token t: every run holding t whose pair has a dora_scale rescales the token's
// row, in run order (the CPU's loop), so the result is the CPU's for any run list.
__global__ void __launch_bounds__(kApplyThreads) dora_apply_kernel(DoraApplyParams p) {
  const int32_t t = static_cast<int32_t>(blockIdx.x);
  float* y = p.y + static_cast<int64_t>(t) * p.y_stride;
  for (int32_t i = 0; i < p.num_runs; ++i) {
    const LoraRun run = p.runs[i];
    if (t < run.begin || t >= run.end) continue;
    const float* scale = p.pairs[run.slot * p.slot_stride].dora_scale;
    if (scale == nullptr) continue;
    for (int64_t o = threadIdx.x; o < p.out; o += kApplyThreads) {
      const float b = p.bias.data != nullptr ? load_float(p.bias.data, p.bias.dtype, o) : 0.0f;
      y[o] = __fadd_rn(__fmul_rn(scale[o], __fsub_rn(y[o], b)), b);
    }
  }
}

}  // namespace

void dora_scales(const DoraScalesParams& p, void* stream) {
  if (p.out == 0) return;
  if (p.w.layout != WeightLayout::kRowMajor) {
    raise<InvalidArgument>("dora_scales: CUDA reads row-major weights only");
  }
  if (p.out > INT_MAX) raise<InvalidArgument>("dora_scales: ", p.out, " rows exceed a CUDA grid");
  dora_scales_kernel<<<static_cast<unsigned int>(p.out), kScaleThreads, 0,
                       static_cast<cudaStream_t>(stream)>>>(p);
  check_launch("dora_scales");
}

void dora_apply(const DoraApplyParams& p, int64_t num_tokens, void* stream) {
  if (num_tokens == 0 || p.num_runs == 0 || p.out == 0) return;
  if (num_tokens > INT_MAX) {
    raise<InvalidArgument>("lora_dora_apply: ", num_tokens, " tokens exceed a CUDA grid");
  }
  if (p.runs == nullptr || p.pairs == nullptr) {
    raise<InvalidArgument>("lora_dora_apply: the LoRA batch has no device runs / pairs");
  }
  dora_apply_kernel<<<static_cast<unsigned int>(num_tokens), kApplyThreads, 0,
                      static_cast<cudaStream_t>(stream)>>>(p);
  check_launch("lora_dora_apply");
}

}  // namespace lorart::cuda

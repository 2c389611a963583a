// CUDA twins of kernels/cpu/elementwise.cc and dora.cc's read_weight_row. Row ops run one block
// per row (gridDim.x = rows, so up to 2^31 - 1 of them); flat ops a grid-stride loop. Explicit
// _rn intrinsics keep the CPU's roundings where nvcc would otherwise fuse a multiply and an add.
#include <cuda_runtime.h>

#include <climits>

#include "core/cuda/cuda_check.h"
#include "core/errors.h"
#include "kernels/cuda/elementwise/device_util.cuh"
#include "kernels/cuda/elementwise/elementwise.h"

namespace lorart::cuda {

namespace {

using detail::aligned16;
using detail::grid_for;
using detail::load_float;

constexpr int kRowThreads = 256;
constexpr int kNormThreads = 256;
constexpr int kFlatThreads = 256;

cudaStream_t as_stream(void* stream) { return static_cast<cudaStream_t>(stream); }

// A row count as gridDim.x.
unsigned int row_grid(int64_t rows, const char* op) {
  if (rows > INT_MAX) raise<InvalidArgument>(op, ": ", rows, " rows exceed a CUDA grid");
  return static_cast<unsigned int>(rows);
}

// Rows of `row_elems` elements of `elem_bytes`, `stride` elements apart from `base`: can each row
// be read in 16-byte groups?
bool rows_vectorizable(const void* base, int64_t stride, int64_t row_elems, size_t elem_bytes) {
  const int64_t per16 = 16 / static_cast<int64_t>(elem_bytes);
  return aligned16(base) && stride % per16 == 0 && row_elems % per16 == 0;
}

__global__ void __launch_bounds__(kRowThreads)
    embedding_kernel(EmbeddingParams p, int64_t row_bytes, bool vec) {
  const int64_t t = blockIdx.x;
  const auto* row = static_cast<const unsigned char*>(p.table.data) + p.ids[t] * row_bytes;
  detail::widen_row(row, p.table.dtype, p.out + t * p.hidden, p.hidden, threadIdx.x, blockDim.x,
                    vec);
}

// RMSNorm of one row per block; kAdd first adds `addend` into `src` (the residual) and stores it.
// Each thread owns the same elements in both passes, so it reads back only its own writes (and
// out may alias src when !kAdd). Thread i owns groups i, i + kNormThreads, ... of 4 elements
// (kVec) or single elements; the float64 sum of squares adds each thread's values in order, then
// block_sum's fixed tree: the order depends on hidden and the alignment only.
template <bool kAdd, bool kVec>
__global__ void __launch_bounds__(kNormThreads)
    norm_kernel(float* src, int64_t src_stride, const float* addend, int64_t addend_stride,
                WeightRef w, float* out, int64_t out_stride, int64_t hidden, float eps) {
  __shared__ double partials[kNormThreads / 32];
  const int64_t t = blockIdx.x;
  float* row = src + t * src_stride;
  const float* add = kAdd ? addend + t * addend_stride : nullptr;
  float* dst = out + t * out_stride;
  double sum = 0.0;
  if (kVec) {
    float4* r4 = reinterpret_cast<float4*>(row);
    for (int64_t g = threadIdx.x; g < hidden / 4; g += kNormThreads) {
      float4 v = r4[g];
      if (kAdd) {
        const float4 a = reinterpret_cast<const float4*>(add)[g];
        v = make_float4(__fadd_rn(v.x, a.x), __fadd_rn(v.y, a.y), __fadd_rn(v.z, a.z),
                        __fadd_rn(v.w, a.w));
        r4[g] = v;
      }
      sum = __dadd_rn(sum, static_cast<double>(v.x) * v.x);
      sum = __dadd_rn(sum, static_cast<double>(v.y) * v.y);
      sum = __dadd_rn(sum, static_cast<double>(v.z) * v.z);
      sum = __dadd_rn(sum, static_cast<double>(v.w) * v.w);
    }
  } else {
    for (int64_t i = threadIdx.x; i < hidden; i += kNormThreads) {
      float v = row[i];
      if (kAdd) {
        v = __fadd_rn(v, add[i]);
        row[i] = v;
      }
      sum = __dadd_rn(sum, static_cast<double>(v) * v);
    }
  }
  sum = detail::block_sum<kNormThreads>(sum, partials);
  // As the CPU: 1 / sqrt(float(mean) + eps), IEEE-rounded at each step.
  const float inv = __fdiv_rn(
      1.0f, __fsqrt_rn(__fadd_rn(__double2float_rn(sum / static_cast<double>(hidden)), eps)));
  if (kVec) {
    const float4* r4 = reinterpret_cast<const float4*>(row);
    float4* d4 = reinterpret_cast<float4*>(dst);
    for (int64_t g = threadIdx.x; g < hidden / 4; g += kNormThreads) {
      const float4 v = r4[g];
      const int64_t i = 4 * g;
      d4[g] = make_float4(__fmul_rn(load_float(w.data, w.dtype, i), __fmul_rn(v.x, inv)),
                          __fmul_rn(load_float(w.data, w.dtype, i + 1), __fmul_rn(v.y, inv)),
                          __fmul_rn(load_float(w.data, w.dtype, i + 2), __fmul_rn(v.z, inv)),
                          __fmul_rn(load_float(w.data, w.dtype, i + 3), __fmul_rn(v.w, inv)));
    }
  } else {
    for (int64_t i = threadIdx.x; i < hidden; i += kNormThreads) {
      dst[i] = __fmul_rn(load_float(w.data, w.dtype, i), __fmul_rn(row[i], inv));
    }
  }
}

template <bool kAdd>
void launch_norm(float* src, int64_t src_stride, const float* addend, int64_t addend_stride,
                 const WeightRef& w, float* out, int64_t out_stride, int64_t num_tokens,
                 int64_t hidden, float eps, void* stream, const char* op) {
  if (num_tokens == 0 || hidden == 0) return;
  const bool vec = rows_vectorizable(src, src_stride, hidden, 4) &&
                   rows_vectorizable(out, out_stride, hidden, 4) &&
                   (!kAdd || rows_vectorizable(addend, addend_stride, hidden, 4));
  const unsigned int grid = row_grid(num_tokens, op);
  if (vec) {
    norm_kernel<kAdd, true><<<grid, kNormThreads, 0, as_stream(stream)>>>(
        src, src_stride, addend, addend_stride, w, out, out_stride, hidden, eps);
  } else {
    norm_kernel<kAdd, false><<<grid, kNormThreads, 0, as_stream(stream)>>>(
        src, src_stride, addend, addend_stride, w, out, out_stride, hidden, eps);
  }
  check_launch(op);
}

// One block per token: the token's angles into shared memory (cos/sin in float64, rounded to
// float32, as the CPU), then every (head, pair) of the row.
__global__ void __launch_bounds__(kRowThreads)
    rope_kernel(float* x, int64_t stride, int32_t num_heads, int32_t head_dim,
                const int32_t* positions, const float* inv_freq) {
  __shared__ float cos_buf[512], sin_buf[512];
  const int64_t t = blockIdx.x;
  const int32_t half = head_dim / 2;
  const float pos = static_cast<float>(positions[t]);
  for (int32_t i = threadIdx.x; i < half; i += blockDim.x) {
    const double angle = static_cast<double>(__fmul_rn(pos, inv_freq[i]));
    cos_buf[i] = static_cast<float>(cos(angle));
    sin_buf[i] = static_cast<float>(sin(angle));
  }
  __syncthreads();
  float* row = x + t * stride;
  const int64_t pairs = static_cast<int64_t>(num_heads) * half;
  for (int64_t j = threadIdx.x; j < pairs; j += blockDim.x) {
    const int64_t h = j / half;
    const int32_t i = static_cast<int32_t>(j - h * half);
    float* v = row + h * head_dim;
    const float a = v[i], b = v[i + half], c = cos_buf[i], s = sin_buf[i];
    v[i] = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
    v[i + half] = __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s));
  }
}

__device__ __forceinline__ float silu_times(float g, float u) {
  return __fmul_rn(__fdiv_rn(g, __fadd_rn(1.0f, expf(-g))), u);
}

// Flat over num_tokens * inter outputs; kVec: groups of 4 (inter % 4 == 0, so a group never
// crosses a row).
template <bool kVec>
__global__ void __launch_bounds__(kFlatThreads)
    silu_mul_kernel(const float* gate_up, int64_t num_tokens, int64_t inter, float* out) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (kVec) {
    const int64_t groups = num_tokens * inter / 4, row_groups = inter / 4;
    for (int64_t e = first; e < groups; e += step) {
      const int64_t t = e / row_groups, gi = e - t * row_groups;
      const float4* row = reinterpret_cast<const float4*>(gate_up + t * 2 * inter);
      const float4 g = row[gi], u = row[row_groups + gi];
      reinterpret_cast<float4*>(out)[e] = make_float4(silu_times(g.x, u.x), silu_times(g.y, u.y),
                                                      silu_times(g.z, u.z), silu_times(g.w, u.w));
    }
  } else {
    for (int64_t e = first; e < num_tokens * inter; e += step) {
      const int64_t t = e / inter, i = e - t * inter;
      const float* g = gate_up + t * 2 * inter;
      out[e] = silu_times(g[i], g[inter + i]);
    }
  }
}

template <bool kVec>
__global__ void __launch_bounds__(kRowThreads) add_bias_kernel(BiasParams p) {
  float* row = p.y + static_cast<int64_t>(blockIdx.x) * p.y_stride;
  if (kVec) {
    float4* r4 = reinterpret_cast<float4*>(row);
    for (int64_t g = threadIdx.x; g < p.cols / 4; g += blockDim.x) {
      float4 v = r4[g];
      const int64_t i = 4 * g;
      v.x = __fadd_rn(v.x, load_float(p.bias.data, p.bias.dtype, i));
      v.y = __fadd_rn(v.y, load_float(p.bias.data, p.bias.dtype, i + 1));
      v.z = __fadd_rn(v.z, load_float(p.bias.data, p.bias.dtype, i + 2));
      v.w = __fadd_rn(v.w, load_float(p.bias.data, p.bias.dtype, i + 3));
      r4[g] = v;
    }
  } else {
    for (int64_t i = threadIdx.x; i < p.cols; i += blockDim.x) {
      row[i] = __fadd_rn(row[i], load_float(p.bias.data, p.bias.dtype, i));
    }
  }
}

// y[i] += x[i]; vec: both 16-byte aligned, the first n / 4 * 4 elements in groups, the tail alone.
__global__ void __launch_bounds__(kFlatThreads)
    add_kernel(float* y, const float* x, int64_t n, bool vec) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  int64_t done = 0;
  if (vec) {
    float4* y4 = reinterpret_cast<float4*>(y);
    const float4* x4 = reinterpret_cast<const float4*>(x);
    for (int64_t g = first; g < n / 4; g += step) {
      float4 a = y4[g];
      const float4 b = x4[g];
      a = make_float4(__fadd_rn(a.x, b.x), __fadd_rn(a.y, b.y), __fadd_rn(a.z, b.z),
                      __fadd_rn(a.w, b.w));
      y4[g] = a;
    }
    done = n / 4 * 4;
  }
  for (int64_t i = done + first; i < n; i += step) y[i] = __fadd_rn(y[i], x[i]);
}

__global__ void __launch_bounds__(kRowThreads)
    gather_rows_kernel(const float* x, int64_t width, const int32_t* rows, float* out, bool vec) {
  const int64_t r = blockIdx.x;
  detail::widen_row(x + static_cast<int64_t>(rows[r]) * width, DType::kFloat32, out + r * width,
                    width, threadIdx.x, blockDim.x, vec);
}

__global__ void __launch_bounds__(kFlatThreads)
    read_row_kernel(const void* row, DType dtype, int64_t cols, float* out, bool vec) {
  detail::widen_row(row, dtype, out, cols,
                    static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x,
                    static_cast<int64_t>(gridDim.x) * blockDim.x, vec);
}

}  // namespace

void embedding(const EmbeddingParams& p, void* stream) {
  if (p.num_tokens == 0 || p.hidden == 0) return;
  const size_t size = dtype_size(p.table.dtype);
  const bool vec = rows_vectorizable(p.table.data, p.table.stride, p.hidden, size) &&
                   aligned16(p.out) && p.hidden % 4 == 0;
  embedding_kernel<<<row_grid(p.num_tokens, "embedding"), kRowThreads, 0, as_stream(stream)>>>(
      p, p.table.stride * static_cast<int64_t>(size), vec);
  check_launch("embedding");
}

void rms_norm(const RmsNormParams& p, void* stream) {
  launch_norm<false>(const_cast<float*>(p.x), p.x_stride, nullptr, 0, p.weight, p.out, p.out_stride,
                     p.num_tokens, p.hidden, p.eps, stream, "rms_norm");
}

void add_rms_norm(const AddRmsNormParams& p, void* stream) {
  launch_norm<true>(p.residual, p.residual_stride, p.x, p.x_stride, p.weight, p.out, p.out_stride,
                    p.num_tokens, p.hidden, p.eps, stream, "add_rms_norm");
}

void rope(float* x, int64_t stride, int64_t num_tokens, int32_t num_heads, int32_t head_dim,
          const int32_t* positions, const float* inv_freq, void* stream) {
  if (num_tokens == 0 || num_heads == 0) return;
  if (head_dim <= 0 || head_dim > 1024 || head_dim % 2 != 0) {
    raise<InvalidArgument>("rope: head_dim ", head_dim, " must be even and <= 1024");
  }
  rope_kernel<<<row_grid(num_tokens, "rope"), kRowThreads, 0, as_stream(stream)>>>(
      x, stride, num_heads, head_dim, positions, inv_freq);
  check_launch("rope");
}

void silu_mul(const float* gate_up, int64_t num_tokens, int64_t inter, float* out, void* stream) {
  if (num_tokens == 0 || inter == 0) return;
  const bool vec = inter % 4 == 0 && aligned16(gate_up) && aligned16(out);
  const int64_t items = vec ? num_tokens * inter / 4 : num_tokens * inter;
  if (vec) {
    silu_mul_kernel<true><<<grid_for(items, kFlatThreads), kFlatThreads, 0, as_stream(stream)>>>(
        gate_up, num_tokens, inter, out);
  } else {
    silu_mul_kernel<false><<<grid_for(items, kFlatThreads), kFlatThreads, 0, as_stream(stream)>>>(
        gate_up, num_tokens, inter, out);
  }
  check_launch("silu_mul");
}

void add_bias(const BiasParams& p, void* stream) {
  if (p.num_tokens == 0 || p.cols == 0) return;
  const unsigned int grid = row_grid(p.num_tokens, "add_bias");
  if (rows_vectorizable(p.y, p.y_stride, p.cols, 4)) {
    add_bias_kernel<true><<<grid, kRowThreads, 0, as_stream(stream)>>>(p);
  } else {
    add_bias_kernel<false><<<grid, kRowThreads, 0, as_stream(stream)>>>(p);
  }
  check_launch("add_bias");
}

void add(float* y, const float* x, int64_t n, void* stream) {
  if (n == 0) return;
  const bool vec = aligned16(y) && aligned16(x);
  add_kernel<<<grid_for(vec ? n / 4 + 1 : n, kFlatThreads), kFlatThreads, 0, as_stream(stream)>>>(
      y, x, n, vec);
  check_launch("add");
}

void gather_rows(const float* x, int64_t width, const int32_t* rows, int64_t num_rows, float* out,
                 void* stream) {
  if (num_rows == 0 || width == 0) return;
  const bool vec = rows_vectorizable(x, width, width, 4) && rows_vectorizable(out, width, width, 4);
  gather_rows_kernel<<<row_grid(num_rows, "gather_rows"), kRowThreads, 0, as_stream(stream)>>>(
      x, width, rows, out, vec);
  check_launch("gather_rows");
}

void read_weight_row(const WeightRef& w, int64_t row, int64_t cols, float* out, void* stream) {
  if (w.layout != WeightLayout::kRowMajor) {
    raise<InvalidArgument>("read_weight_row: CUDA reads row-major weights only");
  }
  if (cols == 0) return;
  const size_t size = dtype_size(w.dtype);
  const void* src = static_cast<const unsigned char*>(w.data) + row * w.stride * size;
  const bool vec = rows_vectorizable(src, 0, cols, size) && aligned16(out);
  const int64_t items = vec ? cols / static_cast<int64_t>(16 / size) : cols;
  read_row_kernel<<<grid_for(items, kFlatThreads), kFlatThreads, 0, as_stream(stream)>>>(
      src, w.dtype, cols, out, vec);
  check_launch("read_weight_row");
}

}  // namespace lorart::cuda

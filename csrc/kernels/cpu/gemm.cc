// Dense GEMM (BLAS) and the grouped LoRA GEMM (shrink x @ A^T, expand @ B^T per adapter segment).
#include <omp.h>

#include <algorithm>
#include <vector>

#include "kernels/cpu/blas.h"
#include "kernels/cpu/cpu_kernels.h"

namespace lorart::cpu {

namespace {

// One thread pool for everything: OpenMP. OpenBLAS keeps its own pthreads pool, and two pools
// spin-waiting on the same cores slow each other down many times over, so the BLAS runs
// single-threaded and linear() splits the output columns across OpenMP threads instead.
[[maybe_unused]] const bool kBlasSingleThreaded = (set_blas_threads(1), true);

// Column blocks are multiples of this, so every thread's block keeps BLAS's wide kernels busy.
constexpr int64_t kColumnAlign = 64;

}  // namespace

void linear(const float* x, int64_t x_stride, const float* w, int64_t m, int64_t n, int64_t k,
            float beta, float* y, int64_t y_stride) {
  const int threads = omp_get_max_threads();
  if (threads == 1 || m * n * k < (int64_t{1} << 20)) {
    sgemm(/*b_transposed=*/true, m, n, k, 1.0f, x, x_stride, w, k, beta, y, y_stride);
    return;
  }
#pragma omp parallel num_threads(threads)
  {
    const int64_t per = (n + threads - 1) / threads;
    const int64_t block = (per + kColumnAlign - 1) / kColumnAlign * kColumnAlign;
    const int64_t begin = std::min<int64_t>(n, omp_get_thread_num() * block);
    const int64_t end = std::min<int64_t>(n, begin + block);
    if (begin < end) {
      sgemm(true, m, end - begin, k, 1.0f, x, x_stride, w + begin * k, k, beta, y + begin,
            y_stride);
    }
  }
}

void lora_gemm(const LoraGemmParams& p) {
  // Scratch offsets: each segment owns (end - begin) * rank floats, so segments are independent.
  thread_local std::vector<int64_t> offset_storage;  // read by the workers through `offsets`
  offset_storage.resize(p.num_segments);
  int64_t* offsets = offset_storage.data();
  int64_t used = 0;
  for (int32_t i = 0; i < p.num_segments; ++i) {
    offsets[i] = used;
    used += static_cast<int64_t>(p.segments[i].end - p.segments[i].begin) * p.segments[i].pair.rank;
  }
  const int64_t flops = used * (p.in + p.out);  // multiply-adds of shrink + expand
#pragma omp parallel for schedule(dynamic) if (p.num_segments > 1 && flops > (int64_t{1} << 18))
  for (int32_t i = 0; i < p.num_segments; ++i) {
    const LoraSegment& seg = p.segments[i];
    const int64_t n = seg.end - seg.begin;
    const int32_t r = seg.pair.rank;
    float* tmp = p.scratch + offsets[i];
    // BLAS even for one token: OpenBLAS turns a one-row GEMM into a vectorised GEMV, several
    // times faster than a plain loop, whose float reduction the compiler may not reorder.
    if (r == 0) continue;
    sgemm(true, n, r, p.in, 1.0f, p.x + seg.begin * p.x_stride, p.x_stride, seg.pair.a, p.in, 0.0f,
          tmp, r);
    sgemm(true, n, p.out, r, 1.0f, tmp, r, seg.pair.b, r, 1.0f, p.y + seg.begin * p.y_stride,
          p.y_stride);
  }
}

void set_num_threads(int threads) { omp_set_num_threads(threads); }

int num_threads() { return omp_get_max_threads(); }

}  // namespace lorart::cpu

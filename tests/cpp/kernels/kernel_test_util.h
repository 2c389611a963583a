// Helpers shared by the kernel tests: thread-count and instruction-set scopes, and diffs for the
// messages of bitwise checks.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "core/errors.h"
#include "kernels/cpu/cpu_kernels.h"
#include "kernels/cpu/fixed_order_gemm.h"

namespace lorart::testing_util {

// Thread counts the invariance tests try (more than the machine's cores is fine).
constexpr int kThreadCounts[] = {1, 2, 3};

// Sets the kernels' thread count (OpenMP's count of the calling thread) for one scope.
class ScopedThreads {
 public:
  explicit ScopedThreads(int threads) : saved_(cpu::num_threads()) {
    cpu::set_num_threads(threads);
  }
  ~ScopedThreads() { cpu::set_num_threads(saved_); }

 private:
  int saved_;
};

// Every GEMM instruction set this CPU runs, so that one machine tests each set's kernels.
inline std::vector<cpu::GemmIsa> supported_gemm_isas() {
  const cpu::GemmIsa saved = cpu::gemm_isa();
  std::vector<cpu::GemmIsa> out;
  for (cpu::GemmIsa isa : {cpu::GemmIsa::kBaseline, cpu::GemmIsa::kAvx2, cpu::GemmIsa::kAvx512}) {
    try {
      cpu::set_gemm_isa(isa);
      out.push_back(isa);
    } catch (const InvalidArgument&) {
    }
  }
  cpu::set_gemm_isa(saved);
  return out;
}

// Selects a GEMM instruction set for one scope.
class ScopedGemmIsa {
 public:
  explicit ScopedGemmIsa(cpu::GemmIsa isa) : saved_(cpu::gemm_isa()) { cpu::set_gemm_isa(isa); }
  ~ScopedGemmIsa() { cpu::set_gemm_isa(saved_); }

 private:
  cpu::GemmIsa saved_;
};

// Largest |a - b| over n floats.
inline double max_abs_diff(const float* a, const float* b, int64_t n) {
  double d = 0.0;
  for (int64_t i = 0; i < n; ++i) d = std::max(d, std::abs(double{a[i]} - b[i]));
  return d;
}

}  // namespace lorart::testing_util

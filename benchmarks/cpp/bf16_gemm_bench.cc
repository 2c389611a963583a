// GEMM throughput of the CPU backend's precisions on the 1.1B model's shapes:
//   exact float32 (linear, float32 weights), exact on bf16 weights (gemm_nt widening bf16 in
//   registers, split over threads as linear does; row-major and k32-interleaved), and
//   precision="bfloat16" (linear_bf16) on each bf16 instruction set this CPU runs, both layouts.
//   Variants run round-robin, `reps` rounds; prints the median GFLOP/s and weight GB/s per shape
//   and the load average. Checks each bf16 variant against the exact result before timing. Usage:
//   lorart_bf16_gemm_bench [reps] [threads] [max_m]
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "kernels/cpu/bf16_gemm.h"
#include "kernels/cpu/cpu_kernels.h"
#include "kernels/cpu/fixed_order_gemm.h"

namespace {

using namespace lorart;

double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

double load_average() {
  double avg = -1.0;
  if (FILE* f = std::fopen("/proc/loadavg", "r")) {
    if (std::fscanf(f, "%lf", &avg) != 1) avg = -1.0;
    std::fclose(f);
  }
  return avg;
}

struct Variant {
  std::string name;
  double weight_bytes_per_element;
  std::function<void()> run;
  std::vector<double> seconds;
};

void exact_bf16(const float* x, const uint16_t* w, int64_t m, int64_t n, int64_t k, float* y) {
  const int threads = omp_get_max_threads();
#pragma omp parallel num_threads(threads)
  {
    const int64_t per = (n + omp_get_num_threads() - 1) / omp_get_num_threads();
    const int64_t block = (per + 63) / 64 * 64;
    const int64_t begin = std::min<int64_t>(n, omp_get_thread_num() * block);
    const int64_t end = std::min<int64_t>(n, begin + block);
    if (begin < end) cpu::gemm_nt(DType::kBFloat16, m, begin, end, k, x, k, w, k, 0.0f, y, n);
  }
}

}  // namespace

int main(int argc, char** argv) {
  const int reps = argc > 1 ? std::atoi(argv[1]) : 5;
  if (argc > 2) omp_set_num_threads(std::atoi(argv[2]));
  const int64_t max_m = argc > 3 ? std::atoll(argv[3]) : 1 << 30;
  const int64_t shapes[][3] = {{1, 2560, 2048},    {1, 11264, 2048},    {8, 11264, 2048},
                               {512, 11264, 2048}, {4096, 11264, 2048}, {4096, 2048, 5632}};
  std::vector<cpu::Bf16Isa> isas;
  for (cpu::Bf16Isa isa :
       {cpu::Bf16Isa::kAmx, cpu::Bf16Isa::kAvx512Bf16, cpu::Bf16Isa::kEmulated}) {
    try {
      cpu::set_bf16_isa(isa);
      isas.push_back(isa);
    } catch (const std::exception&) {
    }
  }
  std::printf("threads %d, reps %d, load average at start %.2f\n", omp_get_max_threads(), reps,
              load_average());
  std::printf("%-20s %-22s %10s %10s %10s\n", "M,N,K", "variant", "ms", "GFLOP/s", "GB/s(w)");
  for (const auto& s : shapes) {
    const int64_t m = s[0], n = s[1], k = s[2];
    if (m > max_m) continue;
    std::vector<float> x(m * k), wf(n * k), y(m * n), ref(m * n);
    uint32_t state = 1;
    auto rnd = [&] {
      state = state * 1664525u + 1013904223u;
      return static_cast<float>(state >> 8) / 16777216.0f - 0.5f;
    };
    for (float& v : x) v = rnd();
    for (float& v : wf) v = rnd();
    // 64-byte aligned bf16 weights, as a loader that aligns its buffers gives them (AMX reads
    // aligned rows in place; others are copied into aligned panels at prefill sizes).
    std::vector<uint16_t> wb_storage(n * k + 32);
    uint16_t* wb_data =
        wb_storage.data() + (64 - reinterpret_cast<uintptr_t>(wb_storage.data()) % 64) % 64 / 2;
    struct {
      uint16_t* ptr;
      uint16_t* data() const { return ptr; }
    } wb{wb_data};
    convert_floats(wf.data(), DType::kFloat32, wb.data(), DType::kBFloat16, n * k);
    std::vector<Variant> variants;
    variants.push_back({"exact f32 weights", 4.0, [&] {
                          cpu::linear({x.data(),
                                       k,
                                       {wf.data(), DType::kFloat32, nullptr, k},
                                       y.data(),
                                       n,
                                       m,
                                       n,
                                       k,
                                       0.0f,
                                       Precision::kFloat32});
                        }});
    variants.push_back(
        {"exact bf16 weights", 2.0, [&] { exact_bf16(x.data(), wb.data(), m, n, k, y.data()); }});
    variants.push_back({"exact bf16 (linear)", 2.0, [&] {
                          cpu::linear({x.data(),
                                       k,
                                       {wb.data(), DType::kBFloat16, nullptr, k},
                                       y.data(),
                                       n,
                                       m,
                                       n,
                                       k,
                                       0.0f,
                                       Precision::kFloat32});
                        }});
    // The same weights in the layout the model keeps bfloat16 matrices in on the CPU.
    std::vector<uint16_t> wi_storage(n * k + 32);
    uint16_t* wi =
        wi_storage.data() + (64 - reinterpret_cast<uintptr_t>(wi_storage.data()) % 64) % 64 / 2;
    std::copy(wb.data(), wb.data() + n * k, wi);
    cpu::to_layout(wi, n, k, k, WeightLayout::kK32Interleaved);
    variants.push_back({"exact bf16 interleaved", 2.0, [&] {
                          cpu::linear(
                              {x.data(),
                               k,
                               {wi, DType::kBFloat16, nullptr, k, WeightLayout::kK32Interleaved},
                               y.data(),
                               n,
                               m,
                               n,
                               k,
                               0.0f,
                               Precision::kFloat32});
                        }});
    for (cpu::Bf16Isa isa : isas) {
      if (isa == cpu::Bf16Isa::kEmulated && m > 8) continue;  // minutes at prefill sizes
      for (WeightLayout layout : {WeightLayout::kRowMajor, WeightLayout::kK32Interleaved}) {
        const bool interleaved = layout == WeightLayout::kK32Interleaved;
        variants.push_back(
            {std::string("bf16 ") + cpu::bf16_isa_name(isa) + (interleaved ? " interleaved" : ""),
             2.0, [&, isa, layout, interleaved] {
               cpu::set_bf16_isa(isa);
               cpu::linear_bf16(x.data(), k, interleaved ? wi : wb.data(), DType::kBFloat16, m, n,
                                k, 0.0f, y.data(), n, layout);
             }});
      }
    }
    // Check before timing: every bf16 variant within bf16 rounding of the exact result.
    exact_bf16(x.data(), wb.data(), m, n, k, ref.data());
    for (size_t v = 2; v < variants.size(); ++v) {
      variants[v].run();
      double worst = 0.0, scale = 0.0;
      for (int64_t i = 0; i < m * n; ++i) {
        worst = std::max(worst, double(std::abs(y[i] - ref[i])));
        scale = std::max(scale, double(std::abs(ref[i])));
      }
      if (worst > 0.02 * scale) {
        std::printf("%s: max |diff| %g vs exact\n", variants[v].name.c_str(), worst);
        return 1;
      }
    }
    const double flops = 2.0 * m * n * k;
    const int rounds = flops > 1e10 ? std::max(3, reps / 2) : reps * 4;
    for (int r = 0; r < rounds; ++r) {
      for (Variant& v : variants) {
        const double t0 = now();
        v.run();
        v.seconds.push_back(now() - t0);
      }
    }
    for (Variant& v : variants) {
      std::sort(v.seconds.begin(), v.seconds.end());
      const double t = v.seconds[v.seconds.size() / 2];
      std::printf("%-20s %-22s %10.3f %10.1f %10.1f\n",
                  (std::to_string(m) + "," + std::to_string(n) + "," + std::to_string(k)).c_str(),
                  v.name.c_str(), t * 1e3, flops / t / 1e9,
                  n * k * v.weight_bytes_per_element / t / 1e9);
    }
  }
  std::printf("load average at end %.2f\n", load_average());
  cpu::set_bf16_isa(isas.front());
  return 0;
}

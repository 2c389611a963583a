// The CPU weight layouts the kernels read (WeightLayout in kernels/params.h).
#include <algorithm>
#include <cstring>

#include "kernels/cpu/cpu_kernels.h"

namespace lorart::cpu {

void interleave_k32(uint16_t* row, int64_t k) {
  uint16_t block[32];
  for (int64_t b = 0; b + 32 <= k; b += 32) {
    for (int j = 0; j < 16; ++j) {
      block[2 * j] = row[b + j];
      block[2 * j + 1] = row[b + 16 + j];
    }
    std::memcpy(row + b, block, sizeof(block));
  }
}

void to_layout(uint16_t* w, int64_t rows, int64_t cols, int64_t stride, WeightLayout layout) {
  if (layout != WeightLayout::kK32Interleaved) return;
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) interleave_k32(w + r * stride, cols);
}

}  // namespace lorart::cpu

// How the CPU GEMMs (linear, linear_bf16) split output columns across OpenMP threads: contiguous
// blocks, multiples of kColumnAlign so every thread's block keeps the wide kernels busy. The split
// only decides who computes a column, never how it is summed. Only csrc/kernels/cpu/ includes
// this.
#pragma once

#include <algorithm>
#include <cstdint>
#include <utility>

namespace lorart::cpu {

constexpr int64_t kColumnAlign = 64;

// [begin, end) of thread `thread`'s share of n columns among `threads`.
inline std::pair<int64_t, int64_t> column_share(int64_t n, int threads, int thread) {
  const int64_t per = (n + threads - 1) / threads;
  const int64_t block = (per + kColumnAlign - 1) / kColumnAlign * kColumnAlign;
  const int64_t begin = std::min<int64_t>(n, thread * block);
  return {begin, std::min<int64_t>(n, begin + block)};
}

}  // namespace lorart::cpu

// CUDA twin of cpu::lora_gemm (ops::lora_gemm / lora_gemm_slices on a CUDA context): the
// grouped LoRA shrink + expand of one step's packed tokens, every token with its own adapter slot.
//
// Two launches on the caller's stream, each over tiles of consecutive tokens (a tile may span
// several runs, i.e. several adapters; a block finds them by binary search in the device runs):
// - shrink: grid (token tiles, K chunks, slices). A block stages its tokens' x chunk (kLoraChunk
//   columns) in shared memory; each warp takes rank rows of the run's A and writes the chunk's
//   partial dot products to scratch[slice][chunk][token][rank]. Split-K over fixed chunks fills
//   the GPU at decode (K = hidden >> rank) without atomics.
// - expand: grid (token tiles, column tiles of y). A block sums its tokens' partials over the
//   chunks in ascending order, then each thread adds, for its two columns, the rank-ascending dot
//   product with B^T's rows, slice after slice (the slices' order, as the CPU applies them).
// Work is proportional to each adapter's own rank (no padding to the largest; the rank axis of
// the scratch is only an index stride) and tokens whose slot does not adapt a module cost nothing.
//
// Batch invariance: every output element is reduced in one fixed order (lane-contiguous blocks
// of 8 columns, a fixed butterfly across the warp, chunks ascending, rank ascending) whatever the
// tile size, the run boundaries or the number of tokens, so a token's result depends only on its
// own x and adapter. Not bitwise the CPU kernel's order: tests compare within a tolerance.
#pragma once

#include <cstdint>

#include "kernels/params.h"

namespace lorart::cuda {

constexpr int64_t kLoraChunk = 256;  // K columns per shrink block (32 lanes x 8)

// Floats of scratch the CUDA kernel needs for tokens [0, num_tokens), ranks up to `rank_stride`,
// `num_slices` slices of input width `in`.
inline int64_t lora_scratch_floats(int64_t num_tokens, int64_t rank_stride, int64_t in,
                                   int64_t num_slices) {
  const int64_t chunks = (in + kLoraChunk - 1) / kLoraChunk;
  return num_slices * chunks * num_tokens * rank_stride;
}

#if LORART_WITH_CUDA
// Enqueues the shrink and expand on `stream` (a cudaStream_t) and returns; DeviceError if a
// launch is refused. The caller validated everything (ops::lora_gemm_slices).
void lora_gemm(const CudaLoraParams& p, void* stream);
#endif

}  // namespace lorart::cuda

// CUDA twin of cpu::linear (ops::linear on a CUDA context): y [M, N] = x [M, K] @ w [N, K]^T +
// beta * y, x and y float32 with any row stride, w float32 / float16 / bfloat16 row-major.
//
// - Precision::kBFloat16 with a 16-bit w: tensor cores (mma.sync m16n8k16, float32 accumulation),
//   x rounded (nearest even) to w's 16-bit type as each tile is staged, as torch does for a bf16
//   or fp16 model. (The CPU reference rounds float16 weights to bfloat16 instead; here fp16
//   weights multiply fp16 activations.)
// - Precision::kFloat32, or float32 w: float32 fused multiply-adds, k ascending.
//
// Batch invariance: every tile shape (one per range of M) accumulates each output element over k
// in the same order (k16 steps ascending for the tensor cores, single k ascending for the FMA
// path), with no split of K, so a row's output never depends on M or on the other rows.
// Enqueues on `stream` (a cudaStream_t; null = the legacy default stream) and returns; throws
// InvalidArgument for a layout or dtype it does not read and DeviceError if a launch is refused.
// Needs no scratch.
#pragma once

#include "kernels/params.h"

namespace lorart::cuda {

void linear(const LinearParams& p, void* stream);

}  // namespace lorart::cuda

// The kernels of precision="bfloat16": y[M, N] = bf16(x)[M, K] @ bf16(w)[N, K]^T (+ beta * y)
// with products of bfloat16 pairs accumulated in float32 (linear_bf16 in cpu_kernels.h is the
// entry point; this header picks the instruction set, for tests and benchmarks).
//
// Batch invariance is the contract, as for the exact kernels (fixed_order_gemm.h): an output
// element's arithmetic depends only on K and on its own activation row and weight row, never on
// M, on which rows share the call, on the column split or on the thread count.
//
// Rounding: activations are rounded to bfloat16 (nearest even, NaN kept quiet) once per call;
// float32 / float16 weights are rounded the same way as they are read (bfloat16 weights are used
// in place). Subnormal bfloat16 inputs count as zero and subnormal results flush to zero (the
// instructions' fixed DAZ / FTZ; the thread's MXCSR does not change them).
//
// Order per output element, by instruction set (picked once per process, Bf16Isa):
// - kAvx512Bf16 (vdpbf16ps) and kEmulated (plain C++, for CPUs without AVX512-BF16): 16 float32
//   lanes; lane l takes k = 32 j + 2 l + 1 then k = 32 j + 2 l for j = 0, 1, ... in order (for
//   weights in WeightLayout::kK32Interleaved, the model's bf16 matrices: k = 32 j + 16 + l then
//   32 j + l within each full block), each
//   a fused multiply-add (bfloat16 products are exact in float32) rounded to nearest even and
//   flushed to zero if subnormal; a K tail is zero-padded. Then one fixed pairwise fold of the
//   16 lanes (lane i + 8, then + 4, + 2, + 1) in float32 under the caller's MXCSR. The two sets
//   give bitwise the same results (tests/cpp/kernels/bf16_gemm_test.cc checks it on random
//   and near-underflow inputs). One corner is not proven: a sum within 2^-150 below FLT_MIN rounds
//   to FLT_MIN in the emulation, which the hardware might flush if it detects tininess before
//   rounding (never seen).
// - kAmx (tdpbf16ps, CPUs with AMX-BF16): per element, C += the 32 products of one K block (in
//   the tile unit's own internal order and rounding), blocks from k = 0 up, a K tail zero-padded;
//   not bitwise equal to the other two, but per element independent of the tile's other rows
//   and columns (tested), hence of the batch.
//
// Speed: with AMX, bfloat16 weights are read in place when K % 32 == 0; at prefill sizes (M > 16)
// only if the weights start on a 64-byte boundary (unaligned tile loads ran ~6x slower), else each
// ~1 MB panel is copied into aligned storage first (~20% slower). Loaders should align weights.
#pragma once

namespace lorart::cpu {

enum class Bf16Isa { kEmulated, kAvx512Bf16, kAmx };

const char* bf16_isa_name(Bf16Isa isa);
// The set in use: kAmx where the CPU has AMX-BF16 and the kernel grants tile data to the process
// (Linux arch_prctl), else kAvx512Bf16 where the CPU has it, else kEmulated.
Bf16Isa bf16_isa();
// For tests and benchmarks that compare sets on one machine; changing it between two calls gives
// up their bitwise agreement. Throws InvalidArgument for a set this CPU (or OS) cannot run.
void set_bf16_isa(Bf16Isa isa);

}  // namespace lorart::cpu

// CUDA token selection (ops::sample on a CUDA context): the CPU sampler's algorithm
// (kernels/cpu/sampling.cc) step for step, one block per sampled row, so that identical logits
// give identical tokens and RNG states on both backends. Plain C++ header; called by ops.cc only.
#pragma once

#include <cstdint>

#include "kernels/params.h"

namespace lorart::cuda {

// Blocks of one launch: rows beyond it are taken in turn by the same blocks (a row's result never
// depends on which block ran it), so the workspace is bounded by this many rows.
inline constexpr int64_t kSampleMaxBlocks = 64;

// Device bytes of SampleParams::workspace for `num_samples` rows of `vocab` logits.
int64_t sample_workspace_bytes(int64_t num_samples, int64_t vocab);

// Every pointer of `p` in device memory: logits, rows, params, rng_states (advanced in place),
// tokens, log_probs (or null) and workspace (at least sample_workspace_bytes bytes). The caller
// has validated the host copies of rows and params. Asynchronous on `stream`.
void sample(const SampleParams& p, void* stream);

}  // namespace lorart::cuda

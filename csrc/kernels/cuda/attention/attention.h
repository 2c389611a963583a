// CUDA paged attention (ops::paged_attention on a CUDA context): KV append, split-KV decode and
// causal prefill over a paged cache in float32 / float16 / bfloat16. Plain C++ (no CUDA headers):
// ops.cc includes it in every build, for the split constants that size the workspace; the
// launcher exists only in builds with the CUDA backend.
//
// Work split (all static in the step's bounds, so a sequence's numbers never depend on the rest
// of the batch):
// - append: one thread per 16-byte chunk of the chunk's K / V rows, written in the cache dtype
//   (round to nearest even), before the attention kernels on the same stream.
// - decode (sequences whose chunk is one token): one block per (sequence, KV head, split of
//   kAttentionSplitKeys absolute key positions). The block holds all `group` query heads of its
//   KV head, so each K / V row is read once per query group. A sequence of one split writes its
//   output directly; longer ones write unnormalised partials (acc, max, sum) to the workspace and
//   a combine kernel folds them in split order. The split depends only on the sequence's length.
// - prefill (chunks of more than one token): one block per (sequence, tile of kPrefillRows query
//   rows, KV head); a row is a (token, query head of the group) pair, so the K / V tiles loaded
//   to shared memory serve the whole group. 16-bit caches with head_dim % 16 == 0 use tensor
//   cores (wmma, float32 accumulation, the query and probabilities rounded to the cache's
//   dtype); other caches use float32 FMAs. Online softmax in float32 over key tiles in increasing
//   order.
// Called only by ops::paged_attention, which has checked shapes and bounds (the batch's arrays
// are device memory: the caller validated them on the host).
#pragma once

#include <cstdint>

#include "kernels/params.h"

namespace lorart::cuda {

// Key positions per decode split: split s of a sequence covers [s * kAttentionSplitKeys,
// (s + 1) * kAttentionSplitKeys) of its own positions.
inline constexpr int32_t kAttentionSplitKeys = 256;
// The kernels keep a head's row in registers / shared memory sized for this bound.
inline constexpr int32_t kAttentionMaxHeadDim = 256;

// Appends the chunk's K / V rows, then writes p.out (p.workspace: the split-KV partials, at
// least the bytes ops::paged_attention_workspace_bytes gives for p.num_seqs and p.max_kv_len).
// Asynchronous on `stream` (a cudaStream_t); throws DeviceError if a launch fails.
void paged_attention(const PagedAttentionParams& p, void* stream);

}  // namespace lorart::cuda

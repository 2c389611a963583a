// ForwardBatch: the per-step description of a packed, unpadded batch that mixes prefill chunks and
// single decode tokens of different sequences. Flat int32 host arrays, built once per step by the
// caller (executor or Python) and copied to the device in one transfer by a CUDA backend.
#pragma once

#include "core/tensor.h"

namespace lorart {

struct ForwardBatch {
  Tensor token_ids;       // [T] int32, each in [0, vocab_size)
  Tensor seq_starts;      // [S + 1] int32: sequence s owns tokens [seq_starts[s], seq_starts[s+1])
  Tensor context_lens;    // [S] int32: tokens of s already in the KV cache (positions start here)
  Tensor block_tables;    // [S, max_blocks] int32: block b holds positions [b*bs, (b+1)*bs)
  Tensor lora_slots;      // [S] int32: adapter slot per sequence, -1 = base model
  Tensor logits_indices;  // [N] int32: tokens whose logits are returned, in this order
};

}  // namespace lorart

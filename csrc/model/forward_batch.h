// ForwardBatch: the flat description of one step's packed, unpadded batch that mixes prefill
// chunks and single decode tokens of different sequences. Int32 host arrays the caller (the
// executor's step, or Python's Model.forward) builds once per step, ready to go to a device in
// one copy and to other tensor-parallel ranks in one broadcast; with the step's LoraTable it is
// everything the model reads.
#pragma once

#include "core/tensor.h"

namespace lorart {

struct ForwardBatch {
  Tensor token_ids;       // [T] int32, each in [0, vocab_size)
  Tensor positions;       // [T] int32: context_lens[s] + (t - seq_starts[s]) for token t of s
  Tensor seq_starts;      // [S + 1] int32: sequence s owns tokens [seq_starts[s], seq_starts[s+1])
  Tensor context_lens;    // [S] int32: tokens of s already in the KV cache (positions start here)
  Tensor block_tables;    // [S, max_blocks] int32: block b holds positions [b*bs, (b+1)*bs)
  Tensor lora_slots;      // [S] int32: LoraTable slot per sequence, -1 = base model
  Tensor logits_indices;  // [N] int32: tokens whose logits are returned, in this order
};

}  // namespace lorart

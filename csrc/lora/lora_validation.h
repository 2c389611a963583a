// The checks an adapter must pass before it may enter the LoRA cache (DESIGN.md, "Validation at
// enqueue"). Pure functions of their arguments; called by the executor at enqueue and by
// lorart.lora.validate. Every failure is a LoraError naming the row, the field, the value and
// the limit.
#pragma once

#include <cstdint>
#include <optional>

#include "lora/lora_target.h"
#include "lora/lora_tensors.h"

namespace lorart {

struct LoraLimits {
  int64_t max_lora_rank = 64;
  std::optional<DType> dtype;  // a dtype the weights must have; unset = accept any float dtype
};

// The largest vocabulary an adapter may bring (token ids are int32).
constexpr int64_t kMaxLoraVocabSize = int64_t{1} << 24;

// `weights` or `config` may be null (a request that carries only one of them): that is an error
// too. Checks, in order: both present; row counts agree; at least one row unless the weights
// carry embedding-side parts; dtype matches (when limits.dtype is set); per row: module id known
// and present in the model, 0 <= layer_idx < num_layers, 0 < adapter_size <= max_lora_rank,
// is_dora 0 or 1, no (module, layer) twice, the row is long enough for r*Hi + Ho*r values (+ Ho
// magnitudes for DoRA), and those values are finite; then validate_lora_embeddings.
void validate_lora(const LoraWeights* weights, const LoraConfig* config, const LoraTarget& model,
                   const LoraLimits& limits);

// The embedding-side parts against the model: each part's shape (see lora_embeddings.h), V the
// same in every part that has it, base vocab_size <= V <= kMaxLoraVocabSize, LoRA ranks in
// [1, max_lora_rank] with A and B both given and of one rank, dtype (when limits.dtype is set),
// and finite values. Throws LoraError naming the part, the dimension and the limit.
void validate_lora_embeddings(const LoraEmbeddings& parts, const LoraTarget& model,
                              const LoraLimits& limits);

// Values of row `row` actually used by its adapter: r*Hi + Ho*r (+ Ho for a DoRA row).
int64_t lora_row_values(const LoraTarget& model, const LoraConfigRow& row);

}  // namespace lorart

// LoraTable: the adapters one forward uses, laid out for the LoRA op. Slot s owns
// pairs_per_slot() LoraPair entries (A, B^T, dtype, rank), indexed by layer * lora_module::kCount
// + module, copied from its LoraAdapter; a sequence names its slot in ForwardBatch::lora_slots.
// It also keeps each slot's adapter, whose embedding-side parts (own tables, vocabulary, lm_head
// LoRA) the forward reads per slot.
// The caller (the executor's step, Python's Model.forward) fills it once per step and keeps the
// adapters alive until the forward returns; clear() keeps the capacity, so steady-state steps do
// not allocate. Not thread-safe.
#pragma once

#include <vector>

#include "kernels/ops.h"
#include "model/lora_adapter.h"
#include "model/model_config.h"

namespace lorart {

class LoraTable {
 public:
  explicit LoraTable(const ModelConfig& config);

  void clear();
  // Appends `adapter` as the next slot and returns it. Throws InvalidArgument when the adapter
  // was laid out for a model of another shape.
  int32_t add(const LoraAdapter& adapter);
  // Appends a slot that adapts nothing (rank 0 everywhere), for callers whose slot numbers
  // stay fixed while an adapter is absent.
  int32_t add_none();

  int32_t num_slots() const { return num_slots_; }
  int64_t pairs_per_slot() const { return pairs_per_slot_; }
  int64_t max_rank() const { return max_rank_; }  // over the slots (0 when empty)
  // Slot's adapter; null for an add_none() slot or a slot out of range.
  const LoraAdapter* adapter(int32_t slot) const {
    return slot >= 0 && slot < num_slots_ ? adapters_[slot] : nullptr;
  }
  // The vocabulary of a sequence in `slot` (-1 = base): its adapter's, else `base_vocab`.
  int64_t vocab_size(int32_t slot, int64_t base_vocab) const {
    const LoraAdapter* a = adapter(slot);
    return a != nullptr && a->vocab_size() > 0 ? a->vocab_size() : base_vocab;
  }
  // Whether any slot brings embedding-side parts; the widest slot vocabulary (0 when none has
  // its own).
  bool has_embedding_parts() const { return has_embedding_parts_; }
  bool has_dora() const { return has_dora_; }
  int64_t max_vocab_size() const { return max_vocab_size_; }
  const LoraAdapter::ModelShape& model_shape() const { return shape_; }
  // The op's view over `runs` (token runs that share a slot).
  ops::LoraBatch batch(const std::vector<LoraRun>& runs) const;

 private:
  LoraAdapter::ModelShape shape_;
  int64_t pairs_per_slot_;
  int32_t num_slots_ = 0;
  int64_t max_rank_ = 0;
  bool has_embedding_parts_ = false, has_dora_ = false;
  int64_t max_vocab_size_ = 0;
  std::vector<LoraPair> pairs_;               // [num_slots * pairs_per_slot]
  std::vector<const LoraAdapter*> adapters_;  // [num_slots]
};

}  // namespace lorart

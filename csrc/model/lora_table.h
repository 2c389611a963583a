// LoraTable: the adapters one forward uses, laid out for the LoRA op. Slot s owns
// pairs_per_slot() LoraPair entries (A, B^T, dtype, rank), indexed by layer * lora_module::kCount
// + module, copied from its LoraAdapter; a sequence names its slot in ForwardBatch::lora_slots.
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
  const LoraAdapter::ModelShape& model_shape() const { return shape_; }
  // The op's view over `runs` (token runs that share a slot).
  ops::LoraBatch batch(const std::vector<LoraRun>& runs) const;

 private:
  LoraAdapter::ModelShape shape_;
  int64_t pairs_per_slot_;
  int32_t num_slots_ = 0;
  int64_t max_rank_ = 0;
  std::vector<LoraPair> pairs_;  // [num_slots * pairs_per_slot]
};

}  // namespace lorart

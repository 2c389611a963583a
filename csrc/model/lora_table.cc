#include "model/lora_table.h"

#include <algorithm>

#include "core/errors.h"
#include "lora/module_ids.h"

namespace lorart {

LoraTable::LoraTable(const ModelConfig& config)
    : shape_(LoraAdapter::shape_of(config)),
      pairs_per_slot_(config.num_layers * lora_module::kCount) {}

void LoraTable::clear() {
  pairs_.clear();
  adapters_.clear();
  num_slots_ = 0;
  max_rank_ = 0;
  has_embedding_parts_ = false;
  has_dora_ = false;
  max_vocab_size_ = 0;
}

int32_t LoraTable::add(const LoraAdapter& adapter) {
  if (!(adapter.model_shape() == shape_)) {  // its (layer, module) table would be misread
    raise<InvalidArgument>("the adapter was laid out for a model of another shape (",
                           adapter.model_shape(), "; this model: ", shape_, ")");
  }
  pairs_.insert(pairs_.end(), adapter.pairs(), adapter.pairs() + pairs_per_slot_);
  adapters_.push_back(&adapter);
  max_rank_ = std::max(max_rank_, adapter.max_rank());
  has_embedding_parts_ = has_embedding_parts_ || adapter.has_embedding_parts();
  has_dora_ = has_dora_ || adapter.has_dora();
  max_vocab_size_ = std::max(max_vocab_size_, adapter.vocab_size());
  return num_slots_++;
}

int32_t LoraTable::add_none() {
  pairs_.resize(pairs_.size() + static_cast<size_t>(pairs_per_slot_));
  adapters_.push_back(nullptr);
  return num_slots_++;
}

ops::LoraBatch LoraTable::batch(const std::vector<LoraRun>& runs) const {
  ops::LoraBatch b;
  b.runs = runs.data();
  b.num_runs = static_cast<int32_t>(runs.size());
  b.pairs = pairs_.data();
  b.num_slots = num_slots_;
  b.pairs_per_slot = pairs_per_slot_;
  return b;
}

}  // namespace lorart

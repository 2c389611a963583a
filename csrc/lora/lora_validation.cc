#include "lora/lora_validation.h"

#include <cmath>
#include <map>
#include <string>
#include <utility>

#include "core/errors.h"
#include "lora/module_ids.h"

namespace lorart {

int64_t lora_row_values(const LoraTarget& model, const LoraConfigRow& row) {
  if (!model.has_module(row.module_id)) {
    raise<LoraError>("module_id ", row.module_id, " (", lora_module_name(row.module_id),
                     ") is not a LoRA module of ", model.architecture,
                     " (supported: ", model.module_names(), ")");
  }
  const LoraModuleDims dims = model.dims[row.module_id];
  return static_cast<int64_t>(row.adapter_size) * (dims.in + dims.out) +
         (row.is_dora != 0 ? dims.out : 0);
}

namespace {

void check_row(const LoraTarget& model, const LoraLimits& limits, int64_t i,
               const LoraConfigRow& row) {
  if (find_lora_module(row.module_id) == nullptr) {
    raise<LoraError>("lora_config row ", i, ": module_id ", row.module_id,
                     " is unknown (valid ids are 0..", lora_module::kCount - 1, ")");
  }
  if (!model.has_module(row.module_id)) {
    raise<LoraError>("lora_config row ", i, ": module_id ", row.module_id, " (",
                     lora_module_name(row.module_id), ") is not a LoRA module of ",
                     model.architecture, " (supported: ", model.module_names(), ")");
  }
  if (row.layer_idx < 0 || row.layer_idx >= model.num_layers) {
    raise<LoraError>("lora_config row ", i, ": layer_idx ", row.layer_idx, " is out of range [0, ",
                     model.num_layers, ") (num_layers = ", model.num_layers, ")");
  }
  if (row.adapter_size <= 0 || row.adapter_size > limits.max_lora_rank) {
    raise<LoraError>("lora_config row ", i, ": adapter_size ", row.adapter_size,
                     " must be in [1, max_lora_rank = ", limits.max_lora_rank, "]");
  }
  if (row.is_dora != 0 && row.is_dora != 1) {
    raise<LoraError>("lora_config row ", i, ": is_dora ", row.is_dora, " must be 0 or 1");
  }
}

const char* describe_value(float v) { return std::isnan(v) ? "nan" : "inf"; }

void check_finite(const Tensor& t, const char* name) {
  for (int64_t i = 0; i < t.numel(); ++i) {
    const float v = load_float(t.data(), t.dtype(), static_cast<size_t>(i));
    if (!std::isfinite(v)) {
      raise<LoraError>(name, "[", i / t.size(1), ", ", i % t.size(1), "] is ", describe_value(v),
                       "; LoRA weights must be finite");
    }
  }
}

// `t` must be [rows, cols] (a dimension < 0 is free and returned through it).
void check_shape(const Tensor& t, const char* name, const char* layout, int64_t& rows,
                 int64_t& cols) {
  if ((rows >= 0 && t.size(0) != rows) || (cols >= 0 && t.size(1) != cols)) {
    raise<LoraError>(name, " must be ", layout, " (", rows < 0 ? "any" : std::to_string(rows),
                     " x ", cols < 0 ? "any" : std::to_string(cols), " for this model), got ",
                     t.shape_str());
  }
  rows = t.size(0);
  cols = t.size(1);
}

void check_rank(int64_t rank, const char* name, const LoraLimits& limits) {
  if (rank <= 0 || rank > limits.max_lora_rank) {
    raise<LoraError>(name, " has rank ", rank,
                     "; it must be in [1, max_lora_rank = ", limits.max_lora_rank, "]");
  }
}

}  // namespace

void validate_lora(const LoraWeights* weights, const LoraConfig* config, const LoraTarget& model,
                   const LoraLimits& limits) {
  if (weights == nullptr || config == nullptr) {
    raise<LoraError>(weights == nullptr ? "lora_weights" : "lora_config",
                     " is missing: a LoRA adapter needs both lora_weights and lora_config");
  }
  if (weights->num_rows() != config->num_rows()) {
    raise<LoraError>("lora_weights has ", weights->num_rows(), " rows but lora_config has ",
                     config->num_rows(), "; they must describe the same rows");
  }
  const LoraEmbeddings* parts = weights->embeddings();
  if (config->num_rows() == 0 && parts == nullptr) {
    raise<LoraError>("lora_config has no rows: a LoRA adapter adapts at least one (module, layer)",
                     " or brings embedding-side parts (embed_tokens, lm_head)");
  }
  if (limits.dtype && weights->dtype() != *limits.dtype) {
    raise<LoraError>("lora_weights dtype ", dtype_name(weights->dtype()),
                     " does not match the model dtype ", dtype_name(*limits.dtype),
                     "; convert the adapter to ", dtype_name(*limits.dtype), " first");
  }
  std::map<std::pair<int32_t, int32_t>, int64_t> seen;  // (module, layer) -> first row
  for (int64_t i = 0; i < config->num_rows(); ++i) {
    const LoraConfigRow row = config->row(i);
    check_row(model, limits, i, row);
    const auto [it, inserted] = seen.emplace(std::make_pair(row.module_id, row.layer_idx), i);
    if (!inserted) {
      raise<LoraError>("lora_config rows ", it->second, " and ", i, " both adapt ",
                       lora_module_name(row.module_id), " of layer ", row.layer_idx,
                       "; each (module, layer) may appear once");
    }
    const LoraModuleDims dims = model.dims[row.module_id];
    const int64_t needed = lora_row_values(model, row);
    if (needed > weights->row_size()) {
      raise<LoraError>("lora_weights row ", i, " (", lora_module_name(row.module_id), ", layer ",
                       row.layer_idx, "): adapter_size ", row.adapter_size, " needs ", needed,
                       " values (", row.adapter_size, "*", dims.in, " in + ", dims.out, "*",
                       row.adapter_size, " out",
                       row.is_dora != 0 ? " + " + std::to_string(dims.out) + " magnitudes" : "",
                       ") but rows hold ", weights->row_size());
    }
    for (int64_t j = 0; j < needed; ++j) {
      const float v = weights->value(i, j);
      if (!std::isfinite(v)) {
        raise<LoraError>("lora_weights row ", i, " (", lora_module_name(row.module_id), ", layer ",
                         row.layer_idx, "): value at column ", j, " is ", describe_value(v),
                         "; LoRA weights must be finite");
      }
    }
  }
  if (parts != nullptr) validate_lora_embeddings(*parts, model, limits);
}

void validate_lora_embeddings(const LoraEmbeddings& e, const LoraTarget& model,
                              const LoraLimits& limits) {
  using P = LoraEmbeddings;
  for (int p = 0; p < P::kNumParts; ++p) {
    if (e.has(p) && limits.dtype && e.part(p).dtype() != *limits.dtype) {
      raise<LoraError>(P::part_name(p), " has dtype ", dtype_name(e.part(p).dtype()),
                       " but the adapter must be ", dtype_name(*limits.dtype));
    }
  }
  const int64_t h = model.hidden_size;
  int64_t vocab = -1;  // the adapter's V, from the first part that has it
  for (int p : {P::kEmbedTokens, P::kLmHead}) {
    if (!e.has(p)) continue;
    int64_t cols = h;
    check_shape(e.part(p), P::part_name(p), "[V, hidden_size]", vocab, cols);
  }
  if (vocab >= 0 && (vocab < model.vocab_size || vocab > kMaxLoraVocabSize)) {
    raise<LoraError>(e.has(P::kEmbedTokens) ? "embed_tokens" : "lm_head", " has ", vocab,
                     " rows (the adapter's vocabulary); it must be in [the base vocab_size = ",
                     model.vocab_size, ", ", kMaxLoraVocabSize, "]");
  }
  if (vocab > model.vocab_size && e.has(P::kEmbedTokens) != e.has(P::kLmHead)) {
    // The other table is the base model's, which has only the base ids.
    raise<LoraError>(e.has(P::kEmbedTokens) ? "embed_tokens" : "lm_head", " has ", vocab,
                     " rows but the adapter brings no ",
                     e.has(P::kEmbedTokens) ? "lm_head" : "embed_tokens",
                     " (the base model's has vocab_size = ", model.vocab_size,
                     " rows): an extended vocabulary needs both tables");
  }
  if (vocab < 0) vocab = model.vocab_size;
  // (A, B) pairs: A [r, in], B [out, r].
  struct Pair {
    int a, b;
    int64_t in, out;
    const char *a_layout, *b_layout;
  };
  for (const Pair& pair :
       {Pair{P::kEmbedLoraA, P::kEmbedLoraB, vocab, h, "[r, V]", "[hidden_size, r]"},
        Pair{P::kLmHeadLoraA, P::kLmHeadLoraB, h, vocab, "[r, hidden_size]", "[V, r]"}}) {
    if (e.has(pair.a) != e.has(pair.b)) {
      raise<LoraError>(P::part_name(e.has(pair.a) ? pair.b : pair.a),
                       " is missing: ", P::part_name(pair.a), " and ", P::part_name(pair.b),
                       " come together");
    }
    if (!e.has(pair.a)) continue;
    if (e.part(pair.a).dtype() != e.part(pair.b).dtype()) {
      raise<LoraError>(P::part_name(pair.a), " is ", dtype_name(e.part(pair.a).dtype()), " but ",
                       P::part_name(pair.b), " is ", dtype_name(e.part(pair.b).dtype()),
                       "; a LoRA pair has one dtype");
    }
    int64_t rank = -1, in = pair.in, out = pair.out;
    check_shape(e.part(pair.a), P::part_name(pair.a), pair.a_layout, rank, in);
    check_rank(rank, P::part_name(pair.a), limits);
    check_shape(e.part(pair.b), P::part_name(pair.b), pair.b_layout, out, rank);
  }
  for (int p = 0; p < P::kNumParts; ++p) {
    if (e.has(p) && !(p == P::kLmHead && e.lm_head_is_embed_tokens())) {
      check_finite(e.part(p), P::part_name(p));
    }
  }
}

}  // namespace lorart

// LoraEmbeddings: the embedding-side parts an adapter may bring beside its per-layer rows (PEFT's
// `modules_to_save` tables and LoRA on `embed_tokens` / `lm_head`), so a request can run with its
// own input embedding, output projection and vocabulary. Each part is an optional 2-D host float
// tensor (float32, float16 or bfloat16) with a shared owner, like LoraWeights' rows; immutable
// and shareable across threads. It rides on LoraWeights (LoraWeights::embeddings), so it travels
// wherever an adapter's weights go: requests, the LoRA cache, the bindings.
//
//   embed_tokens   [V, H]  replacement input embedding table
//   lm_head        [V, H]  replacement output projection (logits = h @ lm_head^T)
//   embed_lora_a   [r, V]  LoRA A of embed_tokens (PEFT's lora_embedding_A)
//   embed_lora_b   [H, r]  LoRA B of embed_tokens, scaling folded in (PEFT's lora_embedding_B)
//   lm_head_lora_a [r, H]  LoRA A of lm_head
//   lm_head_lora_b [V, r]  LoRA B of lm_head, scaling folded in
//
// V is the adapter's vocabulary: the rows of embed_tokens and lm_head when given (they agree),
// else the base model's. A part given twice as the same memory (a kept-tied embed_tokens and
// lm_head) is stored and counted once.
#pragma once

#include <array>
#include <cstdint>
#include <memory>

#include "core/tensor.h"

namespace lorart {

class LoraEmbeddings {
 public:
  enum Part : int {
    kEmbedTokens,
    kLmHead,
    kEmbedLoraA,
    kEmbedLoraB,
    kLmHeadLoraA,
    kLmHeadLoraB,
    kNumParts
  };
  struct Input {
    Tensor tensor;  // undefined: the part is absent
    std::shared_ptr<const void> owner;
  };

  // Throws LoraError naming the part for one that is not a 2-D contiguous host float tensor.
  // Shapes against a model are validate_lora_embeddings' business (lora/lora_validation.h).
  explicit LoraEmbeddings(const std::array<Input, kNumParts>& parts);

  static const char* part_name(int part);  // "embed_tokens", ...
  bool has(int part) const { return parts_[part].tensor.defined(); }
  const Tensor& part(int part) const { return parts_[part].tensor; }
  bool empty() const;
  // Rows of embed_tokens, else of lm_head; 0 when neither is given (the base vocabulary).
  int64_t vocab_size() const;
  // Whether lm_head is embed_tokens (the same memory and shape).
  bool lm_head_is_embed_tokens() const;
  size_t nbytes() const;  // a part shared with embed_tokens counted once
  // Owning copies (a shared part stays shared), in their own dtypes or converted to `dtype`.
  LoraEmbeddings copy() const;
  LoraEmbeddings to(DType dtype) const;
  // Same parts, shapes, dtypes and bytes.
  bool same_as(const LoraEmbeddings& other) const;

 private:
  std::array<Input, kNumParts> parts_;
};

}  // namespace lorart

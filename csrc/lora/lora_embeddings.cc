#include "lora/lora_embeddings.h"

#include <cstring>
#include <optional>

#include "core/buffer.h"
#include "core/errors.h"

namespace lorart {

namespace {

constexpr const char* kNames[LoraEmbeddings::kNumParts] = {
    "embed_tokens", "lm_head", "embed_lora_a", "embed_lora_b", "lm_head_lora_a", "lm_head_lora_b"};

// An owning contiguous copy of `t`, converted to `dtype` when given.
LoraEmbeddings::Input copied(const Tensor& t, std::optional<DType> dtype) {
  const DType to = dtype.value_or(t.dtype());
  auto buffer = std::make_shared<Buffer>(Buffer::allocate(
      static_cast<size_t>(t.numel()) * dtype_size(to), Device::cpu(), "LoRA embedding-side part"));
  convert_floats(t.data(), t.dtype(), buffer->data(), to, t.numel());
  return {buffer->view(to, {t.size(0), t.size(1)}), buffer};
}

LoraEmbeddings copy_parts(const LoraEmbeddings& e, std::optional<DType> dtype) {
  std::array<LoraEmbeddings::Input, LoraEmbeddings::kNumParts> parts;
  for (int p = 0; p < LoraEmbeddings::kNumParts; ++p) {
    if (!e.has(p)) continue;
    if (p == LoraEmbeddings::kLmHead && e.lm_head_is_embed_tokens()) {
      parts[p] = parts[LoraEmbeddings::kEmbedTokens];  // stays shared
      continue;
    }
    parts[p] = copied(e.part(p), dtype);
  }
  return LoraEmbeddings(parts);
}

}  // namespace

LoraEmbeddings::LoraEmbeddings(const std::array<Input, kNumParts>& parts) : parts_(parts) {
  for (int p = 0; p < kNumParts; ++p) {
    const Tensor& t = parts_[p].tensor;
    if (!t.defined()) continue;
    if (!t.device().is_cpu()) {
      raise<LoraError>(kNames[p], " must be in host memory, got a tensor on ", t.device().str());
    }
    if (t.dim() != 2 || !t.is_contiguous() || !is_floating(t.dtype())) {
      raise<LoraError>(kNames[p],
                       " must be a contiguous 2-D float32, float16 or bfloat16 array, got ",
                       t.describe());
    }
  }
}

const char* LoraEmbeddings::part_name(int part) {
  return part >= 0 && part < kNumParts ? kNames[part] : "unknown";
}

bool LoraEmbeddings::empty() const {
  for (int p = 0; p < kNumParts; ++p) {
    if (has(p)) return false;
  }
  return true;
}

int64_t LoraEmbeddings::vocab_size() const {
  if (has(kEmbedTokens)) return part(kEmbedTokens).size(0);
  if (has(kLmHead)) return part(kLmHead).size(0);
  return 0;
}

bool LoraEmbeddings::lm_head_is_embed_tokens() const {
  if (!has(kEmbedTokens) || !has(kLmHead)) return false;
  const Tensor &e = part(kEmbedTokens), &h = part(kLmHead);
  return e.data() == h.data() && e.dtype() == h.dtype() && e.size(0) == h.size(0) &&
         e.size(1) == h.size(1);
}

size_t LoraEmbeddings::nbytes() const {
  size_t total = 0;
  for (int p = 0; p < kNumParts; ++p) {
    if (has(p) && !(p == kLmHead && lm_head_is_embed_tokens())) total += part(p).nbytes();
  }
  return total;
}

LoraEmbeddings LoraEmbeddings::copy() const { return copy_parts(*this, std::nullopt); }

LoraEmbeddings LoraEmbeddings::to(DType dtype) const {
  if (!is_floating(dtype)) {
    raise<LoraError>("LoRA embedding-side parts can only be converted to float32, float16 or ",
                     "bfloat16, not ", dtype_name(dtype));
  }
  return copy_parts(*this, dtype);
}

bool LoraEmbeddings::same_as(const LoraEmbeddings& other) const {
  if (lm_head_is_embed_tokens() != other.lm_head_is_embed_tokens()) return false;
  for (int p = 0; p < kNumParts; ++p) {
    if (has(p) != other.has(p)) return false;
    if (!has(p)) continue;
    const Tensor &a = part(p), &b = other.part(p);
    if (a.dtype() != b.dtype() || a.size(0) != b.size(0) || a.size(1) != b.size(1) ||
        (a.nbytes() > 0 && std::memcmp(a.data(), b.data(), a.nbytes()) != 0)) {
      return false;
    }
  }
  return true;
}

}  // namespace lorart

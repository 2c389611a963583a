#include "model/llama_model.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>

#include "core/checked_math.h"
#include "core/errors.h"
#include "core/stream.h"
#include "kernels/ops.h"
#include "lora/module_ids.h"

namespace lorart {

namespace {

Tensor rows(const Buffer& b, int64_t n, int64_t cols, int64_t offset = 0, int64_t stride = -1) {
  const int64_t shape[2] = {n, cols};
  const int64_t strides[2] = {stride < 0 ? cols : stride, 1};
  return Tensor(static_cast<float*>(b.data()) + offset, DType::kFloat32, 2, shape, strides,
                b.device());
}

Tensor vec(const Buffer& b, int64_t n) { return b.view(DType::kFloat32, {n}); }

// Columns [offset, offset + cols) of a row view.
Tensor rows_of(const Tensor& t, int64_t offset, int64_t cols) {
  const int64_t shape[2] = {t.size(0), cols};
  const int64_t strides[2] = {t.stride(0), 1};
  return Tensor(t.data_as<float>() + offset, DType::kFloat32, 2, shape, strides, t.device());
}

// Bytes from `offset` rounded up to 16 (each staged array starts 16-byte aligned).
size_t aligned16(size_t offset) { return (offset + 15) / 16 * 16; }

// Grows `buffer` (on `device`) to hold at least `bytes`: geometrically, so a step a little larger
// than the last does not reallocate each time. The device may still be reading the old buffer, so
// `stream` is waited for before it is freed.
void reserve_device_buffer(Buffer& buffer, size_t bytes, Device device, void* stream,
                           const char* what) {
  if (buffer.size() >= bytes) return;
  const size_t grown = std::max(aligned16(bytes), buffer.size() * 2);
  if (buffer.size() > 0) synchronize_stream(device, stream);
  buffer = Buffer::allocate(grown, device, what);
}

void check_index_tensor(const Tensor& t, const char* name, int dims) {
  if (t.dim() != dims || t.dtype() != DType::kInt32 || !t.is_contiguous() || !t.device().is_cpu()) {
    raise<InvalidArgument>(name, " must be a contiguous host int32 tensor with ", dims,
                           " dim(s), got ", t.describe());
  }
}

// Floats of the LoRA scratch for max_num_tokens tokens: the largest of the model's LoRA launches
// (qkv: 4 slices of width hidden; gate_up: 2 of hidden; o: 1 of q_out; down: 1 of intermediate;
// lm_head: 1 of hidden; the embedding's A rows: max_lora_rank per token).
int64_t lora_scratch_floats(const ModelConfig& config, int64_t tokens, int64_t rank,
                            Device device) {
  const ExecContext ctx{device};
  const int64_t q_out = config.num_attention_heads * config.head_dim;
  return std::max({ops::lora_scratch_floats(ctx, tokens, rank, config.hidden_size, 4),
                   ops::lora_scratch_floats(ctx, tokens, rank, q_out, 1),
                   ops::lora_scratch_floats(ctx, tokens, rank, config.intermediate_size, 1)});
}

}  // namespace

Buffer LlamaModel::workspace(int64_t count, const char* what, DType dtype) const {
  return Buffer::allocate(static_cast<size_t>(std::max<int64_t>(count, 1)) * dtype_size(dtype),
                          device(), what);
}

std::vector<float> rope_inv_freq(const ModelConfig& config) {
  const int64_t dim = config.head_dim;
  std::vector<float> inv(dim / 2);
  const float base = static_cast<float>(config.rope_theta);
  for (int64_t i = 0; i < dim / 2; ++i) {
    const float exponent = static_cast<float>(2 * i) / static_cast<float>(dim);
    inv[i] = 1.0f / std::pow(base, exponent);
  }
  const RopeScaling& s = config.rope_scaling;
  if (s.rope_type == "linear") {
    for (float& f : inv) f = f / static_cast<float>(s.factor);
  } else if (s.rope_type == "llama3") {
    const double old_len = static_cast<double>(s.original_max_position_embeddings);
    const double low_wavelen = old_len / s.low_freq_factor;
    const double high_wavelen = old_len / s.high_freq_factor;
    for (float& f : inv) {
      const double wavelen = 2.0 * M_PI / f;
      if (wavelen > low_wavelen) {
        f = static_cast<float>(f / s.factor);
      } else if (wavelen >= high_wavelen) {  // medium band: blend the scaled and unscaled freq
        const double smooth =
            (old_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
        f = static_cast<float>((1.0 - smooth) * f / s.factor + smooth * f);
      }
    }
  }
  return inv;
}

LlamaModel::LlamaModel(const ModelConfig& config, ModelWeights weights, int64_t max_num_tokens,
                       int64_t max_lora_rank)
    : config_(config),
      weights_(std::move(weights)),
      max_num_tokens_(max_num_tokens),
      max_lora_rank_(max_lora_rank) {
  if (!weights_.built_for(config_)) {  // layer(i) and the tables' sizes come from the config
    raise<InvalidArgument>("the weights were built for another model config (",
                           weights_.config().num_layers, " layers, vocab ",
                           weights_.config().vocab_size, ", hidden ", weights_.config().hidden_size,
                           "); this config has ", config_.num_layers, " layers, vocab ",
                           config_.vocab_size, ", hidden ", config_.hidden_size);
  }
  workspace_bytes(config_, max_num_tokens, max_lora_rank, device());  // every product below fits
  const std::vector<float> inv = rope_inv_freq(config_);
  inv_freq_ = workspace(static_cast<int64_t>(inv.size()), "rotary frequencies");
  inv_freq_.copy_from(inv.data(), Device::cpu(), inv.size() * sizeof(float));
  const int64_t t = max_num_tokens, h = config.hidden_size, inter = config.intermediate_size;
  const int64_t q_out = config.num_attention_heads * config.head_dim;
  const int64_t qkv_out = q_out + 2 * config.num_kv_heads * config.head_dim;
  hidden_ = workspace(t * h, "the hidden-state workspace");
  normed_ = workspace(t * h, "the normed workspace");
  qkv_ = workspace(t * qkv_out, "the qkv workspace");
  attn_ = workspace(t * q_out, "the attention workspace");
  proj_ = workspace(t * h, "the projection workspace");
  gate_up_ = workspace(t * 2 * inter, "the gate_up workspace");
  act_ = workspace(t * inter, "the MLP activation workspace");
  lora_scratch_ = workspace(lora_scratch_floats(config_, t, max_lora_rank, device()),
                            "the LoRA scratch workspace");
  runs_.reserve(t);
}

size_t LlamaModel::workspace_bytes(const ModelConfig& config, int64_t max_num_tokens,
                                   int64_t max_lora_rank, Device device) {
  config.validate();
  if (max_num_tokens <= 0 || max_num_tokens > kInt32Max) {
    raise<InvalidArgument>("max_num_tokens must be in [1, ", kInt32Max,
                           "] (token indices are int32), got ", max_num_tokens);
  }
  if (max_lora_rank <= 0 || max_lora_rank > kInt32Max) {
    raise<InvalidArgument>("max_lora_rank must be in [1, ", kInt32Max, "], got ", max_lora_rank);
  }
  // validate() bounds every field by INT32_MAX, so these per-token sums fit easily.
  const int64_t h = config.hidden_size, inter = config.intermediate_size;
  const int64_t q_out = config.num_attention_heads * config.head_dim;
  const int64_t qkv_out = q_out + 2 * config.num_kv_heads * config.head_dim;
  const int64_t floats = 3 * h + qkv_out + q_out + 3 * inter;
  const int64_t per_token =
      floats * static_cast<int64_t>(sizeof(float)) + static_cast<int64_t>(sizeof(LoraRun));
  const int64_t lora_bytes =
      checked_mul(lora_scratch_floats(config, max_num_tokens, max_lora_rank, device),
                  static_cast<int64_t>(sizeof(float)), "LlamaModel LoRA scratch bytes");
  const int64_t bytes = checked_add(
      checked_add(checked_mul(max_num_tokens, per_token,
                              "LlamaModel workspace bytes (max_num_tokens * bytes per token)"),
                  lora_bytes, "LlamaModel workspace bytes"),
      config.head_dim / 2 * static_cast<int64_t>(sizeof(float)), "LlamaModel workspace bytes");
  checked_product({max_num_tokens, config.vocab_size, int64_t{sizeof(float)}},
                  "logits bytes (max_num_tokens * vocab_size * 4)");
  check_allocation(static_cast<size_t>(bytes), device,
                   "the LlamaModel workspace (max_num_tokens = " + std::to_string(max_num_tokens) +
                       ", max_lora_rank = " + std::to_string(max_lora_rank) + ")");
  return static_cast<size_t>(bytes);
}

void LlamaModel::validate(const ForwardBatch& b, const KvCache& cache,
                          const LoraTable& lora) const {
  check_index_tensor(b.token_ids, "token_ids", 1);
  check_index_tensor(b.positions, "positions", 1);
  check_index_tensor(b.seq_starts, "seq_starts", 1);
  check_index_tensor(b.context_lens, "context_lens", 1);
  check_index_tensor(b.block_tables, "block_tables", 2);
  check_index_tensor(b.lora_slots, "lora_slots", 1);
  check_index_tensor(b.logits_indices, "logits_indices", 1);
  if (cache.device() != device()) {
    raise<InvalidArgument>("kv cache must be on the model's device (", device().str(),
                           "), it is on ", cache.device().str());
  }
  if (cache.num_layers() != config_.num_layers ||
      cache.kv_width() != config_.num_kv_heads * config_.head_dim) {
    raise<InvalidArgument>("kv cache was built for ", cache.num_layers(), " layers of width ",
                           cache.kv_width(), "; this model has ", config_.num_layers,
                           " layers of width ", config_.num_kv_heads * config_.head_dim);
  }
  const int64_t num_tokens = b.token_ids.size(0);
  const int64_t num_seqs = b.context_lens.size(0);
  if (num_tokens < 1 || num_tokens > max_num_tokens_) {
    raise<InvalidArgument>("batch has ", num_tokens,
                           " tokens; it must have 1 to max_num_tokens = ", max_num_tokens_);
  }
  if (b.positions.size(0) != num_tokens) {
    raise<InvalidArgument>("positions has ", b.positions.size(0), " entries; token_ids has ",
                           num_tokens);
  }
  if (lora.num_slots() > 0 && !(lora.model_shape() == LoraAdapter::shape_of(config_))) {
    raise<InvalidArgument>("the LoRA table was laid out for a model of another shape (",
                           lora.model_shape(), "; this model: ", LoraAdapter::shape_of(config_),
                           ")");
  }
  if (lora.max_rank() > max_lora_rank_) {
    raise<InvalidArgument>("the LoRA table holds an adapter of rank ", lora.max_rank(),
                           ", above max_lora_rank = ", max_lora_rank_);
  }
  if (device().is_cuda()) {
    // The CUDA kernels read the pairs through device pointers, and the DoRA and embedding-side
    // paths have no CUDA kernels yet: refuse such a table here, by slot, before any launch.
    for (int32_t slot = 0; slot < lora.num_slots(); ++slot) {
      const LoraAdapter* a = lora.adapter(slot);
      if (a == nullptr) continue;
      if (a->pairs_device() != device()) {
        raise<InvalidArgument>("LoRA slot ", slot, ": the adapter's pairs are in ",
                               a->pairs_device().str(), " memory; a model on ", device().str(),
                               " reads them from its device (the LoRA cache's device level)");
      }
      if (a->has_dora() || a->has_embedding_parts()) {
        raise<InvalidArgument>("LoRA slot ", slot, ": ",
                               a->has_dora() ? "DoRA adapters"
                                             : "embedding-side parts (embed_tokens, "
                                               "lm_head or their LoRA)",
                               " are not supported on CUDA yet");
      }
    }
  }
  if (num_seqs < 1 || b.seq_starts.size(0) != num_seqs + 1 || b.lora_slots.size(0) != num_seqs ||
      b.block_tables.size(0) != num_seqs) {
    raise<InvalidArgument>("seq_starts must have S + 1 entries and context_lens, lora_slots, ",
                           "block_tables S rows (S = ", num_seqs, ")");
  }
  const int32_t* ids = b.token_ids.data_as<const int32_t>();
  const int32_t* starts = b.seq_starts.data_as<const int32_t>();
  const int32_t* ctx = b.context_lens.data_as<const int32_t>();
  const int32_t* slots = b.lora_slots.data_as<const int32_t>();
  const int32_t* tables = b.block_tables.data_as<const int32_t>();
  const int32_t* positions = b.positions.data_as<const int32_t>();
  const int64_t max_blocks = b.block_tables.size(1);
  if (max_blocks > kInt32Max) {  // the attention kernel takes the row width as int32
    raise<InvalidArgument>("block_tables has ", max_blocks, " columns; at most ", kInt32Max);
  }
  if (starts[0] != 0 || starts[num_seqs] != num_tokens) {
    raise<InvalidArgument>("seq_starts must start at 0 and end at the token count ", num_tokens);
  }
  // Every start first, so the per-token loops below stay inside the token arrays.
  for (int64_t s = 0; s < num_seqs; ++s) {
    if (starts[s + 1] <= starts[s]) {
      raise<InvalidArgument>("seq_starts must increase: sequence ", s, " has no tokens");
    }
  }
  for (int64_t s = 0; s < num_seqs; ++s) {
    if (ctx[s] < 0) raise<InvalidArgument>("context_lens[", s, "] = ", ctx[s], " is negative");
    // Positions are int32 in the kernels: max_position_embeddings (<= INT32_MAX) bounds them.
    const int64_t end = static_cast<int64_t>(ctx[s]) + (starts[s + 1] - starts[s]);
    if (end > config_.max_position_embeddings) {
      raise<InvalidArgument>("sequence ", s, ": context_lens[", s, "] = ", ctx[s], " plus ",
                             starts[s + 1] - starts[s], " token(s) reaches position ", end,
                             ", past max_position_embeddings = ", config_.max_position_embeddings);
    }
    const int64_t needed = (end + cache.block_size() - 1) / cache.block_size();
    if (needed > max_blocks) {
      raise<InvalidArgument>("block_tables row ", s, " has ", max_blocks, " blocks but positions ",
                             "up to ", end, " need ", needed, " (block_size ", cache.block_size(),
                             ")");
    }
    for (int64_t k = 0; k < needed; ++k) {
      const int32_t block = tables[s * max_blocks + k];
      if (block < 0 || block >= cache.num_blocks()) {
        raise<InvalidArgument>("block_tables[", s, ", ", k, "] = ", block,
                               " is out of range [0, num_kv_blocks = ", cache.num_blocks(), ")");
      }
    }
    for (int32_t t = starts[s]; t < starts[s + 1]; ++t) {
      if (positions[t] != ctx[s] + (t - starts[s])) {
        raise<InvalidArgument>("positions[", t, "] = ", positions[t], " but token ", t,
                               " of sequence ", s, " sits at context_lens[", s, "] + ",
                               t - starts[s], " = ", ctx[s] + (t - starts[s]));
      }
    }
    if (slots[s] < -1 || slots[s] >= lora.num_slots()) {
      raise<InvalidArgument>("lora_slots[", s, "] = ", slots[s], " names no loaded adapter (",
                             lora.num_slots(), " slot(s); -1 = base model)");
    }
    // Each sequence's ids against its own vocabulary (its adapter's may be larger).
    const int64_t vocab = lora.vocab_size(slots[s], config_.vocab_size);
    for (int32_t t = starts[s]; t < starts[s + 1]; ++t) {
      if (ids[t] < 0 || ids[t] >= vocab) {
        raise<InvalidArgument>("token_ids[", t, "] = ", ids[t],
                               " is out of range [0, vocab_size = ", vocab, ") of sequence ", s,
                               slots[s] < 0 ? " (the base model)" : "'s adapter");
      }
    }
  }
  const int64_t n_out = b.logits_indices.size(0);
  if (n_out > max_num_tokens_) {  // the rows are gathered into a max_num_tokens workspace
    raise<InvalidArgument>("logits_indices asks for ", n_out,
                           " rows; at most max_num_tokens = ", max_num_tokens_);
  }
  const int32_t* idx = b.logits_indices.data_as<const int32_t>();
  for (int64_t i = 0; i < n_out; ++i) {
    if (idx[i] < 0 || idx[i] >= num_tokens) {
      raise<InvalidArgument>("logits_indices[", i, "] = ", idx[i], " is out of range [0, ",
                             num_tokens, ")");
    }
  }
}

void LlamaModel::forward(const ExecContext& ctx, const ForwardBatch& b, KvCache& cache,
                         const LoraTable& lora, const Tensor& logits) {
  if (ctx.device != device()) {
    raise<InvalidArgument>("forward: the context's device ", ctx.device.str(),
                           " is not the model's (", device().str(), ")");
  }
  validate(b, cache, lora);
  const int64_t n_out = b.logits_indices.size(0);
  const int64_t width = logits_width(lora);
  if (logits.dim() != 2 || logits.size(0) != n_out || logits.size(1) != width ||
      logits.dtype() != DType::kFloat32 || !logits.is_contiguous() || logits.device() != device()) {
    raise<InvalidArgument>("logits must be contiguous float32 [", n_out, ", ", width, "], got ",
                           logits.describe(),
                           logits.device() == device() ? "" : " (not on the model's device)");
  }
  const int64_t num_tokens = b.token_ids.size(0);
  const int64_t num_seqs = b.context_lens.size(0);
  const int32_t* starts = b.seq_starts.data_as<const int32_t>();
  const int32_t* slots = b.lora_slots.data_as<const int32_t>();
  runs_.clear();
  for (int64_t s = 0; s < num_seqs; ++s) {
    if (slots[s] < 0) continue;
    if (!runs_.empty() && runs_.back().slot == slots[s] && runs_.back().end == starts[s]) {
      runs_.back().end = starts[s + 1];  // neighbours with one adapter share a run
    } else {
      runs_.push_back({starts[s], starts[s + 1], slots[s]});
    }
  }
  // The step's bounds, for launches that cannot read the (device) arrays.
  const int32_t* context = b.context_lens.data_as<const int32_t>();
  int32_t max_query_len = 0, max_kv_len = 0;
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int32_t q = starts[s + 1] - starts[s];
    max_query_len = std::max(max_query_len, q);
    max_kv_len = std::max(max_kv_len, context[s] + q);  // < max_position_embeddings: no overflow
  }
  ops::LoraBatch lora_batch = lora.batch(runs_);
  const ForwardBatch& staged = stage(ctx, b, lora_batch);
  const Pass pass{ctx,        staged,
                  cache,      lora_batch,
                  num_tokens, lora.has_dora(),
                  b,          max_query_len,
                  max_kv_len, attention_workspace(ctx, num_seqs, max_kv_len)};

  const int64_t h = config_.hidden_size;
  if (lora.has_embedding_parts()) {
    embed_per_slot(pass, lora, rows(hidden_, num_tokens, h));
  } else {
    ops::embedding(ctx, weights_.embed(), staged.token_ids, rows(hidden_, num_tokens, h));
  }
  for (int64_t layer = 0; layer < config_.num_layers; ++layer) {
    attention_block(pass, layer);
    mlp_block(pass, layer);
  }
  // Final norm and lm_head only for the rows whose logits were asked for.
  const Tensor picked = rows(normed_, n_out, h);
  ops::gather_rows(ctx, rows(hidden_, num_tokens, h), staged.logits_indices, picked);
  ops::rms_norm(ctx, picked, weights_.final_norm(), static_cast<float>(config_.rms_norm_eps),
                picked);
  if (lora.has_embedding_parts()) {
    lm_head_per_slot(pass, lora, picked, logits);
  } else {
    ops::linear(ctx, picked, weights_.lm_head(), logits, 0.0f, Tensor(), weights_.lm_head_layout());
  }
}

const ForwardBatch& LlamaModel::stage(const ExecContext& ctx, const ForwardBatch& host,
                                      ops::LoraBatch& lora) {
  if (device().is_cpu()) return host;
  // One host image of everything the device reads this step, then one copy: the seven int32
  // arrays, the LoRA runs and the LoRA pairs, each 16-byte aligned.
  const Tensor* arrays[] = {&host.token_ids,     &host.positions,    &host.seq_starts,
                            &host.context_lens,  &host.block_tables, &host.lora_slots,
                            &host.logits_indices};
  Tensor* device_arrays[] = {&device_batch_.token_ids,     &device_batch_.positions,
                             &device_batch_.seq_starts,    &device_batch_.context_lens,
                             &device_batch_.block_tables,  &device_batch_.lora_slots,
                             &device_batch_.logits_indices};
  const size_t num_pairs = lora.pairs == nullptr ? 0
                                                 : static_cast<size_t>(lora.num_slots) *
                                                       static_cast<size_t>(lora.pairs_per_slot);
  size_t offsets[9];
  size_t bytes = 0;
  for (int i = 0; i < 7; ++i) {
    offsets[i] = bytes;
    bytes = aligned16(bytes + arrays[i]->nbytes());
  }
  offsets[7] = bytes;
  bytes = aligned16(bytes + static_cast<size_t>(lora.num_runs) * sizeof(LoraRun));
  offsets[8] = bytes;
  bytes = aligned16(bytes + num_pairs * sizeof(LoraPair));
  if (staging_host_.size() < bytes) staging_host_.resize(bytes);
  unsigned char* image = staging_host_.data();
  for (int i = 0; i < 7; ++i) {
    if (arrays[i]->nbytes() > 0) {
      std::memcpy(image + offsets[i], arrays[i]->data(), arrays[i]->nbytes());
    }
  }
  if (lora.num_runs > 0) {
    std::memcpy(image + offsets[7], lora.runs,
                static_cast<size_t>(lora.num_runs) * sizeof(LoraRun));
  }
  if (num_pairs > 0) std::memcpy(image + offsets[8], lora.pairs, num_pairs * sizeof(LoraPair));
  reserve_device_buffer(staging_, bytes, device(), ctx.stream, "the step's device staging buffer");
  copy_bytes_async(staging_.data(), device(), image, Device::cpu(), bytes, ctx.stream);
  unsigned char* base = static_cast<unsigned char*>(staging_.data());
  for (int i = 0; i < 7; ++i) {
    const Tensor& h = *arrays[i];
    int64_t shape[Tensor::kMaxDims];
    int64_t strides[Tensor::kMaxDims];
    for (int d = 0; d < h.dim(); ++d) {
      shape[d] = h.size(d);
      strides[d] = h.stride(d);
    }
    *device_arrays[i] = Tensor(base + offsets[i], DType::kInt32, h.dim(), shape, strides, device());
  }
  lora.device_runs =
      lora.num_runs > 0 ? reinterpret_cast<const LoraRun*>(base + offsets[7]) : nullptr;
  lora.device_pairs =
      num_pairs > 0 ? reinterpret_cast<const LoraPair*>(base + offsets[8]) : nullptr;
  return device_batch_;
}

Tensor LlamaModel::attention_workspace(const ExecContext& ctx, int64_t num_seqs,
                                       int32_t max_kv_len) {
  const ops::AttentionShape shape{
      static_cast<int32_t>(config_.num_attention_heads), static_cast<int32_t>(config_.num_kv_heads),
      static_cast<int32_t>(config_.head_dim), static_cast<int32_t>(config_.sliding_window), 1.0f};
  const size_t need = ops::paged_attention_workspace_bytes(ctx, num_seqs, max_kv_len, shape);
  if (need == 0) return Tensor();
  reserve_device_buffer(attention_workspace_, need, device(), ctx.stream,
                        "the attention split-KV workspace");
  return attention_workspace_.view(DType::kInt32,
                                   {static_cast<int64_t>(attention_workspace_.size() / 4)});
}

void LlamaModel::embed_per_slot(const Pass& pass, const LoraTable& lora, const Tensor& hidden) {
  const ExecContext& ctx = pass.ctx;
  const ForwardBatch& b = pass.host;
  const int64_t num_seqs = b.context_lens.size(0);
  const int32_t* starts = b.seq_starts.data_as<const int32_t>();
  const int32_t* slots = b.lora_slots.data_as<const int32_t>();
  auto* ids = pass.batch.token_ids.data_as<int32_t>();  // where the ops read them
  // Tokens [begin, end) as their own ids and hidden rows.
  auto ids_of = [&](int64_t begin, int64_t end) {
    return Tensor(ids + begin, DType::kInt32, {end - begin}, pass.batch.token_ids.device());
  };
  // Neighbouring sequences that embed with one table share one gather.
  for (int64_t s = 0; s < num_seqs;) {
    const LoraAdapter* a = lora.adapter(slots[s]);
    const Tensor& table =
        a != nullptr && a->embed_tokens().defined() ? a->embed_tokens() : weights_.embed();
    int64_t e = s + 1;
    while (e < num_seqs) {
      const LoraAdapter* next = lora.adapter(slots[e]);
      const Tensor& t = next != nullptr && next->embed_tokens().defined() ? next->embed_tokens()
                                                                          : weights_.embed();
      if (t.data() != table.data()) break;
      ++e;
    }
    ops::embedding(ctx, table, ids_of(starts[s], starts[e]),
                   hidden.slice_rows(starts[s], starts[e]));
    s = e;
  }
  // LoRA on the embedding: hidden += A^T[id] @ B^T, per run of one adapter.
  const Tensor scratch_all = lora_scratch_.view(
      DType::kFloat32, {static_cast<int64_t>(lora_scratch_.size() / sizeof(float))});
  for (int32_t i = 0; i < pass.lora.num_runs; ++i) {
    const LoraRun& run = pass.lora.runs[i];
    const LoraAdapter* a = lora.adapter(run.slot);
    if (a == nullptr || !a->embed_lora_a_t().defined()) continue;
    const int64_t n = run.end - run.begin, rank = a->embed_lora_a_t().size(1);
    const Tensor after_a(scratch_all.data(), DType::kFloat32, {n, rank});
    ops::embedding(ctx, a->embed_lora_a_t(), ids_of(run.begin, run.end), after_a);
    ops::linear(ctx, after_a, a->embed_lora_b(), hidden.slice_rows(run.begin, run.end), 1.0f);
  }
}

void LlamaModel::lm_head_per_slot(const Pass& pass, const LoraTable& lora, const Tensor& picked,
                                  const Tensor& logits) {
  const ExecContext& ctx = pass.ctx;
  const ForwardBatch& b = pass.host;
  const int64_t n_out = picked.size(0), width = logits.size(1);
  const int64_t num_seqs = b.context_lens.size(0);
  const int32_t* starts = b.seq_starts.data_as<const int32_t>();
  const int32_t* slots = b.lora_slots.data_as<const int32_t>();
  const int32_t* idx = b.logits_indices.data_as<const int32_t>();
  // Each logits row's slot (its token's sequence), in runs of one slot.
  head_runs_.clear();
  for (int64_t i = 0; i < n_out; ++i) {
    const int64_t seq =
        std::upper_bound(starts, starts + num_seqs + 1, idx[i]) - starts - 1;  // starts[seq] <= t
    const int32_t slot = slots[seq];
    if (!head_runs_.empty() && head_runs_.back().slot == slot) {
      head_runs_.back().end = static_cast<int32_t>(i + 1);
    } else {
      head_runs_.push_back({static_cast<int32_t>(i), static_cast<int32_t>(i + 1), slot});
    }
  }
  // The projection once per run of rows that share a table: rows of plain adapters and base
  // rows all read the model's lm_head, in one pass (the step sorted them next to each other).
  auto head_of = [&](int32_t slot) -> const Tensor& {
    const LoraAdapter* a = lora.adapter(slot);
    return a != nullptr && a->lm_head().defined() ? a->lm_head() : weights_.lm_head();
  };
  for (size_t r = 0; r < head_runs_.size();) {
    const Tensor& head = head_of(head_runs_[r].slot);
    const int64_t vocab = lora.vocab_size(head_runs_[r].slot, config_.vocab_size);
    size_t e = r + 1;
    while (e < head_runs_.size() && head_of(head_runs_[e].slot).data() == head.data() &&
           lora.vocab_size(head_runs_[e].slot, config_.vocab_size) == vocab) {
      ++e;
    }
    const int32_t begin = head_runs_[r].begin, end = head_runs_[e - 1].end;
    const Tensor y = rows_of(logits.slice_rows(begin, end), 0, vocab);
    const WeightLayout layout = head.data() == weights_.lm_head().data() ? weights_.lm_head_layout()
                                                                         : WeightLayout::kRowMajor;
    ops::linear(ctx, picked.slice_rows(begin, end), head, y, 0.0f, Tensor(), layout);
    r = e;
  }
  const Tensor scratch = lora_scratch_.view(
      DType::kFloat32, {static_cast<int64_t>(lora_scratch_.size() / sizeof(float))});
  for (const LoraRun& run : head_runs_) {
    const LoraAdapter* a = lora.adapter(run.slot);
    const int64_t vocab = lora.vocab_size(run.slot, config_.vocab_size);
    if (a != nullptr && a->lm_head_pair().rank > 0) {
      const LoraRun all{0, run.end - run.begin, 0};
      ops::LoraBatch head;
      head.runs = &all;
      head.num_runs = 1;
      head.pairs = &a->lm_head_pair();
      head.num_slots = 1;
      head.pairs_per_slot = 1;
      ops::lora_gemm(ctx, picked.slice_rows(run.begin, run.end),
                     rows_of(logits.slice_rows(run.begin, run.end), 0, vocab), vocab, head, 0,
                     scratch);
    }
    if (vocab < width) {  // not this row's tokens
      for (int32_t r = run.begin; r < run.end; ++r) {
        float* row = logits.data_as<float>() + r * width;
        if (logits.device().is_cpu()) {
          std::fill(row + vocab, row + width, -std::numeric_limits<float>::infinity());
        } else {
          neg_inf_.assign(static_cast<size_t>(width - vocab),
                          -std::numeric_limits<float>::infinity());
          copy_bytes_async(row + vocab, logits.device(), neg_inf_.data(), Device::cpu(),
                           neg_inf_.size() * sizeof(float), ctx.stream);
        }
      }
    }
  }
}

void LlamaModel::attention_block(const Pass& pass, int64_t layer) {
  const ExecContext& ctx = pass.ctx;
  const int64_t n = pass.num_tokens;
  const LayerWeights& w = weights_.layer(layer);
  const WeightLayout layout = weights_.matrix_layout();
  const int64_t h = config_.hidden_size, hd = config_.head_dim;
  const int64_t q_out = config_.num_attention_heads * hd, kv_out = config_.num_kv_heads * hd;
  const int64_t qkv_out = q_out + 2 * kv_out;
  const float eps = static_cast<float>(config_.rms_norm_eps);
  const Tensor hidden = rows(hidden_, n, h), normed = rows(normed_, n, h);
  const Tensor qkv = rows(qkv_, n, qkv_out);
  ops::rms_norm(ctx, hidden, w.input_norm, eps, normed);
  ops::linear(ctx, normed, w.qkv, qkv, 0.0f, Tensor(), layout);
  if (w.qkv_bias.defined()) ops::add_bias(ctx, qkv, w.qkv_bias);
  const ModuleColumns qkv_modules[] = {{lora_module::kAttnQkv, 0},
                                       {lora_module::kAttnQ, 0},
                                       {lora_module::kAttnK, q_out},
                                       {lora_module::kAttnV, q_out + kv_out}};
  apply_lora_slices(pass, layer, qkv_modules, 4, normed, qkv, w.qkv_bias);

  // q and k heads sit side by side in each qkv row: one pass rotates both.
  ops::rope(ctx, rows(qkv_, n, q_out + kv_out, 0, qkv_out), static_cast<int32_t>(hd),
            pass.batch.positions, vec(inv_freq_, hd / 2));
  const Tensor attn = rows(attn_, n, q_out), proj = rows(proj_, n, h);
  const ops::AttentionBatch batch{pass.batch.seq_starts,   pass.batch.context_lens,
                                  pass.batch.block_tables, pass.max_query_len,
                                  pass.max_kv_len,         pass.attention_workspace};
  const ops::AttentionShape shape{
      static_cast<int32_t>(config_.num_attention_heads), static_cast<int32_t>(config_.num_kv_heads),
      static_cast<int32_t>(hd), static_cast<int32_t>(config_.sliding_window),
      1.0f / std::sqrt(static_cast<float>(hd))};
  ops::paged_attention(ctx, rows(qkv_, n, q_out, 0, qkv_out), rows(qkv_, n, kv_out, q_out, qkv_out),
                       rows(qkv_, n, kv_out, q_out + kv_out, qkv_out), pass.cache.key_view(layer),
                       pass.cache.value_view(layer), batch, shape, attn);

  ops::linear(ctx, attn, w.o, proj, 0.0f, Tensor(), layout);
  if (w.o_bias.defined()) ops::add_bias(ctx, proj, w.o_bias);
  apply_lora(pass, layer, lora_module::kAttnDense, attn, proj, 0, w.o_bias);
  // The residual add and mlp_block's input norm in one pass (bitwise the two ops).
  ops::add_rms_norm(ctx, hidden, proj, w.post_norm, eps, normed);
}

void LlamaModel::mlp_block(const Pass& pass, int64_t layer) {
  const ExecContext& ctx = pass.ctx;
  const int64_t n = pass.num_tokens;
  const LayerWeights& w = weights_.layer(layer);
  const WeightLayout layout = weights_.matrix_layout();
  const int64_t h = config_.hidden_size, inter = config_.intermediate_size;
  const Tensor hidden = rows(hidden_, n, h), normed = rows(normed_, n, h);
  const Tensor gate_up = rows(gate_up_, n, 2 * inter), act = rows(act_, n, inter);
  const Tensor proj = rows(proj_, n, h);
  // normed = RMSNorm(hidden) * post_norm already (attention_block's add_rms_norm).
  ops::linear(ctx, normed, w.gate_up, gate_up, 0.0f, Tensor(), layout);
  const ModuleColumns gate_up_modules[] = {{lora_module::kMlpHTo4H, 0},      // gate_proj half
                                           {lora_module::kMlpGate, inter}};  // up_proj half
  apply_lora_slices(pass, layer, gate_up_modules, 2, normed, gate_up, Tensor());
  ops::silu_mul(ctx, gate_up, act);
  ops::linear(ctx, act, w.down, proj, 0.0f, Tensor(), layout);
  apply_lora(pass, layer, lora_module::kMlp4HToH, act, proj, 0);
  ops::add(ctx, hidden, proj);
}

void LlamaModel::apply_lora(const Pass& pass, int64_t layer, int32_t module_id, const Tensor& x,
                            const Tensor& y, int64_t out_offset, const Tensor& bias) {
  if (pass.lora.num_runs == 0) return;
  const LoraModuleDims dims = config_.lora_module_dims(module_id);
  const Tensor y_cols = rows_of(y, out_offset, dims.out);
  const Tensor scratch = lora_scratch_.view(
      DType::kFloat32, {static_cast<int64_t>(lora_scratch_.size() / sizeof(float))});
  const int64_t pair_index = layer * lora_module::kCount + module_id;
  ops::lora_gemm(pass.ctx, x, y_cols, dims.out, pass.lora, pair_index, scratch);
  if (pass.dora) {
    Tensor bias_cols;
    if (bias.defined()) {
      bias_cols = Tensor(static_cast<char*>(bias.data()) + out_offset * dtype_size(bias.dtype()),
                         bias.dtype(), {dims.out});
    }
    ops::lora_dora_apply(pass.ctx, y_cols, dims.out, bias_cols, pass.lora, pair_index);
  }
}

void LlamaModel::apply_lora_slices(const Pass& pass, int64_t layer, const ModuleColumns* modules,
                                   int32_t count, const Tensor& x, const Tensor& y,
                                   const Tensor& bias) {
  if (pass.lora.num_runs == 0) return;
  if (pass.dora) {  // DoRA rescales after each module's delta: one module at a time
    for (int32_t i = 0; i < count; ++i) {
      apply_lora(pass, layer, modules[i].module_id, x, y, modules[i].out_offset, bias);
    }
    return;
  }
  LoraSlice slices[kMaxLoraSlices];
  for (int32_t i = 0; i < count; ++i) {
    slices[i] = {layer * lora_module::kCount + modules[i].module_id, modules[i].out_offset,
                 config_.lora_module_dims(modules[i].module_id).out};
  }
  const Tensor scratch = lora_scratch_.view(
      DType::kFloat32, {static_cast<int64_t>(lora_scratch_.size() / sizeof(float))});
  ops::lora_gemm_slices(pass.ctx, x, y, slices, count, pass.lora, scratch);
}

}  // namespace lorart

#include "model/llama_model.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "core/checked_math.h"
#include "core/errors.h"
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

Buffer workspace(int64_t count, const char* what, DType dtype = DType::kFloat32) {
  return Buffer::allocate(static_cast<size_t>(std::max<int64_t>(count, 1)) * dtype_size(dtype),
                          Device::cpu(), what);
}

void check_index_tensor(const Tensor& t, const char* name, int dims) {
  if (t.dim() != dims || t.dtype() != DType::kInt32 || !t.is_contiguous() || !t.device().is_cpu()) {
    raise<InvalidArgument>(name, " must be a contiguous host int32 tensor with ", dims,
                           " dim(s), got ", t.describe());
  }
}

}  // namespace

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
  workspace_bytes(config_, max_num_tokens, max_lora_rank);  // every product below fits
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
  positions_ = workspace(t, "the positions workspace", DType::kInt32);
  lora_scratch_ = workspace(t * max_lora_rank, "the LoRA scratch workspace");
  runs_.reserve(t);
  segments_.reserve(t);
}

size_t LlamaModel::workspace_bytes(const ModelConfig& config, int64_t max_num_tokens,
                                   int64_t max_lora_rank) {
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
  const int64_t floats = 3 * h + qkv_out + q_out + 3 * inter + max_lora_rank;
  const int64_t per_token =
      floats * static_cast<int64_t>(sizeof(float)) +
      static_cast<int64_t>(sizeof(int32_t) + sizeof(Run) + sizeof(LoraSegment));
  const int64_t bytes = checked_add(
      checked_mul(max_num_tokens, per_token,
                  "LlamaModel workspace bytes (max_num_tokens * bytes per token)"),
      config.head_dim / 2 * static_cast<int64_t>(sizeof(float)), "LlamaModel workspace bytes");
  checked_product({max_num_tokens, config.vocab_size, int64_t{sizeof(float)}},
                  "logits bytes (max_num_tokens * vocab_size * 4)");
  check_allocation(static_cast<size_t>(bytes), Device::cpu(),
                   "the LlamaModel workspace (max_num_tokens = " + std::to_string(max_num_tokens) +
                       ", max_lora_rank = " + std::to_string(max_lora_rank) + ")");
  return static_cast<size_t>(bytes);
}

void LlamaModel::validate(const ForwardBatch& b, const KvCache& cache,
                          const std::vector<const LoraAdapter*>& adapters) const {
  check_index_tensor(b.token_ids, "token_ids", 1);
  check_index_tensor(b.seq_starts, "seq_starts", 1);
  check_index_tensor(b.context_lens, "context_lens", 1);
  check_index_tensor(b.block_tables, "block_tables", 2);
  check_index_tensor(b.lora_slots, "lora_slots", 1);
  check_index_tensor(b.logits_indices, "logits_indices", 1);
  if (cache.device() != Device::cpu()) {
    raise<InvalidArgument>("kv cache must be on the model's device (cpu)");
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
  if (num_seqs < 1 || b.seq_starts.size(0) != num_seqs + 1 || b.lora_slots.size(0) != num_seqs ||
      b.block_tables.size(0) != num_seqs) {
    raise<InvalidArgument>("seq_starts must have S + 1 entries and context_lens, lora_slots, ",
                           "block_tables S rows (S = ", num_seqs, ")");
  }
  const int32_t* ids = b.token_ids.data_as<const int32_t>();
  for (int64_t t = 0; t < num_tokens; ++t) {
    if (ids[t] < 0 || ids[t] >= config_.vocab_size) {
      raise<InvalidArgument>("token_ids[", t, "] = ", ids[t],
                             " is out of range [0, vocab_size = ", config_.vocab_size, ")");
    }
  }
  const int32_t* starts = b.seq_starts.data_as<const int32_t>();
  const int32_t* ctx = b.context_lens.data_as<const int32_t>();
  const int32_t* slots = b.lora_slots.data_as<const int32_t>();
  const int32_t* tables = b.block_tables.data_as<const int32_t>();
  const int64_t max_blocks = b.block_tables.size(1);
  if (max_blocks > kInt32Max) {  // the attention kernel takes the row width as int32
    raise<InvalidArgument>("block_tables has ", max_blocks, " columns; at most ", kInt32Max);
  }
  if (starts[0] != 0 || starts[num_seqs] != num_tokens) {
    raise<InvalidArgument>("seq_starts must start at 0 and end at the token count ", num_tokens);
  }
  for (int64_t s = 0; s < num_seqs; ++s) {
    if (starts[s + 1] <= starts[s]) {
      raise<InvalidArgument>("seq_starts must increase: sequence ", s, " has no tokens");
    }
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
    if (slots[s] < -1 || slots[s] >= static_cast<int64_t>(adapters.size()) ||
        (slots[s] >= 0 && adapters[slots[s]] == nullptr)) {
      raise<InvalidArgument>("lora_slots[", s, "] = ", slots[s], " names no loaded adapter (",
                             adapters.size(), " slot(s); -1 = base model)");
    }
    if (slots[s] < 0) continue;
    const LoraAdapter& adapter = *adapters[slots[s]];
    if (adapter.max_rank() > max_lora_rank_) {
      raise<InvalidArgument>("lora_slots[", s, "]: adapter rank ", adapter.max_rank(),
                             " exceeds max_lora_rank = ", max_lora_rank_);
    }
    if (!adapter.fits(config_)) {  // its (layer, module) table would be read out of bounds
      raise<InvalidArgument>("lora_slots[", s, "]: the adapter was laid out for a model of ",
                             "another shape (", adapter.model_shape(),
                             "; this model: ", LoraAdapter::shape_of(config_), ")");
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

void LlamaModel::forward(const ForwardBatch& b, KvCache& cache,
                         const std::vector<const LoraAdapter*>& adapters, const Tensor& logits) {
  validate(b, cache, adapters);
  const int64_t n_out = b.logits_indices.size(0);
  if (logits.dim() != 2 || logits.size(0) != n_out || logits.size(1) != config_.vocab_size ||
      logits.dtype() != DType::kFloat32 || !logits.is_contiguous()) {
    raise<InvalidArgument>("logits must be contiguous float32 [", n_out, ", ", config_.vocab_size,
                           "], got ", logits.describe());
  }
  const int64_t num_tokens = b.token_ids.size(0);
  const int64_t num_seqs = b.context_lens.size(0);
  const int32_t* starts = b.seq_starts.data_as<const int32_t>();
  const int32_t* ctx = b.context_lens.data_as<const int32_t>();
  const int32_t* slots = b.lora_slots.data_as<const int32_t>();
  auto* positions = static_cast<int32_t*>(positions_.data());
  runs_.clear();
  for (int64_t s = 0; s < num_seqs; ++s) {
    for (int32_t t = starts[s]; t < starts[s + 1]; ++t) positions[t] = ctx[s] + (t - starts[s]);
    if (slots[s] < 0) continue;
    const LoraAdapter* adapter = adapters[slots[s]];
    if (!runs_.empty() && runs_.back().adapter == adapter && runs_.back().end == starts[s]) {
      runs_.back().end = starts[s + 1];  // neighbours with one adapter share a segment
    } else {
      runs_.push_back({starts[s], starts[s + 1], adapter});
    }
  }

  const int64_t h = config_.hidden_size;
  ops::embedding(weights_.embed(), b.token_ids, rows(hidden_, num_tokens, h));
  for (int64_t layer = 0; layer < config_.num_layers; ++layer) {
    attention_block(layer, num_tokens, b, cache);
    mlp_block(layer, num_tokens);
  }
  // Final norm and lm_head only for the rows whose logits were asked for.
  const int32_t* idx = b.logits_indices.data_as<const int32_t>();
  const Tensor hidden = rows(hidden_, num_tokens, h);
  const Tensor picked = rows(normed_, n_out, h);
  for (int64_t i = 0; i < n_out; ++i) {
    std::copy_n(hidden.data_as<float>() + static_cast<int64_t>(idx[i]) * h, h,
                picked.data_as<float>() + i * h);
  }
  ops::rms_norm(picked, weights_.final_norm(), static_cast<float>(config_.rms_norm_eps), picked);
  ops::linear(picked, weights_.lm_head(), logits);
}

void LlamaModel::attention_block(int64_t layer, int64_t n, const ForwardBatch& b, KvCache& cache) {
  const LayerWeights& w = weights_.layer(layer);
  const int64_t h = config_.hidden_size, hd = config_.head_dim;
  const int64_t q_out = config_.num_attention_heads * hd, kv_out = config_.num_kv_heads * hd;
  const int64_t qkv_out = q_out + 2 * kv_out;
  const Tensor hidden = rows(hidden_, n, h), normed = rows(normed_, n, h);
  const Tensor qkv = rows(qkv_, n, qkv_out);
  ops::rms_norm(hidden, vec(w.input_norm, h), static_cast<float>(config_.rms_norm_eps), normed);
  ops::linear(normed, w.qkv.view(DType::kFloat32, {qkv_out, h}), qkv);
  if (w.qkv_bias.size() > 0) ops::add_bias(qkv, vec(w.qkv_bias, qkv_out));
  apply_lora(layer, lora_module::kAttnQkv, normed, qkv, 0);
  apply_lora(layer, lora_module::kAttnQ, normed, qkv, 0);
  apply_lora(layer, lora_module::kAttnK, normed, qkv, q_out);
  apply_lora(layer, lora_module::kAttnV, normed, qkv, q_out + kv_out);

  const Tensor q = rows(qkv_, n, q_out, 0, qkv_out);
  const Tensor k = rows(qkv_, n, kv_out, q_out, qkv_out);
  const Tensor v = rows(qkv_, n, kv_out, q_out + kv_out, qkv_out);
  const Tensor positions = positions_.view(DType::kInt32, {n});
  // q and k heads sit side by side in each qkv row: one pass rotates both.
  ops::rope(rows(qkv_, n, q_out + kv_out, 0, qkv_out), static_cast<int32_t>(hd), positions,
            vec(inv_freq_, hd / 2));

  PagedAttentionParams p{};
  p.q = q.data_as<const float>();
  p.q_stride = qkv_out;
  p.out = static_cast<float*>(attn_.data());
  p.k_cache = cache.keys(layer);
  p.v_cache = cache.values(layer);
  p.seq_starts = b.seq_starts.data_as<const int32_t>();
  p.context_lens = b.context_lens.data_as<const int32_t>();
  p.block_tables = b.block_tables.data_as<const int32_t>();
  p.num_seqs = static_cast<int32_t>(b.context_lens.size(0));
  p.max_blocks_per_seq = static_cast<int32_t>(b.block_tables.size(1));
  p.block_size = static_cast<int32_t>(cache.block_size());
  p.num_heads = static_cast<int32_t>(config_.num_attention_heads);
  p.num_kv_heads = static_cast<int32_t>(config_.num_kv_heads);
  p.head_dim = static_cast<int32_t>(hd);
  p.sliding_window = static_cast<int32_t>(config_.sliding_window);
  p.scale = 1.0f / std::sqrt(static_cast<float>(hd));
  ops::paged_attention(k, v, p, cache.keys(layer), cache.values(layer), cache.device());

  const Tensor attn = rows(attn_, n, q_out), proj = rows(proj_, n, h);
  ops::linear(attn, w.o.view(DType::kFloat32, {h, q_out}), proj);
  if (w.o_bias.size() > 0) ops::add_bias(proj, vec(w.o_bias, h));
  apply_lora(layer, lora_module::kAttnDense, attn, proj, 0);
  ops::add(hidden, proj);
}

void LlamaModel::mlp_block(int64_t layer, int64_t n) {
  const LayerWeights& w = weights_.layer(layer);
  const int64_t h = config_.hidden_size, inter = config_.intermediate_size;
  const Tensor hidden = rows(hidden_, n, h), normed = rows(normed_, n, h);
  const Tensor gate_up = rows(gate_up_, n, 2 * inter), act = rows(act_, n, inter);
  const Tensor proj = rows(proj_, n, h);
  ops::rms_norm(hidden, vec(w.post_norm, h), static_cast<float>(config_.rms_norm_eps), normed);
  ops::linear(normed, w.gate_up.view(DType::kFloat32, {2 * inter, h}), gate_up);
  apply_lora(layer, lora_module::kMlpHTo4H, normed, gate_up, 0);     // gate_proj half
  apply_lora(layer, lora_module::kMlpGate, normed, gate_up, inter);  // up_proj half
  ops::silu_mul(gate_up, act);
  ops::linear(act, w.down.view(DType::kFloat32, {h, inter}), proj);
  apply_lora(layer, lora_module::kMlp4HToH, act, proj, 0);
  ops::add(hidden, proj);
}

int32_t LlamaModel::lora_segments(int64_t layer, int32_t module_id) {
  segments_.clear();
  for (const Run& run : runs_) {
    const LoraPair& pair = run.adapter->pair(layer, module_id);
    if (pair.rank > 0) segments_.push_back({run.begin, run.end, pair});
  }
  return static_cast<int32_t>(segments_.size());
}

void LlamaModel::apply_lora(int64_t layer, int32_t module_id, const Tensor& x, const Tensor& y,
                            int64_t out_offset) {
  const int32_t count = lora_segments(layer, module_id);
  if (count == 0) return;
  const LoraModuleDims dims = config_.lora_module_dims(module_id);
  LoraGemmParams p{};
  p.x = x.data_as<const float>();
  p.x_stride = x.stride(0);
  p.y = y.data_as<float>() + out_offset;
  p.y_stride = y.stride(0);
  p.in = dims.in;
  p.out = dims.out;
  p.segments = segments_.data();
  p.num_segments = count;
  p.scratch = static_cast<float*>(lora_scratch_.data());
  ops::lora_gemm(p, y.device());
}

}  // namespace lorart

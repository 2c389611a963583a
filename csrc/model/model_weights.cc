#include "model/model_weights.h"

#include "core/checked_math.h"
#include "core/errors.h"
#include "kernels/ops.h"
#include "lora/module_ids.h"

namespace lorart {

namespace {

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) out += (i ? ", " : "") + std::to_string(shape[i]);
  return out + "]";
}

size_t total_bytes(const Buffer& embed, const Buffer& final_norm, const Buffer& lm_head,
                   const std::vector<LayerBuffers>& layers) {
  size_t bytes = embed.size() + final_norm.size() + lm_head.size();
  for (const LayerBuffers& l : layers) {
    bytes += l.input_norm.size() + l.qkv.size() + l.qkv_bias.size() + l.o.size() + l.o_bias.size() +
             l.post_norm.size() + l.gate_up.size() + l.down.size();
  }
  return bytes;
}

}  // namespace

ModelWeightsBuilder::ModelWeightsBuilder(const ModelConfig& config, DType dtype)
    : config_(config), dtype_(dtype) {
  config_.validate();
  if (!is_floating(dtype)) {
    raise<InvalidArgument>("weight dtype must be float32, float16 or bfloat16, got ",
                           dtype_name(dtype));
  }
  // Refuse a config whose weights cannot fit before a single tensor is read. Nothing is
  // allocated here: each buffer is allocated when the first checkpoint tensor it holds arrives,
  // so a config.json claiming more layers than the checkpoint has costs only the layers present.
  check_allocation(
      static_cast<size_t>(checked_mul(
          config_.weight_values(), static_cast<int64_t>(dtype_size(dtype)), "model weight bytes")),
      Device::cpu(),
      std::string("the model's ") + dtype_name(dtype) + " weights (config.json's sizes)");
  const int64_t h = config.hidden_size, inter = config.intermediate_size;
  const int64_t q_out = config.num_attention_heads * config.head_dim;
  const int64_t kv_out = config.num_kv_heads * config.head_dim;
  const int64_t qkv_out = q_out + 2 * kv_out;
  const int64_t v = config.vocab_size;
  expect("model.embed_tokens.weight", &embed_, v * h, 0, {v, h}, true);
  expect("model.norm.weight", &final_norm_, h, 0, {h}, true);
  if (!config.tie_word_embeddings) expect("lm_head.weight", &lm_head_, v * h, 0, {v, h}, true);
  layers_.resize(config.num_layers);
  for (int64_t i = 0; i < config.num_layers; ++i) {
    LayerBuffers& l = layers_[i];
    const std::string p = "model.layers." + std::to_string(i) + ".";
    expect(p + "input_layernorm.weight", &l.input_norm, h, 0, {h}, true);
    expect(p + "post_attention_layernorm.weight", &l.post_norm, h, 0, {h}, true);
    expect(p + "self_attn.q_proj.weight", &l.qkv, qkv_out * h, 0, {q_out, h}, true);
    expect(p + "self_attn.k_proj.weight", &l.qkv, qkv_out * h, q_out, {kv_out, h}, true);
    expect(p + "self_attn.v_proj.weight", &l.qkv, qkv_out * h, q_out + kv_out, {kv_out, h}, true);
    expect(p + "self_attn.o_proj.weight", &l.o, h * q_out, 0, {h, q_out}, true);
    expect(p + "mlp.gate_proj.weight", &l.gate_up, 2 * inter * h, 0, {inter, h}, true);
    expect(p + "mlp.up_proj.weight", &l.gate_up, 2 * inter * h, inter, {inter, h}, true);
    expect(p + "mlp.down_proj.weight", &l.down, h * inter, 0, {h, inter}, true);
    expect(p + "self_attn.qkv_proj.weight", &l.qkv, qkv_out * h, 0, {qkv_out, h}, false);
    expect(p + "mlp.gate_up_proj.weight", &l.gate_up, 2 * inter * h, 0, {2 * inter, h}, false);
    allow_fused(p + "self_attn.qkv_proj.weight",
                {p + "self_attn.q_proj.weight", p + "self_attn.k_proj.weight",
                 p + "self_attn.v_proj.weight"});
    allow_fused(p + "mlp.gate_up_proj.weight",
                {p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"});
    if (config.attention_bias) {
      expect(p + "self_attn.q_proj.bias", &l.qkv_bias, qkv_out, 0, {q_out}, true);
      expect(p + "self_attn.k_proj.bias", &l.qkv_bias, qkv_out, q_out, {kv_out}, true);
      expect(p + "self_attn.v_proj.bias", &l.qkv_bias, qkv_out, q_out + kv_out, {kv_out}, true);
      if (config.architecture == "LlamaForCausalLM") {  // Llama's attention_bias covers o too
        expect(p + "self_attn.o_proj.bias", &l.o_bias, h, 0, {h}, true);
      }
    }
  }
}

void ModelWeightsBuilder::expect(const std::string& name, Buffer* dst, int64_t dst_values,
                                 int64_t row_offset, std::vector<int64_t> shape, bool required) {
  if (slots_.count(name) == 0) order_.push_back(name);
  slots_[name] = Slot{dst, dst_values, row_offset, std::move(shape), required};
}

void ModelWeightsBuilder::allow_fused(const std::string& fused, std::vector<std::string> parts) {
  for (std::string& part : parts) fused_for_[std::move(part)] = fused;
}

ModelWeightsBuilder::Slot& ModelWeightsBuilder::slot_for(const std::string& name, int rank,
                                                         const int64_t* shape) {
  auto it = slots_.find(name);
  if (it == slots_.end()) {
    raise<InvalidArgument>("checkpoint tensor '", name, "' is not part of a ", config_.architecture,
                           " model with this config.json (unexpected weight)");
  }
  Slot& slot = it->second;
  bool same = rank == static_cast<int>(slot.shape.size());
  for (int i = 0; same && i < rank; ++i) same = shape[i] == slot.shape[i];
  if (!same) {
    std::vector<int64_t> got(shape, shape + rank);
    raise<InvalidArgument>("checkpoint tensor '", name, "' has shape ", shape_str(got),
                           ", config.json implies ", shape_str(slot.shape));
  }
  if (slot.dst->size() == 0) {  // the first tensor of a fused buffer (qkv, gate_up) allocates it
    *slot.dst = Buffer::allocate(static_cast<size_t>(slot.dst_values) * dtype_size(dtype_),
                                 Device::cpu(), "weights for checkpoint tensor '" + name + "'");
  }
  return slot;
}

namespace {

// The part of a slot's (possibly fused) buffer that one checkpoint tensor fills.
void* slot_data(const Buffer& dst, int64_t row_offset, const std::vector<int64_t>& shape,
                DType dtype) {
  const int64_t row_width = shape.size() == 2 ? shape[1] : 1;
  return static_cast<unsigned char*>(dst.data()) +
         row_offset * row_width * static_cast<int64_t>(dtype_size(dtype));
}

}  // namespace

void ModelWeightsBuilder::add(const std::string& name, const Tensor& tensor) {
  int64_t shape[Tensor::kMaxDims];
  for (int i = 0; i < tensor.dim(); ++i) shape[i] = tensor.size(i);
  Slot& slot = slot_for(name, tensor.dim(), shape);
  if (!is_floating(tensor.dtype()) || !tensor.device().is_cpu() || !tensor.is_contiguous()) {
    raise<InvalidArgument>("checkpoint tensor '", name, "' must be a contiguous host float ",
                           "tensor, got ", tensor.describe());
  }
  void* dst = slot_data(*slot.dst, slot.row_offset, slot.shape, dtype_);
  convert_floats(tensor.data(), tensor.dtype(), dst, dtype_, static_cast<size_t>(tensor.numel()));
  slot.filled = true;
}

Tensor ModelWeightsBuilder::destination(const std::string& name) {
  const auto it = slots_.find(name);
  const int rank = it == slots_.end() ? 0 : static_cast<int>(it->second.shape.size());
  Slot& slot = slot_for(name, rank, it == slots_.end() ? nullptr : it->second.shape.data());
  slot.filled = true;
  const int64_t strides[2] = {rank == 2 ? slot.shape[1] : 1, 1};
  return Tensor(slot_data(*slot.dst, slot.row_offset, slot.shape, dtype_), dtype_, rank,
                slot.shape.data(), strides, Device::cpu());
}

size_t ModelWeightsBuilder::allocated_bytes() const {
  return total_bytes(embed_, final_norm_, lm_head_, layers_);
}

std::vector<std::string> ModelWeightsBuilder::missing() const {
  std::vector<std::string> out;
  for (const std::string& name : order_) {
    const Slot& slot = slots_.at(name);
    if (!slot.required || slot.filled) continue;
    const auto fused = fused_for_.find(name);
    if (fused != fused_for_.end() && slots_.at(fused->second).filled) continue;
    out.push_back(name);
  }
  return out;
}

namespace {

Tensor matrix(const Buffer& b, DType dtype, int64_t rows, int64_t cols) {
  return b.size() == 0 ? Tensor() : b.view(dtype, {rows, cols});
}

Tensor vector_of(const Buffer& b, DType dtype, int64_t n) {
  return b.size() == 0 ? Tensor() : b.view(dtype, {n});
}

}  // namespace

bool ModelWeights::built_for(const ModelConfig& c) const {
  const ModelConfig& w = config_;
  return c.vocab_size == w.vocab_size && c.hidden_size == w.hidden_size &&
         c.intermediate_size == w.intermediate_size && c.num_layers == w.num_layers &&
         c.num_attention_heads == w.num_attention_heads && c.num_kv_heads == w.num_kv_heads &&
         c.head_dim == w.head_dim && c.tie_word_embeddings == w.tie_word_embeddings &&
         c.attention_bias == w.attention_bias && c.architecture == w.architecture;
}

namespace {

// Moves a host buffer to `device` (nothing to do on the CPU); the host copy is freed at once, so
// the upload never holds more than one matrix twice.
void place(Buffer& b, Device device) {
  if (device.is_cpu() || b.size() == 0) return;
  Buffer on_device = Buffer::allocate(b.size(), device, "model weights");
  on_device.copy_from(b.data(), Device::cpu(), b.size());
  b = std::move(on_device);
}

}  // namespace

ModelWeights::ModelWeights(ModelWeightsBuilder&& builder, Device device)
    : config_(builder.config_), dtype_(builder.dtype_), device_(device) {
  const std::vector<std::string> missing = builder.missing();
  if (!missing.empty()) {
    raise<InvalidArgument>("checkpoint is missing ", missing.size(), " tensor(s), first: '",
                           missing.front(), "'");
  }
  require_device(device);
  const ModelConfig& c = builder.config_;
  embed_ = std::move(builder.embed_);
  final_norm_ = std::move(builder.final_norm_);
  lm_head_ = std::move(builder.lm_head_);
  layers_ = std::move(builder.layers_);
  builder.slots_.clear();  // its pointers aimed at the buffers we now own
  for (Buffer* b : {&embed_, &final_norm_, &lm_head_}) place(*b, device);
  for (LayerBuffers& l : layers_) {
    for (Buffer* b :
         {&l.input_norm, &l.qkv, &l.qkv_bias, &l.o, &l.o_bias, &l.post_norm, &l.gate_up, &l.down}) {
      place(*b, device);
    }
  }
  const int64_t h = c.hidden_size, inter = c.intermediate_size;
  const int64_t q_out = c.num_attention_heads * c.head_dim;
  const int64_t qkv_out = q_out + 2 * c.num_kv_heads * c.head_dim;
  embed_view_ = matrix(embed_, dtype_, c.vocab_size, h);
  lm_head_view_ = c.tie_word_embeddings ? embed_view_ : matrix(lm_head_, dtype_, c.vocab_size, h);
  final_norm_view_ = vector_of(final_norm_, dtype_, h);
  for (const LayerBuffers& l : layers_) {
    layer_views_.push_back({vector_of(l.input_norm, dtype_, h), matrix(l.qkv, dtype_, qkv_out, h),
                            vector_of(l.qkv_bias, dtype_, qkv_out), matrix(l.o, dtype_, h, q_out),
                            vector_of(l.o_bias, dtype_, h), vector_of(l.post_norm, dtype_, h),
                            matrix(l.gate_up, dtype_, 2 * inter, h),
                            matrix(l.down, dtype_, h, inter)});
  }
  // The matrices in the layout the kernels read fastest; the embedding (and a tied lm_head) stays
  // row-major: its rows are gathered. Row-major on CUDA (nothing to do there).
  const ExecContext ctx{device, nullptr, 0, Precision::kFloat32};
  matrix_layout_ = ops::preferred_layout(ctx, dtype_);
  if (matrix_layout_ != WeightLayout::kRowMajor) {
    for (const LayerWeights& l : layer_views_) {
      for (const Tensor* w : {&l.qkv, &l.o, &l.gate_up, &l.down}) {
        ops::relayout_weight(ctx, *w, matrix_layout_);
      }
    }
    if (!c.tie_word_embeddings) ops::relayout_weight(ctx, lm_head_view_, lm_head_layout());
  }
  nbytes_ = total_bytes(embed_, final_norm_, lm_head_, layers_);
}

std::pair<Tensor, int64_t> ModelWeights::module_rows(int64_t layer, int32_t module_id) const {
  const LayerWeights& w = layer_views_.at(static_cast<size_t>(layer));
  const int64_t q_out = config_.num_attention_heads * config_.head_dim;
  const int64_t kv_out = config_.num_kv_heads * config_.head_dim;
  switch (module_id) {
    case lora_module::kAttnQkv:
    case lora_module::kAttnQ:
      return {w.qkv, 0};
    case lora_module::kAttnK:
      return {w.qkv, q_out};
    case lora_module::kAttnV:
      return {w.qkv, q_out + kv_out};
    case lora_module::kAttnDense:
      return {w.o, 0};
    case lora_module::kMlpHTo4H:  // gate_proj
      return {w.gate_up, 0};
    case lora_module::kMlpGate:  // up_proj
      return {w.gate_up, config_.intermediate_size};
    case lora_module::kMlp4HToH:
      return {w.down, 0};
    default:
      raise<LoraError>("module_id ", module_id, " (", lora_module_name(module_id),
                       ") is not a LoRA module of ", config_.architecture);
  }
}

}  // namespace lorart

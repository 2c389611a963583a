// ModelWeights: the base model's parameters in one storage dtype (float32, float16 or bfloat16:
// normally the checkpoint's own), owned in Buffers on the model's device (loaded on the host,
// then uploaded once for a CUDA device). The kernels widen
// 16-bit weights to float32 as they read them. Built once at load from HF-named tensors: a tensor
// already in the storage dtype is copied as it is (or read straight into destination()), one of
// another float dtype is converted on the way in (rounded to nearest even when narrowing, as
// transformers' torch_dtype casts); never through a float32 copy. q/k/v and gate/up are fused
// row-wise so each is one GEMM; checkpoints that already fuse them (self_attn.qkv_proj,
// mlp.gate_up_proj) load as they are.
#pragma once

#include <map>
#include <string>
#include <utility>
#include <vector>

#include "core/buffer.h"
#include "kernels/params.h"
#include "model/model_config.h"

namespace lorart {

// Views of one layer's weights (in ModelWeights::dtype()).
struct LayerWeights {
  Tensor input_norm;  // [H]
  Tensor qkv;         // [q_out + 2 * kv_out, H]: rows q, then k, then v
  Tensor qkv_bias;    // [q_out + 2 * kv_out], or undefined
  Tensor o;           // [H, q_out]
  Tensor o_bias;      // [H], or undefined
  Tensor post_norm;   // [H]
  Tensor gate_up;     // [2 * I, H]: rows gate, then up
  Tensor down;        // [H, I]
};

// The buffers behind one layer's LayerWeights (a size-0 Buffer where the layer has no such weight).
struct LayerBuffers {
  Buffer input_norm, qkv, qkv_bias, o, o_bias, post_norm, gate_up, down;
};

// Allocates nothing up front: a weight buffer is allocated when the first checkpoint tensor it
// holds is added, so a config.json that claims more (or larger) layers than the checkpoint holds
// fails at missing() / ModelWeights without having allocated the claimed size.
class ModelWeightsBuilder {
 public:
  // Weights will be stored in `dtype` (float32, float16 or bfloat16). Throws InvalidArgument for
  // an invalid config, another dtype, or weights whose bytes exceed the host's memory limit
  // (check_allocation), before any tensor is read.
  ModelWeightsBuilder(const ModelConfig& config, DType dtype = DType::kFloat32);
  // Adds one checkpoint tensor by its HF name (e.g. "model.layers.0.self_attn.q_proj.weight");
  // host memory, any float dtype (copied when it is dtype(), else converted, rounding to nearest
  // even). Throws InvalidArgument for unknown names or wrong shapes.
  void add(const std::string& name, const Tensor& tensor);
  // The place tensor `name` occupies, as a writable contiguous host view in dtype() (allocated
  // on first use), for a loader that reads the checkpoint's bytes straight into it. Counts the
  // tensor as added: the caller must fill all of it. The view is valid until the builder's
  // buffers move into a ModelWeights. Throws InvalidArgument as add() does.
  Tensor destination(const std::string& name);
  DType dtype() const { return dtype_; }
  // Bytes of weight buffers allocated so far (those that tensors added so far fill).
  size_t allocated_bytes() const;
  // Names still missing, in checkpoint order: embedding, final norm, lm_head, then layer by layer
  // ([] when complete).
  std::vector<std::string> missing() const;

 private:
  friend class ModelWeights;
  struct Slot {
    Buffer* dst;         // allocated by the first add() of a slot that fills it
    int64_t dst_values;  // values of all of dst (a fused buffer holds several slots)
    int64_t row_offset;  // first row of dst this tensor fills
    std::vector<int64_t> shape;
    bool required;
    bool filled = false;
  };
  void expect(const std::string& name, Buffer* dst, int64_t dst_values, int64_t row_offset,
              std::vector<int64_t> shape, bool required);
  // `fused` (e.g. qkv_proj) may stand in for all of `parts` (q_proj, k_proj, v_proj).
  void allow_fused(const std::string& fused, std::vector<std::string> parts);
  // The slot of `name`, checked against `shape` ([rank] sizes); allocates its buffer.
  Slot& slot_for(const std::string& name, int rank, const int64_t* shape);

  ModelConfig config_;
  DType dtype_;
  std::map<std::string, Slot> slots_;
  std::vector<std::string> order_;                // slot names in the order expect() saw them
  std::map<std::string, std::string> fused_for_;  // part name -> fused name that covers it
  Buffer embed_, final_norm_, lm_head_;
  std::vector<LayerBuffers> layers_;
};

class ModelWeights {
 public:
  // Takes the builder's buffers; throws InvalidArgument naming the first missing tensor. On a
  // CUDA `device` each host buffer is uploaded once (in its stored dtype) and freed as it goes;
  // throws DeviceError (require_device) before that when the device is not there.
  explicit ModelWeights(ModelWeightsBuilder&& builder, Device device = Device::cpu());

  const Tensor& embed() const { return embed_view_; }            // [V, H]
  const Tensor& lm_head() const { return lm_head_view_; }        // [V, H] (the embedding when tied)
  const Tensor& final_norm() const { return final_norm_view_; }  // [H]
  const LayerWeights& layer(int64_t i) const { return layer_views_[i]; }
  // The matrix a LoRA module adapts and the first of its rows there (q/k/v in the fused qkv,
  // gate/up in gate_up). Throws LoraError for a module the family does not have.
  std::pair<Tensor, int64_t> module_rows(int64_t layer, int32_t module_id) const;
  DType dtype() const { return dtype_; }
  // How the layers' matrices (qkv, o, gate_up, down) hold their values: the device's preferred
  // layout for dtype() (ops::preferred_layout), set when the weights are taken over.
  WeightLayout matrix_layout() const { return matrix_layout_; }
  // The lm_head's: matrix_layout(), or kRowMajor when it is the (gathered) embedding.
  WeightLayout lm_head_layout() const {
    return config_.tie_word_embeddings ? WeightLayout::kRowMajor : matrix_layout_;
  }
  size_t nbytes() const { return nbytes_; }
  Device device() const { return device_; }
  // The config the builder laid the weights out for.
  const ModelConfig& config() const { return config_; }
  // Whether `config` implies exactly these weights (every size and flag the layout depends on).
  bool built_for(const ModelConfig& config) const;

 private:
  ModelConfig config_;
  DType dtype_;
  Device device_;
  Buffer embed_, final_norm_, lm_head_;
  std::vector<LayerBuffers> layers_;
  std::vector<LayerWeights> layer_views_;
  Tensor embed_view_, lm_head_view_, final_norm_view_;
  WeightLayout matrix_layout_ = WeightLayout::kRowMajor;
  size_t nbytes_ = 0;
};

}  // namespace lorart

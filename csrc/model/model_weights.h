// ModelWeights: the base model's parameters in the compute dtype (float32), owned in Buffers on the
// model's device. Built once at load from HF-named tensors of any float dtype (converted on the
// way in, one copy); q/k/v and gate/up are fused row-wise so each is one GEMM. Checkpoints that
// already fuse them (self_attn.qkv_proj, mlp.gate_up_proj) load as they are.
#pragma once

#include <map>
#include <string>
#include <vector>

#include "core/buffer.h"
#include "model/model_config.h"

namespace lorart {

struct LayerWeights {
  Buffer input_norm;  // [H]
  Buffer qkv;         // [q_out + 2 * kv_out, H]: rows q, then k, then v
  Buffer qkv_bias;    // [q_out + 2 * kv_out] or empty
  Buffer o;           // [H, q_out]
  Buffer o_bias;      // [H] or empty
  Buffer post_norm;   // [H]
  Buffer gate_up;     // [2 * I, H]: rows gate, then up
  Buffer down;        // [H, I]
};

// Allocates nothing up front: a weight buffer is allocated when the first checkpoint tensor it
// holds is added, so a config.json that claims more (or larger) layers than the checkpoint holds
// fails at missing() / ModelWeights without having allocated the claimed size.
class ModelWeightsBuilder {
 public:
  // Throws InvalidArgument for an invalid config, or one whose float32 weights exceed the host's
  // memory limit (check_allocation), before any tensor is read.
  explicit ModelWeightsBuilder(const ModelConfig& config);
  // Adds one checkpoint tensor by its HF name (e.g. "model.layers.0.self_attn.q_proj.weight");
  // host memory, any float dtype. Throws InvalidArgument for unknown names or wrong shapes.
  void add(const std::string& name, const Tensor& tensor);
  // Bytes of weight buffers allocated so far (those that tensors added so far fill).
  size_t allocated_bytes() const;
  // Names still missing, in checkpoint order: embedding, final norm, lm_head, then layer by layer
  // ([] when complete).
  std::vector<std::string> missing() const;

 private:
  friend class ModelWeights;
  struct Slot {
    Buffer* dst;         // allocated by the first add() of a slot that fills it
    int64_t dst_values;  // float32 values of all of dst (a fused buffer holds several slots)
    int64_t row_offset;  // first row of dst this tensor fills
    std::vector<int64_t> shape;
    bool required;
    bool filled = false;
  };
  void expect(const std::string& name, Buffer* dst, int64_t dst_values, int64_t row_offset,
              std::vector<int64_t> shape, bool required);
  // `fused` (e.g. qkv_proj) may stand in for all of `parts` (q_proj, k_proj, v_proj).
  void allow_fused(const std::string& fused, std::vector<std::string> parts);

  ModelConfig config_;
  std::map<std::string, Slot> slots_;
  std::vector<std::string> order_;                // slot names in the order expect() saw them
  std::map<std::string, std::string> fused_for_;  // part name -> fused name that covers it
  Buffer embed_, final_norm_, lm_head_;
  std::vector<LayerWeights> layers_;
};

class ModelWeights {
 public:
  // Takes the builder's buffers; throws InvalidArgument naming the first missing tensor.
  explicit ModelWeights(ModelWeightsBuilder&& builder);

  const Tensor& embed() const { return embed_view_; }            // [V, H]
  const Tensor& lm_head() const { return lm_head_view_; }        // [V, H] (the embedding when tied)
  const Tensor& final_norm() const { return final_norm_view_; }  // [H]
  const LayerWeights& layer(int64_t i) const { return layers_[i]; }
  size_t nbytes() const { return nbytes_; }

 private:
  Buffer embed_, final_norm_, lm_head_;
  std::vector<LayerWeights> layers_;
  Tensor embed_view_, lm_head_view_, final_norm_view_;
  size_t nbytes_ = 0;
};

}  // namespace lorart

#include "kernels/ops.h"

#include "core/errors.h"
#include "kernels/cpu/cpu_kernels.h"

namespace lorart::ops {

namespace {

// The CUDA backend currently provides device memory only; its kernels land op by op, each
// checked against the CPU implementation below before it is dispatched to.
// Every tensor of an op lives on one device; the first names it.
template <class... More>
Device device_of(const char* op, const Tensor& t, const More&... more) {
  if (((more.device() != t.device()) || ...)) {
    raise<InvalidArgument>(op, ": all tensors must be on ", t.device().str());
  }
  if (!t.device().is_cpu()) {
    raise<DeviceError>(op, ": no ", t.device().str(), " implementation in this build yet");
  }
  return t.device();
}

void require(bool ok, const char* op, const char* what, const Tensor& t) {
  if (!ok) raise<InvalidArgument>(op, ": ", what, ", got ", t.describe());
}

void require_rows(const char* op, const Tensor& t, const char* name) {
  require(t.dim() == 2 && t.stride(1) == 1, op, name, t);
  require(t.dtype() == DType::kFloat32, op, name, t);
}

}  // namespace

void embedding(const Tensor& table, const Tensor& ids, const Tensor& out) {
  device_of("embedding", table, ids, out);
  require(ids.dim() == 1 && ids.dtype() == DType::kInt32, "embedding", "ids must be [T] int32",
          ids);
  require(table.is_contiguous() && table.dim() == 2, "embedding", "table must be [V, H]", table);
  require(out.is_contiguous() && out.size(0) == ids.size(0) && out.size(1) == table.size(1),
          "embedding", "out must be [T, H]", out);
  cpu::embedding(table.data_as<float>(), table.size(1), ids.data_as<int32_t>(), ids.size(0),
                 out.data_as<float>());
}

void rms_norm(const Tensor& x, const Tensor& weight, float eps, const Tensor& out) {
  device_of("rms_norm", x, weight, out);
  require_rows("rms_norm", x, "x must be [T, H] float32 with unit column stride");
  require_rows("rms_norm", out, "out must be [T, H] float32 with unit column stride");
  require(out.size(0) == x.size(0) && out.size(1) == x.size(1), "rms_norm",
          "out must have the shape of x", out);
  require(weight.numel() == x.size(1), "rms_norm", "weight must have H elements", weight);
  cpu::rms_norm(x.data_as<float>(), x.stride(0), weight.data_as<float>(), x.size(0), x.size(1), eps,
                out.data_as<float>(), out.stride(0));
}

void rope(const Tensor& x, int32_t head_dim, const Tensor& positions, const Tensor& inv_freq) {
  device_of("rope", x, positions, inv_freq);
  require_rows("rope", x, "x must be [T, heads * head_dim] float32");
  require(head_dim > 0 && head_dim % 2 == 0 && head_dim <= 1024 && x.size(1) % head_dim == 0,
          "rope", "head_dim must be even, <= 1024 and divide the row width", x);
  require(positions.numel() == x.size(0) && positions.dtype() == DType::kInt32, "rope",
          "positions must be [T] int32", positions);
  require(inv_freq.numel() == head_dim / 2, "rope", "inv_freq must have head_dim / 2 elements",
          inv_freq);
  cpu::rope(x.data_as<float>(), x.stride(0), x.size(0), static_cast<int32_t>(x.size(1) / head_dim),
            head_dim, positions.data_as<int32_t>(), inv_freq.data_as<float>());
}

void linear(const Tensor& x, const Tensor& w, const Tensor& y, float beta) {
  device_of("linear", x, w, y);
  require_rows("linear", x, "x must be [M, K] float32");
  require_rows("linear", y, "y must be [M, N] float32");
  require(w.is_contiguous() && w.dim() == 2 && w.size(1) == x.size(1) && w.size(0) == y.size(1),
          "linear", "w must be contiguous [N, K] matching x [M, K] and y [M, N]", w);
  require(y.size(0) == x.size(0), "linear", "y must have as many rows as x", y);
  cpu::linear(x.data_as<float>(), x.stride(0), w.data_as<float>(), x.size(0), w.size(0), x.size(1),
              beta, y.data_as<float>(), y.stride(0));
}

void add_bias(const Tensor& y, const Tensor& bias) {
  device_of("add_bias", y, bias);
  require_rows("add_bias", y, "y must be [M, N] float32");
  require(bias.numel() == y.size(1), "add_bias", "bias must have N elements", bias);
  cpu::add_bias(y.data_as<float>(), y.stride(0), y.size(0), y.size(1), bias.data_as<float>());
}

void add(const Tensor& y, const Tensor& x) {
  device_of("add", y, x);
  require(y.is_contiguous() && x.is_contiguous() && x.numel() == y.numel(), "add",
          "x and y must be contiguous with the same size", x);
  cpu::add(y.data_as<float>(), x.data_as<float>(), y.numel());
}

void silu_mul(const Tensor& gate_up, const Tensor& out) {
  device_of("silu_mul", gate_up, out);
  require(gate_up.is_contiguous() && out.is_contiguous() && gate_up.dim() == 2 && out.dim() == 2 &&
              gate_up.size(1) == 2 * out.size(1) && gate_up.size(0) == out.size(0),
          "silu_mul", "gate_up must be [T, 2I] and out [T, I], contiguous", gate_up);
  cpu::silu_mul(gate_up.data_as<float>(), out.size(0), out.size(1), out.data_as<float>());
}

void paged_attention(const Tensor& k, const Tensor& v, const PagedAttentionParams& params,
                     float* k_cache, float* v_cache, Device device) {
  if (!device.is_cpu()) {
    raise<DeviceError>("paged_attention: no ", device.str(), " implementation in this build yet");
  }
  require(k.stride(0) == v.stride(0) && k.size(1) == params.num_kv_heads * params.head_dim,
          "paged_attention", "k and v must be [T, kv_heads * head_dim] views with one stride", k);
  cpu::paged_kv_write(k.data_as<float>(), v.data_as<float>(), k.stride(0), params, k_cache,
                      v_cache);
  cpu::paged_attention(params);
}

void lora_gemm(const LoraGemmParams& params, Device device) {
  if (!device.is_cpu()) {
    raise<DeviceError>("lora_gemm: no ", device.str(), " implementation in this build yet");
  }
  cpu::lora_gemm(params);
}

}  // namespace lorart::ops

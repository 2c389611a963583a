#include "kernels/ops.h"

#include "core/checked_math.h"
#include "core/errors.h"
#include "kernels/cpu/cpu_kernels.h"
#include "kernels/cuda/attention/attention.h"  // plain C++: the split constants size the workspace
#include "kernels/cuda/lora/lora_gemm.h"       // plain C++: the chunk sizes the scratch
#if LORART_WITH_CUDA
#include "kernels/cuda/elementwise/elementwise.h"
#include "kernels/cuda/gemm/gemm.h"
#include "kernels/cuda/sampling/sampling.h"
#endif

namespace lorart::ops {

namespace {

// Every tensor of an op lives on the context's device. A CUDA context needs a build with the CUDA
// backend; each op then dispatches to its kernel in csrc/kernels/cuda/ (checked against the CPU
// implementation, which stays the reference).
template <class... More>
void check_device(const char* op, const ExecContext& ctx, const More&... tensors) {
  const Device bad[] = {tensors.device()...};
  for (const Device& d : bad) {
    if (d != ctx.device) {
      raise<InvalidArgument>(op, ": every tensor must be on the context's device ",
                             ctx.device.str(), ", got one on ", d.str());
    }
  }
  if (ctx.device.is_cuda()) {
    if (!LORART_WITH_CUDA) {
      raise<DeviceError>(op, ": this build has no CUDA backend (built with LORART_CUDA=OFF or ",
                         "without nvcc), so it cannot run on ", ctx.device.str());
    }
    return;
  }
  // The CPU pool: OpenMP's team size is a per-thread setting of the calling thread.
  if (ctx.num_threads > 0 && cpu::num_threads() != ctx.num_threads) {
    cpu::set_num_threads(ctx.num_threads);
  }
}

void require(bool ok, const char* op, const char* what, const Tensor& t) {
  if (!ok) raise<InvalidArgument>(op, ": ", what, ", got ", t.describe());
}

// A float32 activation matrix with unit column stride.
void require_rows(const char* op, const Tensor& t, const char* what) {
  require(t.dim() == 2 && t.stride(1) == 1 && t.dtype() == DType::kFloat32, op, what, t);
}

void require_int32(const char* op, const Tensor& t, int dims, const char* what) {
  require(t.dim() == dims && t.dtype() == DType::kInt32 && t.is_contiguous(), op, what, t);
}

// A weight matrix in a float storage dtype: [rows, cols] with unit column stride.
WeightRef weight_ref(const char* op, const char* what, const Tensor& w, int64_t rows,
                     int64_t cols) {
  require(is_floating(w.dtype()), op, what, w);
  require(w.dim() == 2 && w.size(0) == rows && w.size(1) == cols && w.stride(1) == 1, op, what, w);
  return {w.data(), w.dtype(), nullptr, w.stride(0)};
}

// A weight vector (norm weight, bias) of `n` float values, contiguous.
WeightRef weight_vector(const char* op, const char* what, const Tensor& w, int64_t n) {
  require(is_floating(w.dtype()) && w.is_contiguous() && w.numel() == n, op, what, w);
  return {w.data(), w.dtype(), nullptr, n};
}

// Every entry of the int32 vector `t` in [0, limit).
// Reads host memory only: device index arrays are checked on the host before they are uploaded
// (LlamaModel::validate), so a CUDA tensor is skipped here.
void require_indices(const char* op, const char* name, const Tensor& t, int64_t limit) {
  if (!t.device().is_cpu()) return;
  const int32_t* v = t.data_as<const int32_t>();
  for (int64_t i = 0; i < t.numel(); ++i) {
    if (v[i] < 0 || v[i] >= limit) {
      raise<InvalidArgument>(op, ": ", name, "[", i, "] = ", v[i], " is out of range [0, ", limit,
                             ")");
    }
  }
}

}  // namespace

void embedding(const ExecContext& ctx, const Tensor& table, const Tensor& ids, const Tensor& out) {
  check_device("embedding", ctx, table, ids, out);
  require_int32("embedding", ids, 1, "ids must be [T] int32");
  require(table.dim() == 2, "embedding", "table must be [V, H]", table);
  const WeightRef t = weight_ref("embedding", "table must be [V, H] (float32/float16/bfloat16)",
                                 table, table.size(0), table.size(1));
  require(out.is_contiguous() && out.dim() == 2 && out.dtype() == DType::kFloat32 &&
              out.size(0) == ids.size(0) && out.size(1) == table.size(1),
          "embedding", "out must be contiguous float32 [T, H]", out);
  require_indices("embedding", "ids", ids, table.size(0));
  const EmbeddingParams p{t, ids.data_as<int32_t>(), out.data_as<float>(), ids.size(0),
                          table.size(1)};
#if LORART_WITH_CUDA
  if (ctx.device.is_cuda()) return cuda::embedding(p, ctx.stream);
#endif
  cpu::embedding(p);
}

void rms_norm(const ExecContext& ctx, const Tensor& x, const Tensor& weight, float eps,
              const Tensor& out) {
  check_device("rms_norm", ctx, x, weight, out);
  require_rows("rms_norm", x, "x must be [T, H] float32 with unit column stride");
  require_rows("rms_norm", out, "out must be [T, H] float32 with unit column stride");
  require(out.size(0) == x.size(0) && out.size(1) == x.size(1), "rms_norm",
          "out must have the shape of x", out);
  const WeightRef w =
      weight_vector("rms_norm", "weight must have H float elements", weight, x.size(1));
  const RmsNormParams p{x.data_as<float>(), x.stride(0), w,         out.data_as<float>(),
                        out.stride(0),      x.size(0),   x.size(1), eps};
#if LORART_WITH_CUDA
  if (ctx.device.is_cuda()) return cuda::rms_norm(p, ctx.stream);
#endif
  cpu::rms_norm(p);
}

void add_rms_norm(const ExecContext& ctx, const Tensor& residual, const Tensor& x,
                  const Tensor& weight, float eps, const Tensor& out) {
  check_device("add_rms_norm", ctx, residual, x, weight, out);
  require_rows("add_rms_norm", residual, "residual must be [T, H] float32 with unit column stride");
  require_rows("add_rms_norm", x, "x must be [T, H] float32 with unit column stride");
  require_rows("add_rms_norm", out, "out must be [T, H] float32 with unit column stride");
  require(x.size(0) == residual.size(0) && x.size(1) == residual.size(1), "add_rms_norm",
          "x must have the shape of residual", x);
  require(out.size(0) == residual.size(0) && out.size(1) == residual.size(1), "add_rms_norm",
          "out must have the shape of residual", out);
  // out == residual would overwrite the sum the op keeps; and rows of out are written while other
  // threads (blocks, on CUDA) still read other rows of residual and x. Equal data pointers, the
  // overlap a caller is likely to make, are refused here.
  require(residual.numel() == 0 || (out.data() != residual.data() && out.data() != x.data()),
          "add_rms_norm", "out must not alias residual or x", out);
  const WeightRef w =
      weight_vector("add_rms_norm", "weight must have H float elements", weight, residual.size(1));
  AddRmsNormParams p{};
  p.residual = residual.data_as<float>();
  p.residual_stride = residual.stride(0);
  p.x = x.data_as<const float>();
  p.x_stride = x.stride(0);
  p.weight = w;
  p.out = out.data_as<float>();
  p.out_stride = out.stride(0);
  p.num_tokens = residual.size(0);
  p.hidden = residual.size(1);
  p.eps = eps;
#if LORART_WITH_CUDA
  if (ctx.device.is_cuda()) return cuda::add_rms_norm(p, ctx.stream);
#endif
  cpu::add_rms_norm(p);
}

void rope(const ExecContext& ctx, const Tensor& x, int32_t head_dim, const Tensor& positions,
          const Tensor& inv_freq) {
  check_device("rope", ctx, x, positions, inv_freq);
  require_rows("rope", x, "x must be [T, heads * head_dim] float32");
  require(head_dim > 0 && head_dim % 2 == 0 && head_dim <= 1024 && x.size(1) % head_dim == 0,
          "rope", "head_dim must be even, <= 1024 and divide the row width", x);
  require(positions.numel() == x.size(0) && positions.dtype() == DType::kInt32, "rope",
          "positions must be [T] int32", positions);
  require(inv_freq.numel() == head_dim / 2 && inv_freq.dtype() == DType::kFloat32, "rope",
          "inv_freq must be float32 [head_dim / 2]", inv_freq);
#if LORART_WITH_CUDA
  if (ctx.device.is_cuda()) {
    return cuda::rope(x.data_as<float>(), x.stride(0), x.size(0),
                      static_cast<int32_t>(x.size(1) / head_dim), head_dim,
                      positions.data_as<int32_t>(), inv_freq.data_as<float>(), ctx.stream);
  }
#endif
  cpu::rope(x.data_as<float>(), x.stride(0), x.size(0), static_cast<int32_t>(x.size(1) / head_dim),
            head_dim, positions.data_as<int32_t>(), inv_freq.data_as<float>());
}

void linear(const ExecContext& ctx, const Tensor& x, const Tensor& w, const Tensor& y, float beta,
            const Tensor& w_scales, WeightLayout w_layout) {
  check_device("linear", ctx, x, w, y);
  require_rows("linear", x, "x must be [M, K] float32");
  require_rows("linear", y, "y must be [M, N] float32");
  require(y.size(0) == x.size(0), "linear", "y must have as many rows as x", y);
  WeightRef ref = weight_ref("linear", "w must be float [N, K] matching x [M, K], y [M, N]", w,
                             y.size(1), x.size(1));
  // Float weights carry no scales; quantized dtypes (which will) have no kernel yet.
  require(!w_scales.defined() || w_scales.numel() == 0, "linear",
          "w_scales are for quantized weights; float weights take none", w_scales);
  // The bf16 kernels read w as contiguous [N, K] (model weights always are).
  require(ctx.precision == Precision::kFloat32 || ref.stride == x.size(1), "linear",
          "w must be contiguous [N, K] at precision bfloat16", w);
  require(w_layout == WeightLayout::kRowMajor || w.dtype() == DType::kBFloat16, "linear",
          "w in the k32-interleaved layout must be bfloat16", w);
  ref.layout = w_layout;
  const LinearParams p{
      x.data_as<float>(), x.stride(0), ref,  y.data_as<float>(), y.stride(0), x.size(0),
      y.size(1),          x.size(1),   beta, ctx.precision};
#if LORART_WITH_CUDA
  if (ctx.device.is_cuda()) {
    require(w_layout == WeightLayout::kRowMajor, "linear",
            "w must be row-major on CUDA (the k32-interleaved layout is the CPU's)", w);
    return cuda::linear(p, ctx.stream);
  }
#endif
  cpu::linear(p);
}

WeightLayout preferred_layout(const ExecContext& ctx, DType dtype) {
  return ctx.device.is_cpu() && dtype == DType::kBFloat16 ? WeightLayout::kK32Interleaved
                                                          : WeightLayout::kRowMajor;
}

void relayout_weight(const ExecContext& ctx, const Tensor& w, WeightLayout layout) {
  check_device("relayout_weight", ctx, w);
  if (layout == WeightLayout::kRowMajor) return;
  require(w.dtype() == DType::kBFloat16 && w.dim() == 2 && w.stride(1) == 1, "relayout_weight",
          "w must be a bfloat16 [N, K] matrix with unit column stride for the k32-interleaved "
          "layout",
          w);
  // The CUDA kernels read row-major matrices only (preferred_layout never asks for another there).
  require(!ctx.device.is_cuda(), "relayout_weight",
          "the k32-interleaved layout is the CPU's; CUDA weights stay row-major", w);
  cpu::to_layout(w.data_as<uint16_t>(), w.size(0), w.size(1), w.stride(0), layout);
}

void add_bias(const ExecContext& ctx, const Tensor& y, const Tensor& bias) {
  check_device("add_bias", ctx, y, bias);
  require_rows("add_bias", y, "y must be [M, N] float32");
  const WeightRef b = weight_vector("add_bias", "bias must have N float elements", bias, y.size(1));
  const BiasParams p{y.data_as<float>(), y.stride(0), b, y.size(0), y.size(1)};
#if LORART_WITH_CUDA
  if (ctx.device.is_cuda()) return cuda::add_bias(p, ctx.stream);
#endif
  cpu::add_bias(p);
}

void add(const ExecContext& ctx, const Tensor& y, const Tensor& x) {
  check_device("add", ctx, y, x);
  require(y.is_contiguous() && x.is_contiguous() && x.numel() == y.numel() &&
              x.dtype() == DType::kFloat32 && y.dtype() == DType::kFloat32,
          "add", "x and y must be contiguous float32 with the same size", x);
#if LORART_WITH_CUDA
  if (ctx.device.is_cuda()) {
    return cuda::add(y.data_as<float>(), x.data_as<const float>(), y.numel(), ctx.stream);
  }
#endif
  cpu::add(y.data_as<float>(), x.data_as<float>(), y.numel());
}

void silu_mul(const ExecContext& ctx, const Tensor& gate_up, const Tensor& out) {
  check_device("silu_mul", ctx, gate_up, out);
  require(gate_up.is_contiguous() && out.is_contiguous() && gate_up.dim() == 2 && out.dim() == 2 &&
              gate_up.dtype() == DType::kFloat32 && out.dtype() == DType::kFloat32 &&
              gate_up.size(1) == 2 * out.size(1) && gate_up.size(0) == out.size(0),
          "silu_mul", "gate_up must be [T, 2I] and out [T, I], contiguous float32", gate_up);
#if LORART_WITH_CUDA
  if (ctx.device.is_cuda()) {
    return cuda::silu_mul(gate_up.data_as<float>(), out.size(0), out.size(1), out.data_as<float>(),
                          ctx.stream);
  }
#endif
  cpu::silu_mul(gate_up.data_as<float>(), out.size(0), out.size(1), out.data_as<float>());
}

void gather_rows(const ExecContext& ctx, const Tensor& x, const Tensor& rows, const Tensor& out) {
  check_device("gather_rows", ctx, x, rows, out);
  require(x.is_contiguous() && x.dim() == 2 && x.dtype() == DType::kFloat32, "gather_rows",
          "x must be contiguous float32 [T, W]", x);
  require_int32("gather_rows", rows, 1, "rows must be [N] int32");
  require(out.is_contiguous() && out.dim() == 2 && out.dtype() == DType::kFloat32 &&
              out.size(0) == rows.size(0) && out.size(1) == x.size(1),
          "gather_rows", "out must be contiguous float32 [N, W]", out);
  require_indices("gather_rows", "rows", rows, x.size(0));
#if LORART_WITH_CUDA
  if (ctx.device.is_cuda()) {
    return cuda::gather_rows(x.data_as<float>(), x.size(1), rows.data_as<int32_t>(), rows.size(0),
                             out.data_as<float>(), ctx.stream);
  }
#endif
  cpu::gather_rows(x.data_as<float>(), x.size(1), rows.data_as<int32_t>(), rows.size(0),
                   out.data_as<float>());
}

namespace {

bool is_kv_dtype(DType d) {
  return d == DType::kFloat32 || d == DType::kFloat16 || d == DType::kBFloat16;
}

// Bytes of split-KV partials for `seqs` sequences of at most `kv_len` keys (CUDA layout, see
// kernels/cuda/attention/attention.h); 0 when no sequence can need more than one split.
size_t attention_partial_bytes(int64_t seqs, int64_t kv_len, const AttentionShape& shape) {
  const int64_t splits = (kv_len + cuda::kAttentionSplitKeys - 1) / cuda::kAttentionSplitKeys;
  if (splits <= 1 || seqs <= 0) return 0;
  return static_cast<size_t>(checked_product(
      {seqs, shape.num_heads, splits, int64_t{shape.head_dim} + 2, int64_t{sizeof(float)}},
      "paged_attention workspace bytes (seqs * heads * splits * (head_dim + 2) * 4)"));
}

}  // namespace

size_t paged_attention_workspace_bytes(const ExecContext& ctx, int64_t max_seqs, int64_t max_kv_len,
                                       const AttentionShape& shape) {
  if (max_seqs < 0 || max_kv_len < 0 || shape.num_heads <= 0 || shape.head_dim <= 0) {
    raise<InvalidArgument>("paged_attention_workspace_bytes: max_seqs (", max_seqs,
                           "), max_kv_len (", max_kv_len, "), num_heads (", shape.num_heads,
                           ") and head_dim (", shape.head_dim, ") must be >= 0 / > 0");
  }
  if (!ctx.device.is_cuda()) return 0;
  return attention_partial_bytes(max_seqs, max_kv_len, shape);
}

void paged_attention(const ExecContext& ctx, const Tensor& q, const Tensor& k, const Tensor& v,
                     const Tensor& k_cache, const Tensor& v_cache, const AttentionBatch& batch,
                     const AttentionShape& shape, const Tensor& out) {
  check_device("paged_attention", ctx, q, k, v, k_cache, v_cache, batch.seq_starts,
               batch.context_lens, batch.block_tables, out);
  const int64_t kv_width = static_cast<int64_t>(shape.num_kv_heads) * shape.head_dim;
  require(shape.num_heads > 0 && shape.num_kv_heads > 0 && shape.head_dim > 0 &&
              shape.num_heads % shape.num_kv_heads == 0 && shape.sliding_window >= 0,
          "paged_attention", "heads must be positive with num_heads % num_kv_heads == 0", q);
  require_rows("paged_attention", q, "q must be [T, heads * head_dim] float32");
  require(q.size(1) == int64_t{shape.num_heads} * shape.head_dim, "paged_attention",
          "q must be [T, heads * head_dim]", q);
  require_rows("paged_attention", k, "k must be [T, kv_heads * head_dim] float32");
  require_rows("paged_attention", v, "v must be [T, kv_heads * head_dim] float32");
  require(k.size(1) == kv_width && v.size(1) == kv_width && k.stride(0) == v.stride(0) &&
              k.size(0) == q.size(0) && v.size(0) == q.size(0),
          "paged_attention", "k and v must be [T, kv_heads * head_dim] views with one stride", k);
  require(k_cache.is_contiguous() && k_cache.dim() == 4 && is_kv_dtype(k_cache.dtype()) &&
              k_cache.size(2) == shape.num_kv_heads && k_cache.size(3) == shape.head_dim,
          "paged_attention",
          "k_cache must be float32, float16 or bfloat16 [blocks, block_size, kv_heads, head_dim]",
          k_cache);
  require(v_cache.is_contiguous() && v_cache.dim() == 4 && v_cache.dtype() == k_cache.dtype() &&
              v_cache.size(0) == k_cache.size(0) && v_cache.size(1) == k_cache.size(1) &&
              v_cache.size(2) == k_cache.size(2) && v_cache.size(3) == k_cache.size(3),
          "paged_attention", "v_cache must have k_cache's shape and dtype", v_cache);
  require_int32("paged_attention", batch.seq_starts, 1, "seq_starts must be [S + 1] int32");
  require_int32("paged_attention", batch.context_lens, 1, "context_lens must be [S] int32");
  require_int32("paged_attention", batch.block_tables, 2, "block_tables must be [S, W] int32");
  const int64_t num_seqs = batch.context_lens.size(0);
  require(batch.seq_starts.size(0) == num_seqs + 1 && batch.block_tables.size(0) == num_seqs,
          "paged_attention", "seq_starts must have S + 1 entries and block_tables S rows",
          batch.seq_starts);
  require(out.is_contiguous() && out.dtype() == DType::kFloat32 && out.dim() == 2 &&
              out.size(0) == q.size(0) && out.size(1) == q.size(1),
          "paged_attention", "out must be contiguous float32 [T, heads * head_dim]", out);
  const int64_t width = batch.block_tables.size(1), block_size = k_cache.size(1);
  if (!ctx.device.is_cuda()) {
    // The layout's contents, O(S + blocks): every position's block inside the cache. They are
    // host memory here; on a device the caller (the model) has checked them before the upload.
    const int32_t* starts = batch.seq_starts.data_as<const int32_t>();
    const int32_t* ctx_lens = batch.context_lens.data_as<const int32_t>();
    const int32_t* tables = batch.block_tables.data_as<const int32_t>();
    if (starts[0] != 0 || starts[num_seqs] != q.size(0)) {
      raise<InvalidArgument>("paged_attention: seq_starts must run from 0 to the ", q.size(0),
                             " query tokens");
    }
    for (int64_t s = 0; s < num_seqs; ++s) {
      if (starts[s + 1] <= starts[s] || ctx_lens[s] < 0) {
        raise<InvalidArgument>("paged_attention: sequence ", s,
                               " has no tokens or a negative context length");
      }
    }
    for (int64_t s = 0; s < num_seqs; ++s) {
      const int64_t end = int64_t{ctx_lens[s]} + (starts[s + 1] - starts[s]);
      const int64_t blocks = (end + block_size - 1) / block_size;
      if (end > kInt32Max || blocks > width) {
        raise<InvalidArgument>("paged_attention: sequence ", s, " reaches position ", end,
                               " beyond its ", width, " block(s) of ", block_size);
      }
      for (int64_t b = 0; b < blocks; ++b) {
        const int32_t id = tables[s * width + b];
        if (id < 0 || id >= k_cache.size(0)) {
          raise<InvalidArgument>("paged_attention: block_tables[", s, ", ", b, "] = ", id,
                                 " is out of range [0, ", k_cache.size(0), ")");
        }
      }
    }
  }
  PagedAttentionParams p{};
  p.q = q.data_as<const float>();
  p.q_stride = q.stride(0);
  p.k = k.data_as<const float>();
  p.v = v.data_as<const float>();
  p.kv_stride = k.stride(0);
  p.out = out.data_as<float>();
  p.k_cache = k_cache.data();
  p.v_cache = v_cache.data();
  p.cache_dtype = k_cache.dtype();
  p.seq_starts = batch.seq_starts.data_as<const int32_t>();
  p.context_lens = batch.context_lens.data_as<const int32_t>();
  p.block_tables = batch.block_tables.data_as<const int32_t>();
  p.num_seqs = static_cast<int32_t>(num_seqs);
  p.max_blocks_per_seq = static_cast<int32_t>(width);
  p.block_size = static_cast<int32_t>(block_size);
  p.num_heads = shape.num_heads;
  p.num_kv_heads = shape.num_kv_heads;
  p.head_dim = shape.head_dim;
  p.sliding_window = shape.sliding_window;
  p.scale = shape.scale;
#if LORART_WITH_CUDA
  if (ctx.device.is_cuda()) {
    if (num_seqs == 0) return;
    // The grids come from the host-known bounds: the arrays are device memory.
    if (batch.max_query_len <= 0 || batch.max_query_len > q.size(0) || batch.max_kv_len <= 0 ||
        batch.max_kv_len < batch.max_query_len ||
        (batch.max_kv_len + block_size - 1) / block_size > width) {
      raise<InvalidArgument>(
          "paged_attention: on CUDA max_query_len (", batch.max_query_len,
          ") must be in [1, T = ", q.size(0), "] and max_kv_len (", batch.max_kv_len,
          ") in [max_query_len, max_blocks * block_size = ", width * block_size, "]");
    }
    if (shape.head_dim > cuda::kAttentionMaxHeadDim || shape.head_dim % 2 != 0) {
      raise<InvalidArgument>("paged_attention: head_dim must be even and <= ",
                             cuda::kAttentionMaxHeadDim, " on CUDA, got ", shape.head_dim);
    }
    const size_t need = attention_partial_bytes(num_seqs, batch.max_kv_len, shape);
    if (need > 0 && (!batch.workspace.defined() || !batch.workspace.is_contiguous() ||
                     batch.workspace.device() != ctx.device || batch.workspace.nbytes() < need)) {
      raise<InvalidArgument>(
          "paged_attention: workspace must be contiguous device memory of at "
          "least ",
          need, " bytes (paged_attention_workspace_bytes), got ", batch.workspace.describe());
    }
    p.num_tokens = static_cast<int32_t>(q.size(0));
    p.max_query_len = batch.max_query_len;
    p.max_kv_len = batch.max_kv_len;
    p.workspace = need > 0 ? batch.workspace.data() : nullptr;
    p.workspace_bytes = static_cast<int64_t>(need);
    return cuda::paged_attention(p, ctx.stream);
  }
#endif
  cpu::paged_attention(p);
}

void lora_gemm(const ExecContext& ctx, const Tensor& x, const Tensor& y, int64_t out,
               const LoraBatch& lora, int64_t pair_index, const Tensor& scratch) {
  const LoraSlice slice{pair_index, 0, out};
  lora_gemm_slices(ctx, x, y, &slice, 1, lora, scratch);
}

int64_t lora_scratch_floats(const ExecContext& ctx, int64_t num_tokens, int64_t max_rank,
                            int64_t in, int32_t num_slices) {
  if (num_tokens < 0 || max_rank < 0 || in < 0 || num_slices < 1 || num_slices > kMaxLoraSlices) {
    raise<InvalidArgument>("lora_scratch_floats: num_tokens (", num_tokens, "), max_rank (",
                           max_rank, ") and in (", in, ") must be >= 0 and num_slices (",
                           num_slices, ") in [1, ", kMaxLoraSlices, "]");
  }
  const int64_t per_slice = checked_mul(num_tokens, max_rank, "LoRA scratch floats");
  if (!ctx.device.is_cuda()) return per_slice;
  const int64_t chunks = (in + cuda::kLoraChunk - 1) / cuda::kLoraChunk;
  return checked_product({per_slice, chunks, int64_t{num_slices}}, "LoRA scratch floats");
}

void lora_gemm_slices(const ExecContext& ctx, const Tensor& x, const Tensor& y,
                      const LoraSlice* slices, int32_t num_slices, const LoraBatch& lora,
                      const Tensor& scratch) {
  check_device("lora_gemm", ctx, x, y, scratch);
  if (lora.num_runs == 0) return;
  require_rows("lora_gemm", x, "x must be [T, in] float32");
  require_rows("lora_gemm", y, "y must be [T, >= out] float32");
  require(y.size(0) == x.size(0), "lora_gemm", "y must have x's rows", y);
  if (num_slices < 1 || num_slices > kMaxLoraSlices || slices == nullptr) {
    raise<InvalidArgument>("lora_gemm: num_slices must be in [1, ", kMaxLoraSlices, "], got ",
                           num_slices);
  }
  for (int32_t s = 0; s < num_slices; ++s) {
    const LoraSlice& sl = slices[s];
    require(sl.out_offset >= 0 && sl.out >= 0 && sl.out_offset + sl.out <= y.size(1), "lora_gemm",
            "each slice's columns [out_offset, out_offset + out) must lie within y", y);
    require(sl.pair_index >= 0 && sl.pair_index < lora.pairs_per_slot && lora.pairs != nullptr,
            "lora_gemm", "pair_index must index the LoRA table's (layer, module) entries", x);
  }
  require(scratch.dtype() == DType::kFloat32 && scratch.is_contiguous(), "lora_gemm",
          "scratch must be contiguous float32", scratch);
  // The runs index x's rows and the table's slots; the ranks size the scratch.
  int64_t max_need = 0;  // CPU: the largest slice's sum of tokens * rank (slices reuse it)
  int32_t max_rank = 0, max_end = 0;
  int32_t previous_end = 0;
  for (int32_t s = 0; s < num_slices; ++s) {
    int64_t need = 0;
    for (int32_t i = 0; i < lora.num_runs; ++i) {
      const LoraRun& run = lora.runs[i];
      if (run.begin < 0 || run.end > x.size(0) || run.begin > run.end || run.slot < 0 ||
          run.slot >= lora.num_slots) {
        raise<InvalidArgument>("lora_gemm: run ", i, " [", run.begin, ", ", run.end, ") of slot ",
                               run.slot, " is outside the ", x.size(0), " tokens or the ",
                               lora.num_slots, " slot(s)");
      }
      if (s == 0 && run.begin < previous_end) {
        raise<InvalidArgument>("lora_gemm: run ", i, " [", run.begin, ", ", run.end,
                               ") starts before the previous run ends (", previous_end,
                               "): runs must be in token order and disjoint");
      }
      if (s == 0) previous_end = run.end;
      const LoraPair& pair = lora.pairs[run.slot * lora.pairs_per_slot + slices[s].pair_index];
      need += int64_t{run.end - run.begin} * pair.rank;
      if (run.end > run.begin) {
        max_rank = std::max(max_rank, pair.rank);
        max_end = std::max(max_end, run.end);
      }
    }
    max_need = std::max(max_need, need);
  }
  if (max_rank == 0) return;  // no run's adapter adapts these modules
  if (ctx.device.is_cuda()) {
#if LORART_WITH_CUDA
    require(lora.device_runs != nullptr && lora.device_pairs != nullptr, "lora_gemm",
            "a CUDA LoraBatch needs its runs and pairs in device memory (device_runs, "
            "device_pairs)",
            x);
    require(scratch.numel() >= lora_scratch_floats(ctx, max_end, max_rank, x.size(1), num_slices),
            "lora_gemm",
            "scratch is smaller than lora_scratch_floats(last run's end, max rank, in, slices)",
            scratch);
    CudaLoraParams p{};
    p.x = x.data_as<const float>();
    p.x_stride = x.stride(0);
    p.y = y.data_as<float>();
    p.y_stride = y.stride(0);
    p.in = x.size(1);
    p.num_tokens = static_cast<int32_t>(x.size(0));
    p.runs = lora.device_runs;
    p.num_runs = lora.num_runs;
    p.pairs = lora.device_pairs;
    p.slot_stride = lora.pairs_per_slot;
    for (int32_t s = 0; s < num_slices; ++s) p.slices[s] = slices[s];
    p.num_slices = num_slices;
    p.rank_stride = max_rank;
    p.scratch_tokens = max_end;
    p.scratch = scratch.data_as<float>();
    return cuda::lora_gemm(p, ctx.stream);
#endif
  }
  require(scratch.numel() >= max_need, "lora_gemm",
          "scratch is smaller than the runs' tokens * rank", scratch);
  for (int32_t s = 0; s < num_slices; ++s) {
    LoraGemmParams p{};
    p.x = x.data_as<const float>();
    p.x_stride = x.stride(0);
    p.y = y.data_as<float>() + slices[s].out_offset;
    p.y_stride = y.stride(0);
    p.in = x.size(1);
    p.out = slices[s].out;
    p.runs = lora.runs;
    p.num_runs = lora.num_runs;
    p.pairs = lora.pairs + slices[s].pair_index;
    p.slot_stride = lora.pairs_per_slot;
    p.scratch = scratch.data_as<float>();
    cpu::lora_gemm(p);
  }
}

void dora_scales(const ExecContext& ctx, const Tensor& w, WeightLayout w_layout, int64_t row_offset,
                 const Tensor& a, const Tensor& b, const Tensor& magnitude, const Tensor& scales) {
  check_device("dora_scales", ctx, w, a, b, magnitude, scales);
  require(a.dim() == 2 && a.is_contiguous() && is_floating(a.dtype()), "dora_scales",
          "a must be contiguous float [r, K]", a);
  const int64_t rank = a.size(0), k = a.size(1), out = magnitude.numel();
  require(is_floating(w.dtype()) && w.dim() == 2 && w.size(1) == k && w.stride(1) == 1 &&
              row_offset >= 0 && row_offset + out <= w.size(0),
          "dora_scales", "w must be float [N, K] with rows [row_offset, row_offset + out)", w);
  require(w_layout == WeightLayout::kRowMajor || w.dtype() == DType::kBFloat16, "dora_scales",
          "w in the k32-interleaved layout must be bfloat16", w);
  require(b.dim() == 2 && b.is_contiguous() && is_floating(b.dtype()) && b.size(0) == out &&
              b.size(1) == rank,
          "dora_scales", "b must be contiguous float [out, r]", b);
  require(magnitude.is_contiguous() && is_floating(magnitude.dtype()), "dora_scales",
          "magnitude must be contiguous float [out]", magnitude);
  require(scales.is_contiguous() && scales.dtype() == DType::kFloat32 && scales.numel() == out,
          "dora_scales", "scales must be contiguous float32 [out]", scales);
  DoraScalesParams p{};
  p.w = {w.data(), w.dtype(), nullptr, w.stride(0), w_layout};
  p.row_offset = row_offset;
  p.a = {a.data(), a.dtype(), nullptr, k};
  p.b = {b.data(), b.dtype(), nullptr, rank};
  p.magnitude = {magnitude.data(), magnitude.dtype(), nullptr, out};
  p.scales = scales.data_as<float>();
  p.out = out;
  p.k = k;
  p.rank = rank;
  p.threads = ctx.num_threads;
#if LORART_WITH_CUDA
  if (ctx.device.is_cuda()) {
    require(w_layout == WeightLayout::kRowMajor, "dora_scales",
            "w must be row-major on CUDA (the k32-interleaved layout is the CPU's)", w);
    return cuda::dora_scales(p, ctx.stream);
  }
#endif
  cpu::dora_scales(p);
}

void lora_dora_apply(const ExecContext& ctx, const Tensor& y, int64_t out, const Tensor& bias,
                     const LoraBatch& lora, int64_t pair_index) {
  check_device("lora_dora_apply", ctx, y);
  if (lora.num_runs == 0) return;
  require_rows("lora_dora_apply", y, "y must be [T, >= out] float32");
  require(y.size(1) >= out, "lora_dora_apply", "y must have at least `out` columns", y);
  require(pair_index >= 0 && pair_index < lora.pairs_per_slot && lora.pairs != nullptr,
          "lora_dora_apply", "pair_index must index the LoRA table's (layer, module) entries", y);
  WeightRef b{};
  if (bias.defined() && bias.numel() > 0) {
    b = weight_vector("lora_dora_apply", "bias must have `out` float elements", bias, out);
  }
  for (int32_t i = 0; i < lora.num_runs; ++i) {
    const LoraRun& run = lora.runs[i];
    if (run.begin < 0 || run.end > y.size(0) || run.begin > run.end || run.slot < 0 ||
        run.slot >= lora.num_slots) {
      raise<InvalidArgument>("lora_dora_apply: run ", i, " [", run.begin, ", ", run.end,
                             ") of slot ", run.slot, " is outside the ", y.size(0),
                             " tokens or the ", lora.num_slots, " slot(s)");
    }
  }
  DoraApplyParams p{};
  p.y = y.data_as<float>();
  p.y_stride = y.stride(0);
  p.out = out;
  p.bias = b;
  p.runs = lora.runs;
  p.num_runs = lora.num_runs;
  p.pairs = lora.pairs + pair_index;
  p.slot_stride = lora.pairs_per_slot;
#if LORART_WITH_CUDA
  if (ctx.device.is_cuda()) {
    // The kernel reads the step's device copies of the runs and pairs (the host ones are checked
    // above).
    require(lora.device_runs != nullptr && lora.device_pairs != nullptr, "lora_dora_apply",
            "a CUDA LoRA batch needs device_runs and device_pairs", y);
    p.runs = lora.device_runs;
    p.pairs = lora.device_pairs + pair_index;
    return cuda::dora_apply(p, y.size(0), ctx.stream);
  }
#endif
  cpu::dora_apply(p);
}

void read_weight_row(const ExecContext& ctx, const Tensor& w, WeightLayout w_layout, int64_t row,
                     const Tensor& out) {
  check_device("read_weight_row", ctx, w, out);
  require(is_floating(w.dtype()) && w.dim() == 2 && w.stride(1) == 1 && row >= 0 && row < w.size(0),
          "read_weight_row", "w must be float [N, K] and row in [0, N)", w);
  require(w_layout == WeightLayout::kRowMajor || w.dtype() == DType::kBFloat16, "read_weight_row",
          "w in the k32-interleaved layout must be bfloat16", w);
  require(out.is_contiguous() && out.dtype() == DType::kFloat32 && out.numel() == w.size(1),
          "read_weight_row", "out must be contiguous float32 [K]", out);
  const WeightRef ref{w.data(), w.dtype(), nullptr, w.stride(0), w_layout};
#if LORART_WITH_CUDA
  if (ctx.device.is_cuda()) {
    require(w_layout == WeightLayout::kRowMajor, "read_weight_row",
            "w must be row-major on CUDA (the k32-interleaved layout is the CPU's)", w);
    return cuda::read_weight_row(ref, row, w.size(1), out.data_as<float>(), ctx.stream);
  }
#endif
  cpu::read_weight_row(ref, row, w.size(1), out.data_as<float>());
}

void sample(const ExecContext& ctx, const Tensor& logits, const Tensor& rows,
            const SamplingParams* params, uint64_t* rng_states, const Tensor& tokens,
            const Tensor& log_probs, std::pair<float, int32_t>* scratch,
            const SampleDeviceArgs& device) {
  check_device("sample", ctx, logits, rows, tokens);
  if (log_probs.defined() && log_probs.numel() > 0) check_device("sample", ctx, log_probs);
  require(logits.is_contiguous() && logits.dim() == 2 && logits.dtype() == DType::kFloat32,
          "sample", "logits must be contiguous float32 [N, V]", logits);
  require_int32("sample", rows, 1, "rows must be [R] int32");
  require_int32("sample", tokens, 1, "tokens must be [R] int32");
  require(tokens.size(0) == rows.size(0), "sample", "tokens must have one entry per row", tokens);
  require(!log_probs.defined() || log_probs.numel() == 0 ||
              (log_probs.dtype() == DType::kFloat32 && log_probs.numel() == rows.size(0)),
          "sample", "log_probs must be float32 [R] or undefined", log_probs);
  require(logits.size(1) > 0, "sample", "logits must have a vocabulary", logits);
  require_indices("sample", "rows", rows, logits.size(0));
  const int32_t* r = rows.data_as<const int32_t>();
  for (int64_t i = 0; i < rows.size(0); ++i) {
    const SamplingParams& sp = params[i];
    if (!(sp.temperature >= 0.0f) || sp.top_k < 0 || !(sp.top_p > 0.0f && sp.top_p <= 1.0f)) {
      raise<InvalidArgument>("sample: params[", i, "] needs temperature >= 0, top_k >= 0 and ",
                             "top_p in (0, 1]; got ", sp.temperature, ", ", sp.top_k, ", ",
                             sp.top_p);
    }
  }
  SampleParams p{};
  p.logits = logits.data_as<const float>();
  p.vocab = logits.size(1);
  p.rows = r;
  p.params = params;
  p.rng_states = rng_states;
  p.tokens = tokens.data_as<int32_t>();
  p.log_probs = log_probs.numel() > 0 ? log_probs.data_as<float>() : nullptr;
  p.num_samples = static_cast<int32_t>(rows.size(0));
#if LORART_WITH_CUDA
  if (ctx.device.is_cuda()) {
    if (p.num_samples > 0 && (device.params == nullptr || device.rng_states == nullptr)) {
      raise<InvalidArgument>("sample: a CUDA context needs the device copies of params and ",
                             "rng_states (SampleDeviceArgs)");
    }
    p.params = device.params;
    p.rng_states = device.rng_states;
    p.workspace = device.workspace;
    p.workspace_bytes = device.workspace_bytes;
    return cuda::sample(p, ctx.stream);
  }
#endif
  (void)device;  // read by the CUDA path only
  cpu::sample(p, scratch);
}

int64_t sample_workspace_bytes(const ExecContext& ctx, int64_t num_samples, int64_t vocab) {
#if LORART_WITH_CUDA
  if (ctx.device.is_cuda()) return cuda::sample_workspace_bytes(num_samples, vocab);
#endif
  (void)ctx, (void)num_samples, (void)vocab;
  return 0;
}

void set_cpu_threads(int threads) { cpu::set_num_threads(threads); }

int cpu_threads() { return cpu::num_threads(); }

}  // namespace lorart::ops

// lorart._core.ops: the kernel ops (kernels/ops.h) over caller-owned arrays, for tests and
// benchmarks only (the runtime never goes through it). Inputs are numpy arrays or DLPack tensors
// (torch, CPU or CUDA) viewed without a copy; outputs must be viewable in place (contiguous,
// writable), else the call is refused rather than writing into a copy nobody sees. Each call runs
// on the device of its first tensor, on `stream` (a cudaStream_t as an int, 0 = the legacy
// default stream torch also uses unless told otherwise), and returns without synchronizing, like a
// torch op; results are ordered on that stream. What a CUDA op needs beyond its tensors (sample's
// device copies of params and RNG states, attention's bounds and split-KV workspace) the binding
// makes on the tensors' device when the caller does not pass it; such a call synchronizes.
#include <pybind11/stl.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "bindings/array_interop.h"
#include "bindings/bindings.h"
#include "core/buffer.h"
#include "core/errors.h"
#include "core/stream.h"
#include "executor/executor_config.h"
#include "kernels/ops.h"

namespace lorart::bindings {

namespace {

// An input array: a view of the caller's memory (or of a converted copy: inputs may be copied).
BorrowedTensor in(py::handle obj, const char* field, DType list_dtype = DType::kFloat32) {
  return borrow_array(obj, field, list_dtype);
}

// An output array: the op writes into it, so it must be the caller's own memory (not a copy).
BorrowedTensor out_arg(py::handle obj, const char* field) {
  if (py::isinstance<py::array>(obj)) {
    auto arr = py::reinterpret_borrow<py::array>(obj);
    if (!arr.writeable()) raise<InvalidArgument>(field, " is a read-only array");
  }
  BorrowedTensor b = borrow_array(obj, field, DType::kFloat32);
  const void* mine = nullptr;
  if (py::isinstance<py::array>(obj)) {
    mine = py::reinterpret_borrow<py::array>(obj).data();
  } else if (py::hasattr(obj, "data_ptr")) {
    mine = reinterpret_cast<const void*>(obj.attr("data_ptr")().cast<uintptr_t>());
  }
  if (mine != nullptr && mine != b.tensor.data() && b.tensor.numel() > 0) {
    raise<InvalidArgument>(field,
                           " must be a contiguous, aligned, native-endian array the op can "
                           "write in place (this one would be copied)");
  }
  return b;
}

ExecContext context_of(const Tensor& first, uintptr_t stream, Precision precision) {
  ExecContext ctx = ExecContext::cpu(0, precision);
  ctx.device = first.device();
  ctx.stream = reinterpret_cast<void*>(stream);
  return ctx;
}

// One adapter slot of a LoraTable: its pair's arrays and what keeps them alive.
struct SlotArrays {
  BorrowedTensor a, b_t;
};

// The runs and per-slot pairs of one LoRA module, on the host and (for a CUDA table) on the
// device, built once so that timing a lora_gemm call times the op and not the table's upload.
class LoraTable {
 public:
  LoraTable(const std::vector<std::tuple<int32_t, int32_t, int32_t>>& runs,
            const std::vector<std::optional<std::pair<py::object, py::object>>>& slots,
            int64_t in_features, int64_t out_features)
      : in_features_(in_features) {
    if (slots.empty()) raise<InvalidArgument>("slots must hold at least one slot");
    for (const auto& [begin, end, slot] : runs) runs_.push_back({begin, end, slot});
    bool have_device = false;
    for (size_t s = 0; s < slots.size(); ++s) {
      LoraPair pair{};
      if (slots[s].has_value()) {
        const std::string fa = "slots[" + std::to_string(s) + "].a";
        const std::string fb = "slots[" + std::to_string(s) + "].b_t";
        SlotArrays arrays{in(slots[s]->first, fa.c_str()), in(slots[s]->second, fb.c_str())};
        const Tensor& a = arrays.a.tensor;
        const Tensor& b = arrays.b_t.tensor;
        if (a.dim() != 2 || a.size(1) != in_features || !is_floating(a.dtype())) {
          raise<InvalidArgument>(fa, " must be float [rank, ", in_features, "], got ",
                                 a.describe());
        }
        if (b.dim() != 2 || b.size(0) != a.size(0) || b.size(1) != out_features ||
            b.dtype() != a.dtype() || b.device() != a.device()) {
          raise<InvalidArgument>(fb, " must be [", a.size(0), ", ", out_features, "] of ", fa,
                                 "'s dtype and device, got ", b.describe());
        }
        if (have_device && a.device() != device_) {
          raise<InvalidArgument>(fa, " is on ", a.device().str(), "; the other slots are on ",
                                 device_.str());
        }
        have_device = true;
        device_ = a.device();
        pair.a = a.data();
        pair.b_t = b.data();
        pair.dtype = a.dtype();
        pair.rank = static_cast<int32_t>(a.size(0));
        keep_.push_back(std::move(arrays));
      }
      pairs_.push_back(pair);
    }
    if (device_.is_cuda()) {
      // The kernels read these two arrays from device memory (LoraBatch::device_runs/pairs).
      if (!runs_.empty()) {
        device_runs_ = std::make_shared<Buffer>(
            Buffer::allocate(runs_.size() * sizeof(LoraRun), device_, "LoraTable runs"));
        device_runs_->copy_from(runs_.data(), Device::cpu(), runs_.size() * sizeof(LoraRun));
      }
      device_pairs_ = std::make_shared<Buffer>(
          Buffer::allocate(pairs_.size() * sizeof(LoraPair), device_, "LoraTable pairs"));
      device_pairs_->copy_from(pairs_.data(), Device::cpu(), pairs_.size() * sizeof(LoraPair));
    }
  }

  ops::LoraBatch batch() const {
    ops::LoraBatch b;
    b.runs = runs_.data();
    b.num_runs = static_cast<int32_t>(runs_.size());
    b.pairs = pairs_.data();
    b.num_slots = static_cast<int32_t>(pairs_.size());
    b.pairs_per_slot = 1;
    if (device_runs_) b.device_runs = static_cast<const LoraRun*>(device_runs_->data());
    if (device_pairs_) b.device_pairs = static_cast<const LoraPair*>(device_pairs_->data());
    return b;
  }
  // Floats of scratch the op needs on the table's device (ops::lora_scratch_floats) for the
  // tokens the runs reach and the largest rank they use.
  int64_t scratch_floats() const {
    int64_t tokens = 0, rank = 0;
    for (const LoraRun& r : runs_) {
      if (r.slot >= 0 && r.slot < static_cast<int32_t>(pairs_.size()) && r.end > r.begin) {
        tokens = std::max<int64_t>(tokens, r.end);
        rank = std::max<int64_t>(rank, pairs_[r.slot].rank);
      }
    }
    return ops::lora_scratch_floats(ExecContext{device_}, tokens, rank, in_features_, 1);
  }
  Device device() const { return device_; }
  int num_runs() const { return static_cast<int>(runs_.size()); }
  int num_slots() const { return static_cast<int>(pairs_.size()); }

 private:
  std::vector<LoraRun> runs_;
  std::vector<LoraPair> pairs_;
  std::vector<SlotArrays> keep_;
  int64_t in_features_;
  Device device_ = Device::cpu();
  std::shared_ptr<Buffer> device_runs_, device_pairs_;
};

// The step's host-known bounds (longest query chunk, longest context plus chunk) read from the
// arrays, copied to the host first when they are device memory. Checks only what the bounds need;
// the op checks the rest (on the CPU).
std::pair<int32_t, int32_t> attention_bounds(const Tensor& seq_starts, const Tensor& context_lens) {
  if (seq_starts.dim() != 1 || context_lens.dim() != 1 || seq_starts.dtype() != DType::kInt32 ||
      context_lens.dtype() != DType::kInt32 || seq_starts.size(0) != context_lens.size(0) + 1) {
    raise<InvalidArgument>(
        "paged_attention: seq_starts must be [S + 1] int32 and context_lens [S] "
        "int32, got ",
        seq_starts.describe(), " and ", context_lens.describe());
  }
  const int64_t n = context_lens.size(0);
  std::vector<int32_t> starts(static_cast<size_t>(n + 1)), lens(static_cast<size_t>(n));
  copy_bytes(starts.data(), Device::cpu(), seq_starts.data(), seq_starts.device(),
             starts.size() * sizeof(int32_t));
  copy_bytes(lens.data(), Device::cpu(), context_lens.data(), context_lens.device(),
             lens.size() * sizeof(int32_t));
  int64_t max_q = 0, max_kv = 0;
  for (int64_t s = 0; s < n; ++s) {
    const int64_t q = int64_t{starts[s + 1]} - starts[s];
    max_q = std::max(max_q, q);
    max_kv = std::max(max_kv, q + lens[s]);
  }
  if (max_kv > INT32_MAX) {
    raise<InvalidArgument>("paged_attention: a sequence's context plus chunk (", max_kv,
                           ") exceeds int32");
  }
  return {static_cast<int32_t>(max_q), static_cast<int32_t>(max_kv)};
}

}  // namespace

void bind_ops(py::module_& parent) {
  py::module_ m = parent.def_submodule(
      "ops",
      "The kernel ops over numpy arrays or DLPack tensors (CPU or CUDA), for tests and "
      "benchmarks. Outputs are written in place; calls on CUDA return without synchronizing, "
      "except sample and a paged_attention given no workspace (their docstrings say why).");

  m.def(
      "linear",
      [](py::handle x, py::handle w, py::handle y, float beta, const std::string& precision,
         uintptr_t stream) {
        auto bx = in(x, "x"), bw = in(w, "w");
        auto by = out_arg(y, "y");
        const Precision p = precision_from_name(precision);
        ops::linear(context_of(bx.tensor, stream, p), bx.tensor, bw.tensor, by.tensor, beta);
      },
      py::arg("x"), py::arg("w"), py::arg("y"), py::arg("beta") = 0.0f,
      py::arg("precision") = "float32", py::arg("stream") = 0,
      "y [M, N] = x [M, K] float32 @ w [N, K]^T + beta * y, at `precision` (float32 or "
      "bfloat16).");

  m.def(
      "embedding",
      [](py::handle table, py::handle ids, py::handle out, uintptr_t stream) {
        auto bt = in(table, "table"), bi = in(ids, "ids", DType::kInt32);
        auto bo = out_arg(out, "out");
        ops::embedding(context_of(bt.tensor, stream, Precision::kFloat32), bt.tensor, bi.tensor,
                       bo.tensor);
      },
      py::arg("table"), py::arg("ids"), py::arg("out"), py::arg("stream") = 0,
      "out [T, H] float32 = table [V, H] rows ids [T] (int32).");

  m.def(
      "rms_norm",
      [](py::handle x, py::handle weight, float eps, py::handle out, uintptr_t stream) {
        auto bx = in(x, "x"), bw = in(weight, "weight");
        auto bo = out_arg(out, "out");
        ops::rms_norm(context_of(bx.tensor, stream, Precision::kFloat32), bx.tensor, bw.tensor, eps,
                      bo.tensor);
      },
      py::arg("x"), py::arg("weight"), py::arg("eps"), py::arg("out"), py::arg("stream") = 0,
      "out [T, H] = RMSNorm(x [T, H] float32) * weight [H].");

  m.def(
      "rope",
      [](py::handle x, int32_t head_dim, py::handle positions, py::handle inv_freq,
         uintptr_t stream) {
        auto bx = out_arg(x, "x");
        auto bp = in(positions, "positions", DType::kInt32), bf = in(inv_freq, "inv_freq");
        ops::rope(context_of(bx.tensor, stream, Precision::kFloat32), bx.tensor, head_dim,
                  bp.tensor, bf.tensor);
      },
      py::arg("x"), py::arg("head_dim"), py::arg("positions"), py::arg("inv_freq"),
      py::arg("stream") = 0,
      "In place: rotary embedding (rotate-half) of x [T, heads * head_dim] float32 at "
      "positions [T] (int32) with inv_freq [head_dim / 2] float32.");

  m.def(
      "silu_mul",
      [](py::handle gate_up, py::handle out, uintptr_t stream) {
        auto bg = in(gate_up, "gate_up");
        auto bo = out_arg(out, "out");
        ops::silu_mul(context_of(bg.tensor, stream, Precision::kFloat32), bg.tensor, bo.tensor);
      },
      py::arg("gate_up"), py::arg("out"), py::arg("stream") = 0,
      "out [T, I] = silu(gate_up[:, :I]) * gate_up[:, I:] (float32).");

  m.def(
      "paged_attention",
      [](py::handle q, py::handle k, py::handle v, py::handle k_cache, py::handle v_cache,
         py::handle seq_starts, py::handle context_lens, py::handle block_tables, int32_t num_heads,
         int32_t num_kv_heads, int32_t head_dim, float scale, py::handle out,
         int32_t sliding_window, int32_t max_query_len, int32_t max_kv_len, py::object workspace,
         uintptr_t stream) {
        auto bq = in(q, "q"), bk = in(k, "k"), bv = in(v, "v");
        auto bkc = out_arg(k_cache, "k_cache"), bvc = out_arg(v_cache, "v_cache");
        auto bs = in(seq_starts, "seq_starts", DType::kInt32);
        auto bc = in(context_lens, "context_lens", DType::kInt32);
        auto bb = in(block_tables, "block_tables", DType::kInt32);
        auto bo = out_arg(out, "out");
        const ExecContext ctx = context_of(bq.tensor, stream, Precision::kFloat32);
        ops::AttentionBatch batch{bs.tensor, bc.tensor, bb.tensor, max_query_len, max_kv_len};
        const ops::AttentionShape shape{num_heads, num_kv_heads, head_dim, sliding_window, scale};
        BorrowedTensor bw{Tensor(), nullptr};
        Buffer scratch;  // the call's own workspace when the caller passed none
        if (ctx.device.is_cuda()) {
          if (max_query_len <= 0 || max_kv_len <= 0) {
            const auto [mq, mkv] = attention_bounds(bs.tensor, bc.tensor);
            if (max_query_len <= 0) batch.max_query_len = mq;
            if (max_kv_len <= 0) batch.max_kv_len = mkv;
          }
          if (!workspace.is_none()) {
            bw = out_arg(workspace, "workspace");
            batch.workspace = bw.tensor;
          } else if (bc.tensor.dim() == 1) {
            const size_t need = ops::paged_attention_workspace_bytes(ctx, bc.tensor.size(0),
                                                                     batch.max_kv_len, shape);
            if (need > 0) {
              const int64_t words = static_cast<int64_t>((need + 3) / 4);
              scratch = Buffer::allocate(static_cast<size_t>(words) * 4, ctx.device,
                                         "paged_attention workspace");
              batch.workspace = scratch.view(DType::kInt32, {words});
            }
          }
        } else if (!workspace.is_none()) {
          bw = out_arg(workspace, "workspace");  // unused on the CPU, but still checked
          batch.workspace = bw.tensor;
        }
        ops::paged_attention(ctx, bq.tensor, bk.tensor, bv.tensor, bkc.tensor, bvc.tensor, batch,
                             shape, bo.tensor);
        // The call's own workspace is freed on return: the kernels reading it must be done.
        if (scratch.data() != nullptr) synchronize_stream(ctx.device, ctx.stream);
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("k_cache"), py::arg("v_cache"),
      py::arg("seq_starts"), py::arg("context_lens"), py::arg("block_tables"), py::arg("num_heads"),
      py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("scale"), py::arg("out"),
      py::arg("sliding_window") = 0, py::arg("max_query_len") = 0, py::arg("max_kv_len") = 0,
      py::arg("workspace") = py::none(), py::arg("stream") = 0,
      "Writes the chunk's k, v [T, kv_heads * head_dim] into k_cache / v_cache [blocks, "
      "block_size, kv_heads, head_dim] (float32, float16 or bfloat16), then out [T, heads * "
      "head_dim] = causal attention of q over the cache. seq_starts [S + 1], context_lens [S], "
      "block_tables [S, W] are int32 on the tensors' device. On CUDA, max_query_len / "
      "max_kv_len are the step's bounds (0 = found by copying seq_starts and context_lens to "
      "the host) and workspace is device memory of paged_attention_workspace_bytes bytes (None "
      "= allocated for the call, which then synchronizes `stream`); pass both when timing.");

  m.def(
      "paged_attention_workspace_bytes",
      [](const std::string& device, int64_t max_seqs, int64_t max_kv_len, int32_t num_heads,
         int32_t num_kv_heads, int32_t head_dim) {
        ExecContext ctx = ExecContext::cpu(0, Precision::kFloat32);
        ctx.device = parse_device(device, "device");
        const ops::AttentionShape shape{num_heads, num_kv_heads, head_dim, 0, 1.0f};
        return ops::paged_attention_workspace_bytes(ctx, max_seqs, max_kv_len, shape);
      },
      py::arg("device"), py::arg("max_seqs"), py::arg("max_kv_len"), py::arg("num_heads"),
      py::arg("num_kv_heads"), py::arg("head_dim"),
      "Bytes of paged_attention's workspace on `device` ('cpu', 'cuda', 'cuda:N') for steps of "
      "at most max_seqs sequences of at most max_kv_len keys (context plus chunk); 0 on the "
      "CPU.");

  m.def(
      "synchronize",
      [](const std::string& device, uintptr_t stream) {
        const Device d = parse_device(device, "device");
        require_device(d);  // a CPU build or a missing GPU says so rather than returning
        py::gil_scoped_release release;
        synchronize_stream(d, reinterpret_cast<void*>(stream));
      },
      py::arg("device") = "cuda", py::arg("stream") = 0,
      "Waits for everything queued on `stream` (0 = the legacy default stream) of `device`; a "
      "no-op for 'cpu'. Raises DeviceError for a fault of a kernel queued there, or when the "
      "build or machine has no such device.");

  py::class_<LoraTable>(
      m, "LoraTable",
      "The runs and per-slot (a, b_t) pairs of one LoRA module for lora_gemm, built once (on "
      "CUDA, uploaded once). runs: (begin, end, slot) token runs; slots: per slot (a [rank, "
      "in], b_t [rank, out]) of one float dtype and device, or None for a slot without the "
      "module. The table keeps the arrays alive.")
      .def(py::init<const std::vector<std::tuple<int32_t, int32_t, int32_t>>&,
                    const std::vector<std::optional<std::pair<py::object, py::object>>>&, int64_t,
                    int64_t>(),
           py::arg("runs"), py::arg("slots"), py::arg("in_features"), py::arg("out_features"))
      .def_property_readonly("scratch_floats", &LoraTable::scratch_floats,
                             "Floats of scratch lora_gemm needs for these runs.")
      .def_property_readonly("device", [](const LoraTable& t) { return t.device().str(); })
      .def_property_readonly("num_runs", &LoraTable::num_runs)
      .def_property_readonly("num_slots", &LoraTable::num_slots);

  m.def(
      "lora_gemm",
      [](py::handle x, py::handle y, int64_t out_features, const LoraTable& table,
         py::handle scratch, uintptr_t stream) {
        auto bx = in(x, "x");
        auto by = out_arg(y, "y");
        auto bs = out_arg(scratch, "scratch");
        ops::lora_gemm(context_of(bx.tensor, stream, Precision::kFloat32), bx.tensor, by.tensor,
                       out_features, table.batch(), 0, bs.tensor);
      },
      py::arg("x"), py::arg("y"), py::arg("out_features"), py::arg("table"), py::arg("scratch"),
      py::arg("stream") = 0,
      "y[:, :out_features] += x @ a^T @ b_t per run of `table`, with x [T, in] and y [T, >= "
      "out] float32 and scratch float32 of at least table.scratch_floats elements.");

  m.def(
      "sample",
      [](py::handle logits, py::handle rows,
         const std::vector<std::tuple<int32_t, float, float, int64_t>>& params,
         std::vector<uint64_t> rng_states, py::handle tokens, py::object log_probs,
         uintptr_t stream) {
        auto bl = in(logits, "logits"), br = in(rows, "rows", DType::kInt32);
        auto bt = out_arg(tokens, "tokens");
        BorrowedTensor bp{Tensor(), nullptr};
        if (!log_probs.is_none()) bp = out_arg(log_probs, "log_probs");
        if (params.size() != static_cast<size_t>(br.tensor.numel()) ||
            rng_states.size() != params.size()) {
          raise<InvalidArgument>("sample: params (", params.size(), ") and rng_states (",
                                 rng_states.size(), ") need one entry per row (", br.tensor.numel(),
                                 ")");
        }
        std::vector<SamplingParams> sp;
        for (const auto& [top_k, top_p, temperature, vocab] : params) {
          sp.push_back({top_k, top_p, temperature, vocab});
        }
        const int64_t vocab = bl.tensor.dim() == 2 ? bl.tensor.size(1) : 0;
        const ExecContext ctx = context_of(bl.tensor, stream, Precision::kFloat32);
        if (!ctx.device.is_cuda()) {
          std::vector<std::pair<float, int32_t>> scratch(static_cast<size_t>(vocab));
          ops::sample(ctx, bl.tensor, br.tensor, sp.data(), rng_states.data(), bt.tensor, bp.tensor,
                      scratch.data());
          return rng_states;
        }
        // CUDA: the kernel reads device copies of params and RNG states and device scratch, made
        // for this call; the advanced states come back once the stream is done.
        ops::SampleDeviceArgs dev;
        Buffer d_params, d_states, d_work;
        if (!sp.empty()) {
          d_params =
              Buffer::allocate(sp.size() * sizeof(SamplingParams), ctx.device, "sample params");
          d_params.copy_from(sp.data(), Device::cpu(), sp.size() * sizeof(SamplingParams));
          d_states = Buffer::allocate(rng_states.size() * sizeof(uint64_t), ctx.device,
                                      "sample rng_states");
          d_states.copy_from(rng_states.data(), Device::cpu(),
                             rng_states.size() * sizeof(uint64_t));
          dev.params = static_cast<const SamplingParams*>(d_params.data());
          dev.rng_states = static_cast<uint64_t*>(d_states.data());
        }
        const int64_t work =
            ops::sample_workspace_bytes(ctx, static_cast<int64_t>(sp.size()), vocab);
        if (work > 0) {
          d_work = Buffer::allocate(static_cast<size_t>(work), ctx.device, "sample workspace");
          dev.workspace = d_work.data();
          dev.workspace_bytes = work;
        }
        ops::sample(ctx, bl.tensor, br.tensor, sp.data(), nullptr, bt.tensor, bp.tensor, nullptr,
                    dev);
        synchronize_stream(ctx.device, ctx.stream);
        if (!sp.empty()) {
          copy_bytes(rng_states.data(), Device::cpu(), d_states.data(), ctx.device,
                     rng_states.size() * sizeof(uint64_t));
        }
        return rng_states;
      },
      py::arg("logits"), py::arg("rows"), py::arg("params"), py::arg("rng_states"),
      py::arg("tokens"), py::arg("log_probs") = py::none(), py::arg("stream") = 0,
      "tokens [R] int32 = a token drawn from logits [N, V] float32 row rows[i] with params[i] "
      "= (top_k, top_p, temperature, vocab) and rng_states[i]; log_probs [R] float32 (or None) "
      "receives log p(token). params and rng_states are host lists; returns the advanced RNG "
      "states. On CUDA the call uploads params and states, allocates the kernel's workspace and "
      "synchronizes `stream` before returning.");
}

}  // namespace lorart::bindings

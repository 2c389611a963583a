"""Each kernel op on device="cuda" against the CPU op on the same inputs, through lorart._core.ops
(the CPU kernels are the reference), and one end-to-end greedy generation on both devices. Every
output is poisoned (NaN, or -7 for tokens) before the call. Skipped, saying why, on a build without
the CUDA backend, on a machine without a GPU, or with a torch that has no CUDA (torch tensors
carry the device arrays). An op whose CUDA kernel has not landed yet ("no CUDA kernel in this
build yet") is skipped by name; any other error fails."""

from __future__ import annotations

import math

import numpy as np
import pytest

import lorart
from lorart._core import ops

torch = pytest.importorskip("torch")

INFO = lorart.build_info()
if not INFO["cuda"]:
    pytest.skip(
        "lorart was built without the CUDA backend (LORART_CUDA=OFF)", allow_module_level=True
    )
if INFO["cuda_device_count"] == 0:
    pytest.skip("lorart sees no CUDA device on this machine", allow_module_level=True)
if not torch.cuda.is_available():
    pytest.skip("this torch has no CUDA (it holds the device arrays)", allow_module_level=True)

CUDA = torch.device("cuda")


def on_cuda(call, *args, **kwargs):
    """call(*args) on device tensors, synchronized (an asynchronous fault surfaces here)."""
    result = call(*args, **kwargs)
    torch.cuda.synchronize()
    return result


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().cpu().double(), want.detach().cpu().double()
    assert torch.isfinite(got).all(), "non-finite (unwritten) outputs"
    return float((got - want).norm() / max(float(want.norm()), 1e-30))


def randn(*shape, seed: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def nan_like(t: torch.Tensor, device=None) -> torch.Tensor:
    return torch.full(t.shape, float("nan"), dtype=torch.float32, device=device or t.device)


# ------------------------------------------------------------------------------ dense ops


@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
@pytest.mark.parametrize(("m", "n", "k"), [(1, 256, 512), (7, 100, 72), (130, 264, 257)])
def test_linear_matches_cpu(wdtype, precision, m, n, k):
    x, w = randn(m, k, seed=m + n), randn(n, k, seed=k, dtype=wdtype)
    y0 = randn(m, n, seed=3)
    for beta in (0.0, 0.5):
        y_cpu = y0.clone() if beta else nan_like(y0)
        ops.linear(x, w, y_cpu, beta, precision)
        y_gpu = y0.to(CUDA) if beta else nan_like(y0, CUDA)
        on_cuda(ops.linear, x.to(CUDA), w.to(CUDA), y_gpu, beta, precision)
        # Same operands (x rounded alike at bfloat16 precision); only the sums' order differs.
        assert rel_err(y_gpu, y_cpu) < (1e-5 if precision == "float32" else 1e-2)


def test_rms_norm_matches_cpu():
    x, w = randn(9, 4096, seed=1), randn(4096, seed=2)
    out_cpu = nan_like(x)
    ops.rms_norm(x, w, 1e-5, out_cpu)
    out_gpu = nan_like(x, CUDA)
    on_cuda(ops.rms_norm, x.to(CUDA), w.to(CUDA), 1e-5, out_gpu)
    assert rel_err(out_gpu, out_cpu) < 1e-6


def test_rope_matches_cpu():
    heads, hd, t = 4, 128, 6
    x = randn(t, heads * hd, seed=4)
    pos = torch.tensor([0, 1, 2, 100, 4000, 7], dtype=torch.int32)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    x_cpu, x_gpu = x.clone(), x.to(CUDA)
    ops.rope(x_cpu, hd, pos, inv_freq)
    on_cuda(ops.rope, x_gpu, hd, pos.to(CUDA), inv_freq.to(CUDA))
    assert rel_err(x_gpu, x_cpu) < 1e-5


def test_silu_mul_matches_cpu():
    gu = randn(5, 2 * 11008, seed=5)
    out_cpu = torch.full((5, 11008), float("nan"))
    ops.silu_mul(gu, out_cpu)
    out_gpu = out_cpu.to(CUDA)
    on_cuda(ops.silu_mul, gu.to(CUDA), out_gpu)
    assert rel_err(out_gpu, out_cpu) < 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_embedding_matches_cpu(dtype):
    table = randn(1000, 256, seed=6, dtype=dtype)
    ids = torch.tensor([0, 999, 5, 5, 321], dtype=torch.int32)
    out_cpu = torch.full((5, 256), float("nan"))
    ops.embedding(table, ids, out_cpu)
    out_gpu = out_cpu.to(CUDA)
    on_cuda(ops.embedding, table.to(CUDA), ids.to(CUDA), out_gpu)
    assert torch.equal(out_gpu.cpu(), out_cpu)  # a copy with an exact widening


# ------------------------------------------------------------------------------ attention


def attention_step(seqs, heads, kv_heads, hd, block_size, dtype, seed):
    """A random step: per sequence (cached tokens, chunk length); the context is already in the
    (random) caches, behind shuffled block ids. Returns the op's arguments as CPU tensors."""
    g = torch.Generator().manual_seed(seed)
    width = max(math.ceil((c + n) / block_size) for c, n in seqs)
    num_blocks = width * len(seqs) + 3
    pool = torch.randperm(num_blocks, generator=g).tolist()
    tables, starts, lens = [], [0], []
    for c, n in seqs:
        row = [pool.pop() if b * block_size < c + n else -1 for b in range(width)]
        tables.append(row)
        starts.append(starts[-1] + n)
        lens.append(c)
    t = starts[-1]
    shape = (num_blocks, block_size, kv_heads, hd)
    return {
        "q": torch.randn(t, heads * hd, generator=g),
        "k": torch.randn(t, kv_heads * hd, generator=g),
        "v": torch.randn(t, kv_heads * hd, generator=g),
        "k_cache": torch.randn(*shape, generator=g).to(dtype),
        "v_cache": torch.randn(*shape, generator=g).to(dtype),
        "seq_starts": torch.tensor(starts, dtype=torch.int32),
        "context_lens": torch.tensor(lens, dtype=torch.int32),
        "block_tables": torch.tensor(tables, dtype=torch.int32),
    }


ATTENTION_CASES = {
    "decode-gqa": ([(c, 1) for c in (1, 17, 300, 1100, 4100)], 32, 8),
    "decode-mha": ([(c, 1) for c in (0, 64, 2049)], 8, 8),
    "prefill": ([(0, 37), (0, 130)], 16, 4),
    "mixed": ([(0, 50), (200, 1), (33, 20), (1500, 1)], 32, 8),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", sorted(ATTENTION_CASES))
@pytest.mark.parametrize("explicit", [False, True], ids=["derived-bounds", "given-workspace"])
def test_paged_attention_matches_cpu(dtype, case, explicit):
    seqs, heads, kv_heads = ATTENTION_CASES[case]
    hd, block_size = 128, 16
    step = attention_step(seqs, heads, kv_heads, hd, block_size, dtype, seed=len(case))
    args = {"num_heads": heads, "num_kv_heads": kv_heads, "head_dim": hd, "scale": hd**-0.5}
    cpu = {k: v.clone() for k, v in step.items()}
    out_cpu = nan_like(cpu["q"])
    ops.paged_attention(**cpu, out=out_cpu, **args)
    gpu = {k: v.to(CUDA) for k, v in step.items()}
    out_gpu = nan_like(cpu["q"], CUDA)
    extra = {}
    if explicit:  # what a benchmark passes: the bounds and a workspace of its own
        max_q = max(n for _, n in seqs)
        max_kv = max(c + n for c, n in seqs)
        nbytes = ops.paged_attention_workspace_bytes("cuda", len(seqs), max_kv, heads, kv_heads, hd)
        extra = {
            "max_query_len": max_q,
            "max_kv_len": max_kv,
            "workspace": torch.empty(max(1, -(-nbytes // 4)), dtype=torch.int32, device=CUDA),
        }
    on_cuda(ops.paged_attention, **gpu, out=out_gpu, **args, **extra)
    # The chunk's K / V are rounded to the cache dtype alike (nearest even) on both devices.
    assert torch.equal(gpu["k_cache"].cpu().view(torch.int16), cpu["k_cache"].view(torch.int16))
    assert torch.equal(gpu["v_cache"].cpu().view(torch.int16), cpu["v_cache"].view(torch.int16))
    # Decode runs in float32 over the widened cache; a prefill chunk with a 16-bit cache runs on
    # tensor cores with q and the probabilities rounded to the cache dtype (unit roundoff u:
    # 2^-8 for bfloat16, 2^-11 for float16), so its bound is a few u.
    prefill = any(n > 1 for _, n in seqs)
    tol = (4e-3 if dtype == torch.bfloat16 else 5e-4) * 4 if prefill else 1e-4
    assert rel_err(out_gpu, out_cpu) < tol


def test_paged_attention_workspace_bytes():
    assert ops.paged_attention_workspace_bytes("cpu", 64, 8192, 32, 8, 128) == 0
    assert ops.paged_attention_workspace_bytes("cuda", 64, 8192, 32, 8, 128) > 0
    assert ops.paged_attention_workspace_bytes("cuda", 64, 1, 32, 8, 128) == 0  # one split


# ------------------------------------------------------------------------------ LoRA


def lora_table(ranks, in_f, out_f, tokens_per_run, device, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    slots = [
        (
            (torch.randn(r, in_f, generator=g) * 0.1).to(dtype).to(device),
            (torch.randn(r, out_f, generator=g) * 0.1).to(dtype).to(device),
        )
        for r in ranks
    ]
    runs, t = [], 0
    for i, n in enumerate(tokens_per_run):
        runs.append((t, t + n, i % len(ranks)))
        t += n
    return ops.LoraTable(runs, slots, in_f, out_f), t


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", ["decode", "prefill"])
def test_lora_gemm_mixed_ranks_matches_cpu(dtype, shape):
    ranks = [8, 16, 64, 32, 8, 64]
    runs = [1] * 12 if shape == "decode" else [70, 3, 129]
    in_f, out_f = 4096, 1024
    t_cpu, t = lora_table(ranks, in_f, out_f, runs, "cpu", seed=7, dtype=dtype)
    t_gpu, _ = lora_table(ranks, in_f, out_f, runs, CUDA, seed=7, dtype=dtype)
    assert t_gpu.device == "cuda:0"
    # CUDA keeps the split-K partials: one set per 256-column chunk of the input.
    assert t_gpu.scratch_floats == t_cpu.scratch_floats * -(-in_f // 256)
    x, y0 = randn(t, in_f, seed=8), randn(t, out_f, seed=9)
    y_cpu = y0.clone()
    ops.lora_gemm(x, y_cpu, out_f, t_cpu, torch.empty(t_cpu.scratch_floats))
    y_gpu = y0.to(CUDA)
    scratch = torch.full((t_gpu.scratch_floats,), float("nan"), device=CUDA)
    on_cuda(ops.lora_gemm, x.to(CUDA), y_gpu, out_f, t_gpu, scratch)
    # The delta, not y's baseline. The CPU widens the adapters exactly and sums in float32; a
    # CUDA kernel may round x and x @ A^T to the adapters' 16-bit type for the tensor cores.
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-3
    assert rel_err(y_gpu - y0.to(CUDA), y_cpu - y0) < tol


# ------------------------------------------------------------------------------ sampling


def sample_params(r, vocab, **kw):
    return [(kw.get("top_k", 0), kw.get("top_p", 1.0), kw.get("temperature", 1.0), vocab)] * r


def test_sample_greedy_matches_cpu_and_argmax():
    logits = randn(6, 32000, seed=10) * 4
    rows = torch.tensor([0, 2, 5, 5], dtype=torch.int32)
    params = sample_params(4, 32000, top_k=1)
    tok_cpu = torch.full((4,), -7, dtype=torch.int32)
    ops.sample(logits, rows, params, [1, 2, 3, 4], tok_cpu)
    tok_gpu = torch.full((4,), -7, dtype=torch.int32, device=CUDA)
    lp_gpu = torch.full((4,), float("nan"), device=CUDA)
    on_cuda(ops.sample, logits.to(CUDA), rows.to(CUDA), params, [1, 2, 3, 4], tok_gpu, lp_gpu)
    assert tok_gpu.cpu().tolist() == tok_cpu.tolist() == logits[rows.long()].argmax(1).tolist()
    want_lp = torch.log_softmax(logits[rows.long()].double(), 1).max(1).values
    assert torch.allclose(lp_gpu.cpu().double(), want_lp, atol=1e-4)


@pytest.mark.parametrize(
    "kw", [{"temperature": 0.8}, {"top_k": 50, "temperature": 1.2}, {"top_p": 0.9}]
)
def test_seeded_sample_is_bitwise_the_cpu_draw_and_reproducible(kw):
    r, vocab = 16, 32000
    logits = randn(r, vocab, seed=11) * 3
    rows = torch.arange(r, dtype=torch.int32)
    params = sample_params(r, vocab, **kw)
    states = [0x9E3779B97F4A7C15 * (i + 1) % 2**64 for i in range(r)]
    tok_cpu = torch.full((r,), -7, dtype=torch.int32)
    lp_cpu = torch.full((r,), float("nan"))
    st_cpu = ops.sample(logits, rows, params, states, tok_cpu, lp_cpu)
    draws = []
    for _ in range(2):
        tok = torch.full((r,), -7, dtype=torch.int32, device=CUDA)
        lp = torch.full((r,), float("nan"), device=CUDA)
        st = on_cuda(ops.sample, logits.to(CUDA), rows.to(CUDA), params, states, tok, lp)
        draws.append((tok.cpu().tolist(), st, lp.cpu()))
    assert draws[0][:2] == draws[1][:2]  # the same seed draws the same tokens, states alike
    assert draws[0][0] == tok_cpu.tolist() and draws[0][1] == st_cpu
    assert st_cpu != states  # the states advanced
    assert torch.allclose(draws[0][2], lp_cpu, atol=1e-5)


# ------------------------------------------------------------------------------ end to end


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_llm_greedy_generation_on_cuda_equals_cpu(dtype):
    """The demo's tiny random Llama checkpoint: greedy tokens on the GPU are the CPU's."""
    model = lorart.demo.DEMO / "model"
    prompts = [[1, 5, 9, 13, 2, 7], [3, 3, 3], list(range(1, 40))]
    outs = {}
    for device in ("cpu", "cuda"):
        with lorart.LLM(model, device=device, dtype=dtype) as llm:
            outs[device] = [o.token_ids for o in llm.generate(prompts, max_new_tokens=12)]
    assert any(len(t) > 1 for t in outs["cpu"])
    assert outs["cuda"] == outs["cpu"]


def test_numpy_inputs_are_refused_for_a_cuda_op():
    x = torch.randn(2, 8, device=CUDA)
    with pytest.raises(ValueError, match="every tensor must be on the context's device"):
        ops.linear(x, np.ones((3, 8), np.float32), torch.empty(2, 3, device=CUDA))

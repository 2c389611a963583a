"""lorart._core.ops (the test/bench binding of the kernel ops) against torch on the CPU."""

import numpy as np
import pytest
import torch

import lorart
from lorart._core import ops


def test_linear_matches_torch():
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(5, 33, generator=g), torch.randn(17, 33, generator=g)
    y = torch.full((5, 17), float("nan"))
    ops.linear(x, w, y)
    ref = (x.double() @ w.double().T).float()
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_rms_norm_and_silu_mul_match_torch():
    g = torch.Generator().manual_seed(2)
    x, wt = torch.randn(4, 24, generator=g), torch.randn(24, generator=g)
    out = torch.full_like(x, float("nan"))
    ops.rms_norm(x, wt, 1e-5, out)
    ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * wt
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5)
    gu = torch.randn(3, 20, generator=g)
    o = torch.full((3, 10), float("nan"))
    ops.silu_mul(gu, o)
    assert torch.allclose(o, torch.nn.functional.silu(gu[:, :10]) * gu[:, 10:], atol=1e-6)


def test_lora_gemm_matches_torch():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 16, generator=g)
    a0, b0 = torch.randn(4, 16, generator=g), torch.randn(4, 8, generator=g)
    a1, b1 = torch.randn(2, 16, generator=g), torch.randn(2, 8, generator=g)
    table = ops.LoraTable([(0, 2, 0), (3, 6, 1)], [(a0, b0), (a1, b1)], 16, 8)
    y = torch.randn(6, 8, generator=g)
    ref = y.clone()
    ref[0:2] += x[0:2] @ a0.T @ b0
    ref[3:6] += x[3:6] @ a1.T @ b1
    scratch = torch.empty(table.scratch_floats)
    ops.lora_gemm(x, y, 8, table, scratch)
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_output_that_would_be_copied_is_refused():
    x, w = torch.randn(2, 4), torch.randn(3, 4)
    y = torch.empty(3, 2).T  # not contiguous: a write would land in a copy
    with pytest.raises(ValueError, match="y must be a contiguous"):
        ops.linear(x, w, y)
    ro = np.zeros((2, 3), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        ops.linear(x.numpy(), w.numpy(), ro)


def test_paged_attention_matches_torch_and_writes_the_cache():
    """Two sequences (a 3-token prefill over 5 cached tokens, a decode over 9) in a bf16 cache."""
    g = torch.Generator().manual_seed(4)
    heads, kv_heads, hd, bs = 4, 2, 8, 4
    kc = torch.randn(8, bs, kv_heads, hd, generator=g).bfloat16()
    vc = torch.randn(8, bs, kv_heads, hd, generator=g).bfloat16()
    seqs, tables = [(5, 3), (9, 1)], [[6, 1, -1], [0, 7, 3]]
    q = torch.randn(4, heads * hd, generator=g)
    k, v = torch.randn(4, kv_heads * hd, generator=g), torch.randn(4, kv_heads * hd, generator=g)
    ref_k, ref_v = kc.clone(), vc.clone()
    want = torch.empty(4, heads * hd, dtype=torch.float64)
    t = 0
    for (c, n), table in zip(seqs, tables, strict=True):
        for j in range(n):
            blk, off = table[(c + j) // bs], (c + j) % bs
            ref_k[blk, off] = k[t + j].view(kv_heads, hd).bfloat16()
            ref_v[blk, off] = v[t + j].view(kv_heads, hd).bfloat16()
        used = [b for b in table if b >= 0]
        keys = ref_k[used].reshape(-1, kv_heads, hd)[: c + n].double().repeat_interleave(2, 1)
        vals = ref_v[used].reshape(-1, kv_heads, hd)[: c + n].double().repeat_interleave(2, 1)
        for j in range(n):
            qj = q[t + j].view(heads, hd).double()
            p = (torch.einsum("hd,khd->hk", qj, keys[: c + j + 1]) * hd**-0.5).softmax(-1)
            want[t + j] = torch.einsum("hk,khd->hd", p, vals[: c + j + 1]).reshape(-1)
        t += n
    out = torch.full((4, heads * hd), float("nan"))
    ops.paged_attention(
        q, k, v, kc, vc,
        torch.tensor([0, 3, 4], dtype=torch.int32),
        torch.tensor([c for c, _ in seqs], dtype=torch.int32),
        torch.tensor(tables, dtype=torch.int32),
        heads, kv_heads, hd, hd**-0.5, out,
    )  # fmt: skip
    assert torch.equal(kc.view(torch.int16), ref_k.view(torch.int16))
    assert torch.equal(vc.view(torch.int16), ref_v.view(torch.int16))
    assert torch.allclose(out.double(), want, rtol=1e-5, atol=1e-5)


def test_paged_attention_workspace_bytes_and_device_names():
    assert ops.paged_attention_workspace_bytes("cpu", 64, 8192, 32, 8, 128) == 0
    # CUDA's split-KV partials: seqs * heads * splits (256 keys each) * (head_dim + 2) floats.
    assert ops.paged_attention_workspace_bytes("cuda", 64, 8192, 32, 8, 128) == (
        64 * 32 * 32 * 130 * 4
    )
    assert ops.paged_attention_workspace_bytes("cuda", 64, 256, 32, 8, 128) == 0  # one split
    with pytest.raises(ValueError, match="device must be 'cpu', 'cuda' or 'cuda:N'"):
        ops.paged_attention_workspace_bytes("gpu", 1, 1, 1, 1, 1)
    ops.synchronize("cpu")
    if not lorart.build_info()["cuda"]:
        with pytest.raises(lorart.DeviceError, match="no CUDA backend"):
            ops.synchronize("cuda")


def test_sample_greedy_on_cpu_is_the_argmax():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(5))
    rows = torch.tensor([2, 0], dtype=torch.int32)
    tokens = torch.full((2,), -7, dtype=torch.int32)
    states = ops.sample(logits, rows, [(1, 1.0, 1.0, 50)] * 2, [11, 12], tokens)
    assert tokens.tolist() == logits[[2, 0]].argmax(1).tolist()
    assert len(states) == 2
    with pytest.raises(ValueError, match="one entry per row"):
        ops.sample(logits, rows, [(1, 1.0, 1.0, 50)], [11], tokens)

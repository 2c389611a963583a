"""lorart._core.ops (the test/bench binding of the kernel ops) against torch on the CPU."""

import numpy as np
import pytest
import torch

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

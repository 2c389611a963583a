"""Helpers shared by the executor tests: collecting responses, random adapters, a small config."""

from __future__ import annotations

import numpy as np

import lorart

TIMEOUT = 60.0  # seconds any single await may take before the test fails instead of hanging


def collect(exe, rid: int, timeout: float = TIMEOUT) -> list:
    """Every response of `rid` up to and including the final one."""
    out = []
    while not (out and out[-1].is_final):
        got = exe.await_responses(rid, timeout=timeout)
        assert got, f"request {rid}: no response within {timeout} s"
        out.extend(got)
    assert all(not r.is_final for r in out[:-1])
    assert all(r.request_id == rid for r in out)
    return out


def final(exe, rid: int, timeout: float = TIMEOUT):
    return collect(exe, rid, timeout)[-1]


def random_adapter(
    model_config,
    seed: int,
    rank: int = 4,
    modules: tuple[int, ...] = (1, 3, 5, 6),
    std: float = 0.2,
    dtype: str = "float32",
    value: float | None = None,
) -> tuple[lorart.LoraWeights, lorart.LoraConfig]:
    """Random A/B pairs of `rank` on `modules` of every layer (``value`` fills them instead)."""
    rng = np.random.default_rng(seed)
    rows = []
    for layer in range(model_config.num_layers):
        for mid in modules:
            hi, ho = model_config.lora_module_dims(mid)
            a = rng.normal(0.0, std, (rank, hi))
            b = rng.normal(0.0, std, (ho, rank))
            if value is not None:
                a[:], b[:] = value, value
            rows.append(lorart.lora.LoraRow(mid, layer, a, b))
    return lorart.lora.pack(rows, dtype=dtype)


def cancel_midway(exe, submit, attempts: int = 20) -> tuple[int, list, int]:
    """Submit a streaming request (``submit()`` returns its id), wait for its first response and
    cancel it. Retried while the request ran to its end first: a loaded machine can finish a
    short request before the caller awaits or cancels it. Returns (id, responses, attempts)."""
    for attempt in range(1, attempts + 1):
        rid = submit()
        first = exe.await_responses(rid, timeout=TIMEOUT)
        assert first, f"request {rid}: no response within {TIMEOUT} s"
        if first[-1].is_final:
            continue
        exe.cancel_request(rid)
        responses = first + collect(exe, rid)
        if responses[-1].finish_reason == "cancelled":
            return rid, responses, attempt
    raise AssertionError(f"every one of {attempts} requests finished before its cancel")

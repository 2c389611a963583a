# Type stubs of lorart._core.ops (csrc/bindings/bind_ops.cc), generated with the package's
# (see __init__.pyi beside this); tests/python/test_core_stubs.py checks them against the module.
"""
The kernel ops over numpy arrays or DLPack tensors (CPU or CUDA), for tests and benchmarks. Outputs are written in place; calls on CUDA return without synchronizing, except sample and a paged_attention given no workspace (their docstrings say why).
"""

from __future__ import annotations

import collections.abc
import typing

__all__: list[str] = [
    "LoraTable",
    "embedding",
    "linear",
    "lora_gemm",
    "paged_attention",
    "paged_attention_workspace_bytes",
    "rms_norm",
    "rope",
    "sample",
    "silu_mul",
    "synchronize",
]

class LoraTable:
    """
    The runs and per-slot (a, b_t) pairs of one LoRA module for lora_gemm, built once (on CUDA, uploaded once). runs: (begin, end, slot) token runs; slots: per slot (a [rank, in], b_t [rank, out]) of one float dtype and device, or None for a slot without the module. The table keeps the arrays alive.
    """
    def __init__(
        self,
        runs: collections.abc.Sequence[
            tuple[
                typing.SupportsInt | typing.SupportsIndex,
                typing.SupportsInt | typing.SupportsIndex,
                typing.SupportsInt | typing.SupportsIndex,
            ]
        ],
        slots: collections.abc.Sequence[tuple[typing.Any, typing.Any] | None],
        in_features: typing.SupportsInt | typing.SupportsIndex,
        out_features: typing.SupportsInt | typing.SupportsIndex,
    ) -> None: ...
    @property
    def device(self) -> str: ...
    @property
    def num_runs(self) -> int: ...
    @property
    def num_slots(self) -> int: ...
    @property
    def scratch_floats(self) -> int:
        """
        Floats of scratch lora_gemm needs for these runs.
        """

def embedding(
    table: typing.Any,
    ids: typing.Any,
    out: typing.Any,
    stream: typing.SupportsInt | typing.SupportsIndex = 0,
) -> None:
    """
    out [T, H] float32 = table [V, H] rows ids [T] (int32).
    """

def linear(
    x: typing.Any,
    w: typing.Any,
    y: typing.Any,
    beta: typing.SupportsFloat | typing.SupportsIndex = 0.0,
    precision: str = "float32",
    stream: typing.SupportsInt | typing.SupportsIndex = 0,
) -> None:
    """
    y [M, N] = x [M, K] float32 @ w [N, K]^T + beta * y, at `precision` (float32 or bfloat16).
    """

def lora_gemm(
    x: typing.Any,
    y: typing.Any,
    out_features: typing.SupportsInt | typing.SupportsIndex,
    table: LoraTable,
    scratch: typing.Any,
    stream: typing.SupportsInt | typing.SupportsIndex = 0,
) -> None:
    """
    y[:, :out_features] += x @ a^T @ b_t per run of `table`, with x [T, in] and y [T, >= out] float32 and scratch float32 of at least table.scratch_floats elements.
    """

def paged_attention(
    q: typing.Any,
    k: typing.Any,
    v: typing.Any,
    k_cache: typing.Any,
    v_cache: typing.Any,
    seq_starts: typing.Any,
    context_lens: typing.Any,
    block_tables: typing.Any,
    num_heads: typing.SupportsInt | typing.SupportsIndex,
    num_kv_heads: typing.SupportsInt | typing.SupportsIndex,
    head_dim: typing.SupportsInt | typing.SupportsIndex,
    scale: typing.SupportsFloat | typing.SupportsIndex,
    out: typing.Any,
    sliding_window: typing.SupportsInt | typing.SupportsIndex = 0,
    max_query_len: typing.SupportsInt | typing.SupportsIndex = 0,
    max_kv_len: typing.SupportsInt | typing.SupportsIndex = 0,
    workspace: typing.Any = None,
    stream: typing.SupportsInt | typing.SupportsIndex = 0,
) -> None:
    """
    Writes the chunk's k, v [T, kv_heads * head_dim] into k_cache / v_cache [blocks, block_size, kv_heads, head_dim] (float32, float16 or bfloat16), then out [T, heads * head_dim] = causal attention of q over the cache. seq_starts [S + 1], context_lens [S], block_tables [S, W] are int32 on the tensors' device. On CUDA, max_query_len / max_kv_len are the step's bounds (0 = found by copying seq_starts and context_lens to the host) and workspace is device memory of paged_attention_workspace_bytes bytes (None = allocated for the call, which then synchronizes `stream`); pass both when timing.
    """

def paged_attention_workspace_bytes(
    device: str,
    max_seqs: typing.SupportsInt | typing.SupportsIndex,
    max_kv_len: typing.SupportsInt | typing.SupportsIndex,
    num_heads: typing.SupportsInt | typing.SupportsIndex,
    num_kv_heads: typing.SupportsInt | typing.SupportsIndex,
    head_dim: typing.SupportsInt | typing.SupportsIndex,
) -> int:
    """
    Bytes of paged_attention's workspace on `device` ('cpu', 'cuda', 'cuda:N') for steps of at most max_seqs sequences of at most max_kv_len keys (context plus chunk); 0 on the CPU.
    """

def rms_norm(
    x: typing.Any,
    weight: typing.Any,
    eps: typing.SupportsFloat | typing.SupportsIndex,
    out: typing.Any,
    stream: typing.SupportsInt | typing.SupportsIndex = 0,
) -> None:
    """
    out [T, H] = RMSNorm(x [T, H] float32) * weight [H].
    """

def rope(
    x: typing.Any,
    head_dim: typing.SupportsInt | typing.SupportsIndex,
    positions: typing.Any,
    inv_freq: typing.Any,
    stream: typing.SupportsInt | typing.SupportsIndex = 0,
) -> None:
    """
    In place: rotary embedding (rotate-half) of x [T, heads * head_dim] float32 at positions [T] (int32) with inv_freq [head_dim / 2] float32.
    """

def sample(
    logits: typing.Any,
    rows: typing.Any,
    params: collections.abc.Sequence[
        tuple[
            typing.SupportsInt | typing.SupportsIndex,
            typing.SupportsFloat | typing.SupportsIndex,
            typing.SupportsFloat | typing.SupportsIndex,
            typing.SupportsInt | typing.SupportsIndex,
        ]
    ],
    rng_states: collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex],
    tokens: typing.Any,
    log_probs: typing.Any = None,
    stream: typing.SupportsInt | typing.SupportsIndex = 0,
) -> list[int]:
    """
    tokens [R] int32 = a token drawn from logits [N, V] float32 row rows[i] with params[i] = (top_k, top_p, temperature, vocab) and rng_states[i]; log_probs [R] float32 (or None) receives log p(token). params and rng_states are host lists; returns the advanced RNG states. On CUDA the call uploads params and states, allocates the kernel's workspace and synchronizes `stream` before returning.
    """

def silu_mul(
    gate_up: typing.Any, out: typing.Any, stream: typing.SupportsInt | typing.SupportsIndex = 0
) -> None:
    """
    out [T, I] = silu(gate_up[:, :I]) * gate_up[:, I:] (float32).
    """

def synchronize(
    device: str = "cuda", stream: typing.SupportsInt | typing.SupportsIndex = 0
) -> None:
    """
    Waits for everything queued on `stream` (0 = the legacy default stream) of `device`; a no-op for 'cpu'. Raises DeviceError for a fault of a kernel queued there, or when the build or machine has no such device.
    """

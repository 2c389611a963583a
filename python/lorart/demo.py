"""``lorart demo``: the embedded default job, offline on a CPU.

Converts the PEFT adapter shipped in ``lorart/assets`` to TensorRT-LLM's tensor format, checks it
against the tiny Llama it was made for, writes and re-reads the ``.npy`` pair, and splits it for
tensor parallelism, checking that the ranks' partial LoRA products add up to the full one.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from lorart import hf, lora

ASSETS = Path(__file__).resolve().parent / "assets"


def run(tp_size: int = 2) -> int:
    """Run the demo, print what it did, and return 0 (non-zero if a check fails)."""
    model_config = hf.load_config(ASSETS / "tiny_llama")
    adapter_dir = ASSETS / "demo_adapter"
    weights, config = lora.from_peft(adapter_dir, model_config, dtype="float32")
    print(f"model   {model_config}")
    print(f"adapter {adapter_dir.name}: {config.num_rows} rows, max_row {weights.shape[1]}")
    print(f"{'row':>4}  {'module':<16}{'layer':>5}{'r':>4}   A [r, Hi]   B [Ho, r]")
    rows = lora.unpack(weights, config, model_config)
    for i, row in enumerate(rows):
        name = f"{row.module_id} {lora.LORA_MODULES[row.module_id].name}"
        print(
            f"{i:>4}  {name:<16}{row.layer_idx:>5}{row.A.shape[0]:>4}   "
            f"{list(row.A.shape)!s:<11} {list(row.B.shape)}"
        )

    with tempfile.TemporaryDirectory() as tmp:
        lora.save_npy(tmp, weights.to("float16"), config)
        loaded_weights, loaded_config = lora.load_npy(tmp)
        same_rows = np.array_equal(loaded_config.numpy(), config.numpy())
        max_err = float(np.abs(loaded_weights.numpy().astype(np.float32) - weights.numpy()).max())
    print(
        f"npy round trip (float16): config identical={same_rows}, max |w16 - w32| = {max_err:.2e}"
    )

    x = (
        np.random.default_rng(0)
        .standard_normal((3, max(model_config.hidden_size, model_config.intermediate_size)))
        .astype(np.float32)
    )
    worst = 0.0
    shards = [
        lora.unpack(
            *lora.tp_split(weights, config, model_config, tp_size, rank),
            lora.tp_model_config(model_config, tp_size),
        )
        for rank in range(tp_size)
    ]
    for i, row in enumerate(rows):
        full = x[:, : row.A.shape[1]] @ row.A.T @ row.B.T
        split = lora.LORA_MODULES[row.module_id].tp_split
        if split == "row":
            width = row.A.shape[1] // tp_size
            parts = [
                x[:, k * width : (k + 1) * width] @ s[i].A.T @ s[i].B.T
                for k, s in enumerate(shards)
            ]
            combined = np.sum(parts, axis=0)
        else:
            combined = np.concatenate(
                [x[:, : row.A.shape[1]] @ s[i].A.T @ s[i].B.T for s in shards], axis=1
            )
        worst = max(worst, float(np.abs(combined - full).max()))
    print(f"tp_split x{tp_size}: ranks' partial products vs full product, max abs diff {worst:.2e}")
    ok = same_rows and max_err < 1e-2 and worst < 1e-4
    print("demo OK" if ok else "demo FAILED")
    return 0 if ok else 1

"""Seed corpora for the fuzz targets, built from valid files (nothing binary is checked in).

Every seed is a file lorart accepts, so the fuzzer starts from inputs that reach the deep checks
(offsets, shapes against the model, validation rules) rather than failing at the first byte.
The model all targets check against is :data:`FUZZ_CONFIG` (tiny, so the whole checkpoint fits
in a short input).
"""

from __future__ import annotations

import io
import json
import random
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

# hidden 8, intermediate 12, 2 layers, 2 heads (head_dim 4), 1 KV head, vocab 16.
FUZZ_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 16,
    "hidden_size": 8,
    "intermediate_size": 12,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
}
ADAPTER_CONFIG = {
    "peft_type": "LORA",
    "r": 2,
    "lora_alpha": 4,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "bias": "none",
}
_ST_NAMES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16"}
_ST_NAMES[np.dtype(ml_dtypes.bfloat16)] = "BF16"
_ST_NAMES[np.dtype(np.int64)] = "I64"

# HF projection -> (in, out) for FUZZ_CONFIG
_PROJ = {
    "q_proj": (8, 8),
    "k_proj": (8, 4),
    "v_proj": (8, 4),
    "o_proj": (8, 8),
    "gate_proj": (8, 12),
    "up_proj": (8, 12),
    "down_proj": (12, 8),
}


def safetensors_bytes(tensors: dict[str, np.ndarray], metadata: dict | None = None) -> bytes:
    """A safetensors file as the reference writer lays it out (header padded to 8 bytes)."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    data = b""
    for name, array in tensors.items():
        raw = np.ascontiguousarray(array).tobytes()
        header[name] = {
            "dtype": _ST_NAMES[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [len(data), len(data) + len(raw)],
        }
        data += raw
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def adapter_tensors(rng: np.random.Generator, dtype, layers=(0, 1), fused=False) -> dict:
    out = {}
    for layer in layers:
        for proj, (hi, ho) in _PROJ.items():
            if fused and proj in ("gate_proj", "up_proj"):
                continue
            kind = "mlp" if proj in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            path = f"base_model.model.model.layers.{layer}.{kind}.{proj}"
            out[f"{path}.lora_A.weight"] = rng.standard_normal((2, hi)).astype(dtype)
            out[f"{path}.lora_B.weight"] = rng.standard_normal((ho, 2)).astype(dtype)
        if fused:
            path = f"base_model.model.model.layers.{layer}.mlp.gate_up_proj"
            out[f"{path}.lora_A.weight"] = rng.standard_normal((2, 8)).astype(dtype)
            out[f"{path}.lora_B.weight"] = rng.standard_normal((24, 2)).astype(dtype)
    return out


def checkpoint_tensors(rng: np.random.Generator, dtype) -> dict:
    h, vocab = 8, 16
    out = {"model.embed_tokens.weight": rng.standard_normal((vocab, h)).astype(dtype)}
    for i in range(2):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = np.ones(h, dtype)
        out[p + "post_attention_layernorm.weight"] = np.ones(h, dtype)
        for proj, (hi, ho) in _PROJ.items():
            kind = "mlp" if proj in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            out[f"{p}{kind}.{proj}.weight"] = rng.standard_normal((ho, hi)).astype(dtype)
    out["model.norm.weight"] = np.ones(h, dtype)
    out["lm_head.weight"] = rng.standard_normal((vocab, h)).astype(dtype)
    return out


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def npy_pair(weights: np.ndarray, config: np.ndarray) -> bytes:
    """The npy target's input: u32 length of the weights file, the weights file, the config."""
    w = npy_bytes(weights)
    return struct.pack("<I", len(w)) + w + npy_bytes(config)


def _npy_seeds(rng: np.random.Generator) -> list[bytes]:
    table = np.array([[1, 0, 2], [5, 1, 2], [6, 1, 1]], dtype=np.int32)
    lengths = [2 * (8 + 8), 2 * (8 + 12), 1 * (12 + 8)]
    values = np.zeros((3, max(lengths)), np.float32)
    for i, n in enumerate(lengths):
        values[i, :n] = rng.standard_normal(n)
    return [
        npy_pair(values[None], table[None]),
        npy_pair(values, table),
        npy_pair(values.astype(np.float16)[None], table.astype(np.int64)[None]),
        npy_pair(values.astype(ml_dtypes.bfloat16).view("V2")[None], table[None]),
        npy_pair(values.astype(">f4"), table.astype(">i4")),
        npy_pair(np.asfortranarray(values), table.astype(np.uint16)),
    ]


def _config_seeds() -> list[bytes]:
    llama3 = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    }
    variants = [
        FUZZ_CONFIG,
        {**FUZZ_CONFIG, "rope_scaling": llama3, "tie_word_embeddings": True, "bos_token_id": 1},
        {
            **{k: v for k, v in FUZZ_CONFIG.items() if k != "rope_theta"},
            "rope_parameters": {"rope_theta": 5e5, **llama3},
            "eos_token_id": [2, 3],
        },
        {**FUZZ_CONFIG, "architectures": ["MistralForCausalLM"], "sliding_window": 8},
        {
            **FUZZ_CONFIG,
            "architectures": ["Qwen2ForCausalLM"],
            "use_sliding_window": False,
            "sliding_window": 32,
        },
        {**FUZZ_CONFIG, "head_dim": 6, "rope_scaling": {"type": "linear", "factor": 2.0}},
        {k: v for k, v in FUZZ_CONFIG.items() if k not in ("architectures",)}
        | {"model_type": "llama"},
    ]
    return [json.dumps(v, indent=1).encode() for v in variants]


def write_seeds(target: str, out_dir: Path) -> int:
    """Write the seed corpus of ``target`` into ``out_dir``; returns how many."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    if target == "safetensors":
        seeds = [
            safetensors_bytes(adapter_tensors(rng, np.float32, layers=(0,))),
            safetensors_bytes(adapter_tensors(rng, np.float16, layers=(1,), fused=True)),
            safetensors_bytes(adapter_tensors(rng, ml_dtypes.bfloat16), {"format": "pt"}),
            safetensors_bytes(checkpoint_tensors(rng, np.float32)),
            safetensors_bytes(checkpoint_tensors(rng, ml_dtypes.bfloat16)),
            safetensors_bytes({"empty": np.zeros((0, 3), np.float32), "i": np.arange(2)}),
        ]
    elif target == "npy":
        seeds = _npy_seeds(rng)
    elif target == "config":
        seeds = _config_seeds()
    elif target == "lora":
        # The structured target reads its choices from the bytes: any bytes are a valid start.
        gen = random.Random(0)
        seeds = [bytes(gen.randrange(256) for _ in range(n)) for n in (16, 64, 256, 1024)]
        seeds.append(bytes(64))
    else:
        raise ValueError(f"unknown fuzz target {target!r}")
    for i, seed in enumerate(seeds):
        (out_dir / f"seed-{i}").write_bytes(seed)
    return len(seeds)

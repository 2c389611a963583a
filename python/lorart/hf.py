"""Hugging Face checkpoint directories -> :class:`lorart.ModelConfig`.

Reads both spellings of the rotary settings: the older top-level ``rope_theta`` /
``rope_scaling`` keys (real checkpoints) and transformers v5's ``rope_parameters`` dict.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lorart._core import ModelConfig, RopeScaling

# model_type -> architecture, for configs that omit "architectures".
_MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}


def load_config(model_dir: str | Path) -> ModelConfig:
    """Read ``config.json`` from an HF checkpoint directory (or the file itself).

    Raises ``FileNotFoundError`` when there is no config, ``ValueError`` naming the field when it
    is missing or unsupported (architecture, rope type, inconsistent head counts).
    """
    path = Path(model_dir)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json at {path}")
    with open(path, encoding="utf-8") as f:
        return config_from_dict(json.load(f), source=str(path))


def config_from_dict(d: dict[str, Any], source: str = "config") -> ModelConfig:
    """Build and validate a :class:`ModelConfig` from a parsed HF ``config.json``."""
    supported = ModelConfig.supported_architectures
    archs = d.get("architectures") or []
    arch = archs[0] if archs else _MODEL_TYPES.get(d.get("model_type", ""), d.get("model_type"))
    if arch not in supported:
        raise ValueError(
            f"{source}: architecture {arch!r} is not supported (supported: {', '.join(supported)})"
        )

    def need(key: str) -> Any:
        if d.get(key) is None:
            raise ValueError(f"{source}: missing required key {key!r}")
        return d[key]

    cfg = ModelConfig()
    cfg.architecture = arch
    cfg.vocab_size = int(need("vocab_size"))
    cfg.hidden_size = int(need("hidden_size"))
    cfg.intermediate_size = int(need("intermediate_size"))
    cfg.num_layers = int(need("num_hidden_layers"))
    cfg.num_attention_heads = int(need("num_attention_heads"))
    cfg.num_kv_heads = int(d.get("num_key_value_heads") or cfg.num_attention_heads)
    cfg.head_dim = int(d.get("head_dim") or cfg.hidden_size // cfg.num_attention_heads)
    cfg.max_position_embeddings = int(d.get("max_position_embeddings") or 2048)
    cfg.rms_norm_eps = float(d.get("rms_norm_eps") or 1e-6)
    cfg.tie_word_embeddings = bool(d.get("tie_word_embeddings", False))
    # Qwen2 always has q/k/v biases; Llama exposes the choice as attention_bias.
    cfg.attention_bias = arch == "Qwen2ForCausalLM" or bool(d.get("attention_bias", False))
    cfg.sliding_window = _sliding_window(d, arch)
    cfg.dtype = _dtype(d.get("torch_dtype") or d.get("dtype") or "float32", source)
    cfg.rope_theta, cfg.rope_scaling = _rope(d, source)
    bos = d.get("bos_token_id")
    cfg.bos_token_id = int(bos) if bos is not None else -1
    eos = d.get("eos_token_id")
    cfg.eos_token_ids = (
        [] if eos is None else [int(e) for e in (eos if isinstance(eos, list) else [eos])]
    )
    cfg.validate()
    return cfg


def _rope(d: dict[str, Any], source: str) -> tuple[float, RopeScaling]:
    params = d.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        theta = params["rope_theta"]
        scaling = params
    else:
        theta = d.get("rope_theta", 10000.0)
        scaling = d.get("rope_scaling") or {}
    rope = RopeScaling()
    rope.rope_type = str(scaling.get("rope_type") or scaling.get("type") or "default")
    if rope.rope_type != "default":
        if scaling.get("factor") is None:
            raise ValueError(f"{source}: rope_scaling of type {rope.rope_type!r} needs 'factor'")
        rope.factor = float(scaling["factor"])
    if rope.rope_type == "llama3":
        for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if scaling.get(key) is None:
                raise ValueError(f"{source}: llama3 rope_scaling needs {key!r}")
        rope.low_freq_factor = float(scaling["low_freq_factor"])
        rope.high_freq_factor = float(scaling["high_freq_factor"])
        rope.original_max_position_embeddings = int(scaling["original_max_position_embeddings"])
    return float(theta), rope


def _sliding_window(d: dict[str, Any], arch: str) -> int:
    window = d.get("sliding_window")
    if not window:
        return 0
    if arch == "Qwen2ForCausalLM" and not d.get("use_sliding_window", False):
        return 0
    return int(window)


def _dtype(name: str, source: str) -> str:
    name = str(name).removeprefix("torch.")
    if name not in ("float32", "float16", "bfloat16"):
        raise ValueError(
            f"{source}: torch_dtype {name!r} is not supported "
            "(supported: float32, float16, bfloat16)"
        )
    return name


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of an HF checkpoint: ``model.safetensors`` or the shards listed in
    ``model.safetensors.index.json``."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        missing = [s for s in shards if not (model_dir / s).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{model_dir}: shard(s) listed in the index are missing: {', '.join(missing)}"
            )
        return [model_dir / s for s in shards]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise FileNotFoundError(
        f"{model_dir}: no model.safetensors or model.safetensors.index.json (lorart reads "
        "safetensors checkpoints; re-save a .bin checkpoint with save_pretrained)"
    )


# Checkpoint entries that carry no parameters of the model (recomputed buffers).
_SKIPPED_SUFFIXES = ("rotary_emb.inv_freq",)


def iter_weights(model_dir: str | Path, config: ModelConfig):
    """Yield ``(name, array)`` for every parameter tensor, memory-mapped (no copies), shard by
    shard. A tied ``lm_head.weight`` and recomputed buffers are skipped."""
    from lorart._safetensors import read_safetensors

    for path in checkpoint_files(model_dir):
        for name, array in read_safetensors(path).items():
            if name.endswith(_SKIPPED_SUFFIXES):
                continue
            if name == "lm_head.weight" and config.tie_word_embeddings:
                continue
            yield name, array

"""LoRA adapters in lorart's (TensorRT-LLM's) tensor format.

An adapter is a pair ``(LoraWeights, LoraConfig)``: config row ``i`` is ``[module_id, layer_idx,
r]`` and weights row ``i`` is ``flatten(A_i [r, Hi]) ++ flatten(B_i [Ho, r])`` zero-padded, with the
PEFT scaling folded into ``B``. This module converts PEFT adapter directories to that format
(:func:`from_peft`), reads and writes TensorRT-LLM's ``.npy`` file pair (:func:`save_npy`,
:func:`load_npy`), splits an adapter for tensor parallelism (:func:`tp_split`) and validates it
against a model (:func:`validate`, implemented in C++).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np

from lorart import _core
from lorart._core import LoraConfig, LoraError, LoraWeights, ModelConfig
from lorart._safetensors import read_safetensors


class LoraModule(NamedTuple):
    """One entry of the module-id table (ids and names as in TensorRT-LLM)."""

    id: int
    name: str
    hf_name: str  # Llama-family HF projection name, "" where the family has none
    tp_split: str  # "column" | "row" | "replicated"
    description: str


LORA_MODULES: dict[int, LoraModule] = {m[0]: LoraModule(*m) for m in _core.lora_modules()}
_BY_NAME = {m.name: m.id for m in LORA_MODULES.values()}
_BY_HF_NAME = {m.hf_name: m.id for m in LORA_MODULES.values() if m.hf_name}
# Fused HF projections whose B stacks several lorart modules (A is shared).
_FUSED_HF = {"gate_up_proj": ("gate_proj", "up_proj")}
_SUPPORTED_HF = sorted([*_BY_HF_NAME, *_FUSED_HF])
_FLOAT_DTYPES = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
}
WEIGHTS_FILE = "model.lora_weights.npy"
CONFIG_FILE = "model.lora_config.npy"


class LoraRow(NamedTuple):
    """One adapted (module, layer): ``y += (x @ A.T) @ B.T`` with ``A [r, Hi]``, ``B [Ho, r]``."""

    module_id: int
    layer_idx: int
    A: np.ndarray
    B: np.ndarray


def module_id(name: str) -> int:
    """Module id for a TensorRT-LLM name (``attn_q``) or a Llama-family HF name (``q_proj``)."""
    if name in _BY_NAME:
        return _BY_NAME[name]
    if name in _BY_HF_NAME:
        return _BY_HF_NAME[name]
    raise LoraError(f"unknown LoRA module {name!r} (known: {', '.join(_BY_NAME)})")


# ---------------------------------------------------------------------------------------------
# Packing rows <-> the two tensors


def pack(rows: Sequence[LoraRow], dtype: str = "float32") -> tuple[LoraWeights, LoraConfig]:
    """Build the weights/config pair from rows, in the given order, padding to the longest row."""
    np_dtype = _np_dtype(dtype)
    if not rows:
        raise LoraError("a LoRA adapter needs at least one adapted module")
    lengths = [row.A.size + row.B.size for row in rows]
    table = np.empty((len(rows), 3), dtype=np.int32)
    packed = np.zeros((len(rows), max(lengths)), dtype=np.float32)
    for i, row in enumerate(rows):
        r = row.A.shape[0]
        table[i] = (row.module_id, row.layer_idx, r)
        packed[i, : row.A.size] = row.A.reshape(-1)
        packed[i, row.A.size : lengths[i]] = row.B.reshape(-1)
    return LoraWeights(packed.astype(np_dtype, copy=False)), LoraConfig(table)


def unpack(weights: LoraWeights, config: LoraConfig, model_config: ModelConfig) -> list[LoraRow]:
    """Split each row back into ``A [r, Hi]`` and ``B [Ho, r]`` (float32 copies), in row order.

    The model configuration supplies ``Hi``/``Ho``; a row is only self-describing given them.
    """
    validate(weights, config, model_config, max_lora_rank=_max_rank(config))
    values = weights.numpy()
    rows = []
    for i, (mid, layer, r) in enumerate(config.numpy().tolist()):
        hi, ho = model_config.lora_module_dims(mid)
        a = values[i, : r * hi].astype(np.float32).reshape(r, hi)
        b = values[i, r * hi : r * hi + ho * r].astype(np.float32).reshape(ho, r)
        rows.append(LoraRow(mid, layer, a, b))
    return rows


def validate(
    weights: LoraWeights | None,
    config: LoraConfig | None,
    model_config: ModelConfig,
    max_lora_rank: int = 64,
    dtype: str | None = None,
) -> None:
    """Raise :class:`lorart.LoraError` for the first rule the adapter breaks.

    Rules (checked in C++, the same code the executor runs at enqueue): both tensors present; row
    counts equal; each module id known and present in the model; ``0 <= layer_idx < num_layers``;
    ``0 < r <= max_lora_rank``; no (module, layer) twice; rows long enough for ``r*Hi + Ho*r``
    values; dtype equal to ``dtype`` when given; used values finite.
    """
    _core.validate_lora(weights, config, model_config, max_lora_rank, dtype)


def _max_rank(config: LoraConfig) -> int:
    ranks = config.numpy()[:, 2]
    return max(1, int(ranks.max())) if ranks.size else 1


def _np_dtype(dtype: str) -> np.dtype:
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_FLOAT_DTYPES)}; got {dtype!r}")
    return _FLOAT_DTYPES[dtype]


# ---------------------------------------------------------------------------------------------
# PEFT adapter directories

_LORA_KEY = re.compile(r"(?P<path>.+)\.lora_(?P<which>A|B)(?:\.(?P<adapter>[^.]+))?\.weight")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def from_peft(
    adapter_dir: str | Path, model_config: ModelConfig | None = None, dtype: str = "float32"
) -> tuple[LoraWeights, LoraConfig]:
    """Convert a PEFT LoRA adapter directory to ``(LoraWeights, LoraConfig)``.

    Reads ``adapter_config.json`` and ``adapter_model.safetensors`` (or ``adapter_model.bin``,
    which needs torch). Honours ``r``, ``lora_alpha``, ``use_rslora``, ``rank_pattern``,
    ``alpha_pattern``, ``target_modules`` and ``layers_to_transform``; maps HF projections to
    module ids as TensorRT-LLM does (``gate_proj`` -> ``mlp_h_to_4h`` 5, ``up_proj`` ->
    ``mlp_gate`` 7), splits a fused ``gate_up_proj`` into those two, folds the scaling into ``B``
    and pads rows. With ``model_config`` every shape is checked against the model; without it the
    shapes come from the adapter alone. Rows are ordered by layer, then module id.
    """
    np_dtype = _np_dtype(dtype)
    adapter_dir = Path(adapter_dir)
    cfg = _read_adapter_config(adapter_dir)
    tensors = _read_adapter_tensors(adapter_dir)
    pairs = _lora_pairs(tensors, adapter_dir)
    # PEFT applies layers_to_transform only with a list of target names, not with a regex.
    layers_to_transform = cfg.get("layers_to_transform")
    if isinstance(layers_to_transform, int):
        layers_to_transform = [layers_to_transform]
    if not isinstance(cfg.get("target_modules"), list):
        layers_to_transform = None

    rows: list[LoraRow] = []
    for path, (a, b) in sorted(pairs.items()):
        leaf = path.rsplit(".", 1)[-1]
        match = _LAYER.search(path)
        if match is None:
            raise LoraError(
                f"{adapter_dir}: LoRA on {path!r} is outside the decoder layers; lorart adapts "
                f"only the per-layer projections ({', '.join(_SUPPORTED_HF)})"
            )
        layer = int(match.group(1))
        if leaf not in _BY_HF_NAME and leaf not in _FUSED_HF:
            raise LoraError(
                f"{adapter_dir}: target module {leaf!r} ({path}) has no LoRA module in the Llama "
                f"family (supported: {', '.join(_SUPPORTED_HF)})"
            )
        if layers_to_transform and layer not in layers_to_transform:
            raise LoraError(
                f"{adapter_dir}: {path} is in layer {layer}, but layers_to_transform is "
                f"{layers_to_transform}"
            )
        r = a.shape[0]
        if a.ndim != 2 or b.ndim != 2 or b.shape[1] != r:
            raise LoraError(
                f"{adapter_dir}: rank mismatch in {path}: lora_A is {list(a.shape)} and lora_B is "
                f"{list(b.shape)}; expected A [r, in] and B [out, r] with the same r"
            )
        key = path.removeprefix("base_model.model.")
        r_cfg = int(_pattern_value(cfg.get("rank_pattern"), key, cfg.get("r", 8)))
        if r_cfg != r:
            raise LoraError(
                f"{adapter_dir}: adapter_config.json gives rank {r_cfg} for {key} "
                f"(r / rank_pattern) but lora_A has {r} rows"
            )
        alpha = float(_pattern_value(cfg.get("alpha_pattern"), key, cfg.get("lora_alpha", 8)))
        scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        a32 = np.asarray(a, dtype=np.float32)
        b32 = np.asarray(b, dtype=np.float32) * np.float32(scaling)
        if leaf in _FUSED_HF:
            parts = _FUSED_HF[leaf]
            if b32.shape[0] % len(parts):
                raise LoraError(
                    f"{adapter_dir}: {path}: lora_B rows {b32.shape[0]} do not split "
                    f"evenly into {', '.join(parts)}"
                )
            for name, b_part in zip(parts, np.split(b32, len(parts)), strict=True):
                rows.append(LoraRow(_BY_HF_NAME[name], layer, a32, b_part))
        else:
            rows.append(LoraRow(_BY_HF_NAME[leaf], layer, a32, b32))

    rows.sort(key=lambda row: (row.layer_idx, row.module_id))
    if model_config is not None:
        _check_against_model(rows, model_config, adapter_dir)
    weights, config = pack(rows, dtype)
    if model_config is not None:
        validate(
            weights, config, model_config, max_lora_rank=_max_rank(config), dtype=np_dtype.name
        )
    return weights, config


def _pattern_value(patterns: dict[str, Any] | None, key: str, default: Any) -> Any:
    """PEFT's rule for rank_pattern/alpha_pattern: the first pattern ``p`` with
    ``re.match(rf"(.*\\.)?({p})$", key)`` gives the value; otherwise ``default``."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def _read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    if not adapter_dir.is_dir():
        raise LoraError(f"adapter directory {adapter_dir} does not exist")
    path = adapter_dir / "adapter_config.json"
    if not path.is_file():
        raise LoraError(f"{adapter_dir}: adapter_config.json not found (is this a PEFT adapter?)")
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise LoraError(f"{path}: peft_type {peft_type} is not supported (only LORA)")
    if cfg.get("use_dora"):
        raise LoraError(f"{path}: DoRA adapters (use_dora=true) are not supported yet")
    if cfg.get("modules_to_save"):
        raise LoraError(
            f"{path}: modules_to_save {cfg['modules_to_save']} replaces whole base modules; lorart "
            "serves many adapters on one shared base model and cannot swap base weights per request"
        )
    if cfg.get("bias", "none") != "none":
        raise LoraError(f"{path}: trained biases (bias={cfg['bias']!r}) are not supported")
    targets = cfg.get("target_modules")
    if isinstance(targets, list):
        unknown = [t for t in targets if t not in _BY_HF_NAME and t not in _FUSED_HF]
        if unknown:
            raise LoraError(
                f"{path}: target_modules {unknown} have no LoRA module in the Llama family "
                f"(supported: {', '.join(_SUPPORTED_HF)})"
            )
    return cfg


def _read_adapter_tensors(adapter_dir: Path) -> dict[str, np.ndarray]:
    safetensors_path = adapter_dir / "adapter_model.safetensors"
    bin_path = adapter_dir / "adapter_model.bin"
    if safetensors_path.is_file():
        return read_safetensors(safetensors_path)
    if bin_path.is_file():
        try:
            import torch
        except ImportError as err:
            raise LoraError(
                f"{bin_path}: reading adapter_model.bin needs torch; install torch or save the "
                "adapter as safetensors"
            ) from err
        state = torch.load(bin_path, map_location="cpu", weights_only=True)
        return {k: v.float().numpy() for k, v in state.items()}
    raise LoraError(
        f"{adapter_dir}: no adapter weights (adapter_model.safetensors or adapter_model.bin)"
    )


def _lora_pairs(
    tensors: dict[str, np.ndarray], adapter_dir: Path
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    halves: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        if "lora_magnitude_vector" in key:
            raise LoraError(f"{adapter_dir}: {key} is a DoRA magnitude; DoRA is not supported yet")
        if "lora_embedding" in key:
            raise LoraError(f"{adapter_dir}: {key}: LoRA on embeddings is not supported")
        match = _LORA_KEY.fullmatch(key)
        if match is None:
            raise LoraError(f"{adapter_dir}: unexpected tensor {key!r} in a LoRA adapter")
        halves.setdefault(match["path"], {})[match["which"]] = value
    pairs = {}
    for path, half in halves.items():
        if set(half) != {"A", "B"}:
            missing = "lora_B" if "A" in half else "lora_A"
            raise LoraError(f"{adapter_dir}: {path} has no {missing} weight")
        pairs[path] = (half["A"], half["B"])
    if not pairs:
        raise LoraError(f"{adapter_dir}: the adapter holds no LoRA weights")
    return pairs


def _check_against_model(rows: list[LoraRow], model: ModelConfig, adapter_dir: Path) -> None:
    for row in rows:
        name = LORA_MODULES[row.module_id].name
        if row.layer_idx >= model.num_layers:
            raise LoraError(
                f"{adapter_dir}: {name} of layer {row.layer_idx} is out of range for a model with "
                f"{model.num_layers} layers"
            )
        hi, ho = model.lora_module_dims(row.module_id)
        if row.A.shape[1] != hi or row.B.shape[0] != ho:
            raise LoraError(
                f"{adapter_dir}: {name} of layer {row.layer_idx}: adapter maps "
                f"{row.A.shape[1]} -> {row.B.shape[0]} features but the model's {name} maps "
                f"{hi} -> {ho}"
            )


# ---------------------------------------------------------------------------------------------
# TensorRT-LLM .npy files


def save_npy(out_dir: str | Path, weights: LoraWeights, config: LoraConfig) -> None:
    """Write ``model.lora_weights.npy`` ``[1, rows, max_row]`` and ``model.lora_config.npy``
    ``[1, rows, 3]`` int32, as TensorRT-LLM's ``hf_lora_convert.py`` does (bfloat16 is stored
    as 2-byte void ``|V2``, TensorRT-LLM's spelling)."""
    if weights.num_rows != config.num_rows:
        raise LoraError(
            f"lora_weights has {weights.num_rows} rows but lora_config has {config.num_rows}"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    values = weights.numpy()
    if weights.dtype == "bfloat16":
        values = values.view(np.dtype("V2"))
    np.save(out_dir / WEIGHTS_FILE, values[None])
    np.save(out_dir / CONFIG_FILE, config.numpy()[None])


def load_npy(lora_dir: str | Path) -> tuple[LoraWeights, LoraConfig]:
    """Read the TensorRT-LLM file pair (2-D or 3-D) from ``lora_dir``; weights are memory-mapped."""
    lora_dir = Path(lora_dir)
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        if not (lora_dir / name).is_file():
            raise LoraError(f"{lora_dir}: {name} not found")
    values = np.load(lora_dir / WEIGHTS_FILE, mmap_mode="r")
    if values.dtype.kind == "V" and values.dtype.itemsize == 2:
        values = values.view(ml_dtypes.bfloat16)
    table = np.load(lora_dir / CONFIG_FILE)
    if table.dtype != np.int32:
        if table.dtype.kind not in "iu" or (table.size and np.abs(table).max() > 2**31 - 1):
            raise LoraError(f"{lora_dir / CONFIG_FILE}: expected int32 values, got {table.dtype}")
        table = table.astype(np.int32)
    return LoraWeights(values), LoraConfig(table)


def is_npy_dir(path: str | Path) -> bool:
    """True when ``path`` holds the TensorRT-LLM ``.npy`` pair (as opposed to a PEFT adapter)."""
    return (Path(path) / WEIGHTS_FILE).is_file() and (Path(path) / CONFIG_FILE).is_file()


# ---------------------------------------------------------------------------------------------
# Tensor parallelism


def tp_split(
    weights: LoraWeights,
    config: LoraConfig,
    model_config: ModelConfig,
    tp_size: int,
    tp_rank: int,
) -> tuple[LoraWeights, LoraConfig]:
    """The part of an adapter that tensor-parallel rank ``tp_rank`` of ``tp_size`` holds.

    ColumnLinear modules (q, k, v, qkv, gate, up) keep all of ``A`` and take their block of
    ``B``'s rows (the fused qkv per q/k/v section); RowLinear modules (o, down) take their block of
    ``A``'s columns and keep all of ``B``. Rows stay in the same order; row length shrinks to the
    local sizes. KV heads fewer than ``tp_size`` are replicated, as the attention itself is.
    """
    if tp_size < 1 or not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank must be in [0, tp_size={tp_size}), got {tp_rank}")
    q_blocks = _head_blocks(model_config.num_attention_heads, model_config, tp_size, tp_rank, "q")
    kv_blocks = _head_blocks(model_config.num_kv_heads, model_config, tp_size, tp_rank, "kv")
    inter = _even_block(model_config.intermediate_size, tp_size, tp_rank, "intermediate_size")
    q_out = model_config.num_attention_heads * model_config.head_dim
    kv_out = model_config.num_kv_heads * model_config.head_dim
    out_slices = {
        1: [q_blocks],
        2: [kv_blocks],
        3: [kv_blocks],
        0: [q_blocks, _shift(kv_blocks, q_out), _shift(kv_blocks, q_out + kv_out)],
        5: [inter],
        7: [inter],
    }
    in_slices = {4: q_blocks, 6: inter}
    rows = []
    for row in unpack(weights, config, model_config):
        if row.module_id in out_slices:
            b = np.concatenate([row.B[s] for s in out_slices[row.module_id]], axis=0)
            rows.append(row._replace(B=b))
        elif row.module_id in in_slices:
            rows.append(row._replace(A=row.A[:, in_slices[row.module_id]]))
        else:
            rows.append(row)
    return pack(rows, weights.dtype)


def tp_model_config(model_config: ModelConfig, tp_size: int) -> ModelConfig:
    """The model shape one tensor-parallel rank sees: heads and MLP width divided by ``tp_size``
    (at least one KV head, replicated when there are fewer than ranks). Unpack a
    :func:`tp_split` result with it."""
    _head_blocks(model_config.num_attention_heads, model_config, tp_size, 0, "q")
    _head_blocks(model_config.num_kv_heads, model_config, tp_size, 0, "kv")
    _even_block(model_config.intermediate_size, tp_size, 0, "intermediate_size")
    local = model_config.copy()
    local.num_attention_heads = model_config.num_attention_heads // tp_size
    local.num_kv_heads = max(1, model_config.num_kv_heads // tp_size)
    local.intermediate_size = model_config.intermediate_size // tp_size
    return local


def _even_block(size: int, tp_size: int, tp_rank: int, what: str) -> slice:
    if size % tp_size:
        raise ValueError(f"{what} ({size}) is not divisible by tp_size ({tp_size})")
    step = size // tp_size
    return slice(tp_rank * step, (tp_rank + 1) * step)


def _head_blocks(
    heads: int, model_config: ModelConfig, tp_size: int, tp_rank: int, what: str
) -> slice:
    head_dim = model_config.head_dim
    if heads % tp_size == 0:
        block = _even_block(heads, tp_size, tp_rank, f"{what} heads")
        return slice(block.start * head_dim, block.stop * head_dim)
    if tp_size % heads == 0:  # fewer heads than ranks: each head is replicated tp/heads times
        head = tp_rank * heads // tp_size
        return slice(head * head_dim, (head + 1) * head_dim)
    raise ValueError(f"{what} heads ({heads}) and tp_size ({tp_size}): one must divide the other")


def _shift(s: slice, offset: int) -> slice:
    return slice(s.start + offset, s.stop + offset)

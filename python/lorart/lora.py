"""LoRA adapters in lorart's (TensorRT-LLM's) tensor format.

An adapter is a pair ``(LoraWeights, LoraConfig)``: config row ``i`` is ``[module_id, layer_idx,
r]`` and weights row ``i`` is ``flatten(A_i [r, Hi]) ++ flatten(B_i [Ho, r])`` zero-padded, with the
PEFT scaling folded into ``B``. This module converts PEFT adapter directories to that format
(:func:`from_peft`), reads and writes TensorRT-LLM's ``.npy`` file pair (:func:`save_npy`,
:func:`load_npy`), splits an adapter for tensor parallelism (:func:`tp_split`) and validates it
against a model (:func:`validate`, implemented in C++).
"""

from __future__ import annotations

import itertools
import json
import math
import os
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
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


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
    for i, row in enumerate(rows):
        if row.A.ndim != 2 or row.B.ndim != 2 or row.A.shape[0] != row.B.shape[1]:
            raise LoraError(
                f"row {i}: A is {list(row.A.shape)} and B is {list(row.B.shape)}; expected "
                "A [r, in] and B [out, r] with the same r"
            )
        for field, value in (("module_id", row.module_id), ("layer_idx", row.layer_idx)):
            if not _INT32_MIN <= value <= _INT32_MAX:
                raise LoraError(f"row {i}: {field} {value} is outside int32")
    lengths = [row.A.size + row.B.size for row in rows]
    table = np.empty((len(rows), 3), dtype=np.int32)
    try:
        packed = np.zeros((len(rows), max(lengths)), dtype=np.float32)
    except MemoryError:
        raise LoraError(
            f"padding {len(rows)} rows to the longest ({max(lengths)} values) needs "
            f"{len(rows) * max(lengths) * 4 / 2**30:.1f} GiB, more than this machine can allocate"
        ) from None
    for i, row in enumerate(rows):
        r = row.A.shape[0]
        table[i] = (row.module_id, row.layer_idx, r)
        packed[i, : row.A.size] = row.A.reshape(-1)
        packed[i, row.A.size : lengths[i]] = row.B.reshape(-1)
    with np.errstate(over="ignore"):
        stored = packed.astype(np_dtype, copy=False)
    if stored is not packed and not np.isfinite(stored).all():
        i, j = np.argwhere(~np.isfinite(stored))[0]
        if np.isfinite(packed[i, j]):
            raise LoraError(
                f"row {i} (module {rows[i].module_id}, layer {rows[i].layer_idx}): value "
                f"{packed[i, j]:g} overflows {dtype}; store the adapter as float32 or bfloat16"
            )
    return LoraWeights(stored), LoraConfig(table)


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
    counts equal; at least one row; each module id known and present in the model;
    ``0 <= layer_idx < num_layers``; ``0 < r <= max_lora_rank``; no (module, layer) twice; rows
    long enough for ``r*Hi + Ho*r`` values; dtype equal to ``dtype`` when given; used values
    finite.
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
    layers_to_transform = cfg["layers_to_transform"]

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
        if layer > _INT32_MAX:
            raise LoraError(f"{adapter_dir}: layer index {layer} of {path!r} is outside int32")
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
        if a.ndim != 2 or b.ndim != 2 or b.shape[1] != a.shape[0] or 0 in (*a.shape, *b.shape):
            raise LoraError(
                f"{adapter_dir}: rank mismatch in {path}: lora_A is {list(a.shape)} and lora_B is "
                f"{list(b.shape)}; expected A [r, in] and B [out, r] with the same r, all >= 1"
            )
        r = a.shape[0]
        key = path.removeprefix("base_model.model.")
        r_cfg = _pattern_value(cfg["rank_pattern"], key, cfg["r"])
        if r_cfg != r:
            raise LoraError(
                f"{adapter_dir}: adapter_config.json gives rank {r_cfg} for {key} "
                f"(r / rank_pattern) but lora_A has {r} rows"
            )
        alpha = float(_pattern_value(cfg["alpha_pattern"], key, cfg["lora_alpha"]))
        scaling = alpha / math.sqrt(r) if cfg["use_rslora"] else alpha / r
        a32 = np.asarray(a, dtype=np.float32)
        with np.errstate(over="ignore", invalid="ignore"):
            b32 = np.asarray(b, dtype=np.float32) * np.float32(scaling)
        for which, values in (("lora_A", a32), ("lora_B", b32)):
            if not np.isfinite(values).all():
                raise LoraError(
                    f"{adapter_dir}: {path}.{which} holds non-finite values"
                    + (f" once scaled by {scaling:g}" if which == "lora_B" else "")
                    + "; LoRA weights must be finite"
                )
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
    for prev, row in itertools.pairwise(rows):
        if (prev.layer_idx, prev.module_id) == (row.layer_idx, row.module_id):
            raise LoraError(
                f"{adapter_dir}: two tensors adapt {LORA_MODULES[row.module_id].name} of layer "
                f"{row.layer_idx}; each (module, layer) may appear once"
            )
    if model_config is not None:
        _check_against_model(rows, model_config, adapter_dir)
    try:
        weights, config = pack(rows, dtype)
        if model_config is not None:
            validate(
                weights, config, model_config, max_lora_rank=_max_rank(config), dtype=np_dtype.name
            )
    except LoraError as err:
        raise LoraError(f"{adapter_dir}: {err}") from None
    return weights, config


def _pattern_value(patterns: dict[re.Pattern, Any], key: str, default: Any) -> Any:
    """PEFT's rule for rank_pattern/alpha_pattern: the first pattern ``p`` with
    ``re.match(rf"(.*\\.)?({p})$", key)`` gives the value; otherwise ``default``."""
    for pattern, value in patterns.items():
        if pattern.match(key):
            return value
    return default


def _read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    """adapter_config.json, checked field by field; ``rank_pattern`` / ``alpha_pattern`` come
    back compiled, ``layers_to_transform`` as a list or None, ``r`` / ``lora_alpha`` defaulted."""
    if not adapter_dir.is_dir():
        raise LoraError(f"adapter directory {adapter_dir} does not exist")
    path = adapter_dir / "adapter_config.json"
    if not path.is_file():
        raise LoraError(f"{adapter_dir}: adapter_config.json not found (is this a PEFT adapter?)")
    try:
        cfg = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError too
        raise LoraError(f"{path}: not valid UTF-8 JSON ({err})") from None
    if not isinstance(cfg, dict):
        raise LoraError(f"{path}: must hold a JSON object, got {type(cfg).__name__}")

    def bad(key: str, expected: str) -> LoraError:
        return LoraError(f"{path}: {key} is {_short(cfg[key])}; expected {expected}")

    def typed(key: str, default: Any, ok, expected: str) -> Any:
        value = cfg.get(key)
        if value is None:
            return default
        if not ok(value):
            raise bad(key, expected)
        return value

    peft_type = typed("peft_type", "LORA", _is_str, "a string").upper()
    if peft_type != "LORA":
        raise LoraError(f"{path}: peft_type {peft_type} is not supported (only LORA)")
    if typed("use_dora", False, _is_bool, "true or false"):
        raise LoraError(f"{path}: DoRA adapters (use_dora=true) are not supported yet")
    if typed("modules_to_save", None, _is_list, "a list of module names or null"):
        raise LoraError(
            f"{path}: modules_to_save {cfg['modules_to_save']} replaces whole base modules; lorart "
            "serves many adapters on one shared base model and cannot swap base weights per request"
        )
    bias = typed("bias", "none", _is_str, "a string")
    if bias != "none":
        raise LoraError(f"{path}: trained biases (bias={bias!r}) are not supported")
    targets = typed(
        "target_modules",
        None,
        lambda v: _is_str(v) or _is_str_list(v),
        "a list of names or a regex",
    )
    if isinstance(targets, list):
        unknown = [t for t in targets if t not in _BY_HF_NAME and t not in _FUSED_HF]
        if unknown:
            raise LoraError(
                f"{path}: target_modules {unknown} have no LoRA module in the Llama family "
                f"(supported: {', '.join(_SUPPORTED_HF)})"
            )
    rank = typed("r", 8, _is_rank, f"an integer in [1, {_INT32_MAX}]")
    alpha = typed("lora_alpha", 8, _is_finite, "a finite number")
    layers = typed(
        "layers_to_transform",
        None,
        lambda v: _is_layer(v) or (_is_list(v) and all(map(_is_layer, v))),
        "a layer index or a list of them",
    )
    if isinstance(layers, int):
        layers = [layers]
    out = dict(cfg)
    out.update(
        r=rank,
        lora_alpha=alpha,
        use_rslora=typed("use_rslora", False, _is_bool, "true or false"),
        target_modules=targets,
        # PEFT applies layers_to_transform only with a list of target names, not with a regex.
        layers_to_transform=layers if isinstance(targets, list) else None,
        rank_pattern=_patterns(path, cfg, "rank_pattern", _is_rank, f"ranks in [1, {_INT32_MAX}]"),
        alpha_pattern=_patterns(path, cfg, "alpha_pattern", _is_finite, "finite numbers"),
    )
    return out


def _patterns(path: Path, cfg: dict[str, Any], key: str, ok, expected: str) -> dict:
    """``{compiled PEFT key regex: value}`` for rank_pattern / alpha_pattern."""
    patterns = cfg.get(key) or {}
    if not isinstance(patterns, dict) or not all(map(ok, patterns.values())):
        raise LoraError(f"{path}: {key} is {_short(patterns)}; expected an object of {expected}")
    out = {}
    for pattern, value in patterns.items():
        try:
            out[re.compile(rf"(.*\.)?({pattern})$")] = value
        except (re.error, RecursionError, OverflowError) as err:
            raise LoraError(f"{path}: {key} key {pattern!r} is not a valid regex ({err})") from None
    return out


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


def _is_bool(v: Any) -> bool:
    return isinstance(v, bool)


def _is_list(v: Any) -> bool:
    return isinstance(v, list)


def _is_str_list(v: Any) -> bool:
    return isinstance(v, list) and all(map(_is_str, v))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_rank(v: Any) -> bool:
    return _is_int(v) and 1 <= v <= _INT32_MAX


def _is_layer(v: Any) -> bool:
    return _is_int(v) and 0 <= v <= _INT32_MAX


def _is_finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# Adapter tensors lorart converts (to float32) without losing anything.
_ADAPTER_DTYPES = (np.dtype(np.float32), np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16))


def _read_adapter_tensors(adapter_dir: Path) -> dict[str, np.ndarray]:
    safetensors_path = adapter_dir / "adapter_model.safetensors"
    bin_path = adapter_dir / "adapter_model.bin"
    if safetensors_path.is_file():
        try:
            return read_safetensors(safetensors_path)
        except ValueError as err:
            raise LoraError(str(err)) from None
    if bin_path.is_file():
        return _read_adapter_bin(bin_path)
    raise LoraError(
        f"{adapter_dir}: no adapter weights (adapter_model.safetensors or adapter_model.bin)"
    )


def _read_adapter_bin(bin_path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as err:
        raise LoraError(
            f"{bin_path}: reading adapter_model.bin needs torch; install torch or save the "
            "adapter as safetensors"
        ) from err
    try:  # weights_only: tensors and containers only, no code runs
        state = torch.load(bin_path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises pickle, zip, EOF and runtime errors for bad files
        raise LoraError(
            f"{bin_path}: not a readable torch state dict ({type(err).__name__}: {err})"
        ) from None
    if not isinstance(state, dict):
        raise LoraError(f"{bin_path}: expected a state dict {{name: tensor}}, got {type(state)}")
    out = {}
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise LoraError(f"{bin_path}: entry {_short(key)} is not a named tensor")
        if value.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise LoraError(
                f"{bin_path}: tensor {key!r} has dtype {value.dtype}; LoRA weights must be "
                "float32, float16 or bfloat16"
            )
        out[key] = value.float().numpy()
    return out


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
        if value.dtype not in _ADAPTER_DTYPES:
            raise LoraError(
                f"{adapter_dir}: tensor {key!r} has dtype {value.dtype}; LoRA weights must be "
                "float32, float16 or bfloat16"
            )
        half = halves.setdefault(match["path"], {})
        if match["which"] in half:
            raise LoraError(
                f"{adapter_dir}: {match['path']} has more than one lora_{match['which']} weight "
                "(several adapters in one file?)"
            )
        half[match["which"]] = value
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
    """Read the TensorRT-LLM file pair (2-D or 3-D) from ``lora_dir``; weights are memory-mapped.

    Each file's header is checked against its size before anything is mapped. Big-endian files
    are converted to native byte order (values preserved, one copy); config values of any
    integer dtype are range-checked before they become int32. Raises :class:`lorart.LoraError`
    naming the file and the field for anything malformed.
    """
    lora_dir = Path(lora_dir)
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        if not (lora_dir / name).is_file():
            raise LoraError(f"{lora_dir}: {name} not found")
    weights_path, config_path = lora_dir / WEIGHTS_FILE, lora_dir / CONFIG_FILE
    values = _read_npy(weights_path)
    if values.dtype.kind == "V" and values.dtype.itemsize == 2 and values.dtype.fields is None:
        values = values.view(ml_dtypes.bfloat16)  # TensorRT-LLM's spelling of bfloat16
    elif values.dtype.kind == "f" and values.dtype.itemsize in (2, 4):
        values = _native(values)
    else:
        raise LoraError(
            f"{weights_path}: dtype {values.dtype.str} is not supported (float32, float16, or "
            "bfloat16 stored as |V2)"
        )
    table = _read_npy(config_path)
    if table.dtype.kind not in "iu":
        raise LoraError(f"{config_path}: expected int32 values, got dtype {table.dtype.str}")
    if table.size:
        out_of_range = (table < _INT32_MIN) | (table > _INT32_MAX)  # exact for 64-bit ints
        if out_of_range.any():
            where = np.unravel_index(np.argmax(out_of_range), table.shape)
            column = ("module_id", "layer_idx", "adapter_size")[where[-1]] if table.ndim else ""
            index = [int(i) for i in where]
            raise LoraError(
                f"{config_path}: {column or 'value'} {table[where]} at index {index} is outside "
                "int32"
            )
    table = table.astype(np.int32)
    try:
        return LoraWeights(values), LoraConfig(table)
    except ValueError as err:
        path = config_path if "lora_config" in str(err) else weights_path
        raise LoraError(f"{path}: {err}") from None


# NumPy's own bound on how much header it parses.
_NPY_MAX_HEADER = 10000
_NPY_HEADER_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
    (3, 0): np.lib.format.read_array_header_2_0,  # 3.0 differs only in allowing utf-8 names
}


def _read_npy(path: Path) -> np.ndarray:
    """Memory-map a ``.npy`` file after checking its header: a plain dtype, a shape of
    non-negative ints, and exactly the bytes that shape needs (so nothing is over-allocated)."""
    with open(path, "rb") as f:
        file_size = os.fstat(f.fileno()).st_size
        try:
            version = np.lib.format.read_magic(f)
            reader = _NPY_HEADER_READERS.get(version)
            if reader is None:
                raise ValueError(f"format version {version} is not supported")
            shape, fortran_order, dtype = reader(f, max_header_size=_NPY_MAX_HEADER)
        except Exception as err:  # numpy's header parser raises ValueError, TokenError, ...
            raise LoraError(f"{path}: not a readable .npy file ({err})") from None
        offset = f.tell()
    if (
        dtype.hasobject
        or dtype.subdtype is not None
        or dtype.fields is not None
        or dtype.kind not in "biufV"
        or dtype.itemsize == 0  # '<U0', '|S0': zero bytes per value would pass any size bound
    ):
        raise LoraError(f"{path}: dtype {dtype} is not a plain numeric dtype")
    if len(shape) > 32 or not all(_is_int(d) and d >= 0 for d in shape):
        raise LoraError(f"{path}: shape {_short(shape)} is not a tuple of non-negative ints")
    if math.prod(max(d, 1) for d in shape) * dtype.itemsize > 2**48:  # numpy cannot shape it
        raise LoraError(f"{path}: shape {list(shape)} is over the 2**48-byte limit")
    nbytes = math.prod(shape) * dtype.itemsize
    if file_size - offset != nbytes:
        raise LoraError(
            f"{path}: holds {file_size - offset} data bytes but its header (shape "
            f"{list(shape)}, dtype {dtype.str}) needs {nbytes}"
        )
    order = "F" if fortran_order else "C"
    if nbytes == 0:
        return np.zeros(shape, dtype=dtype, order=order)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order=order)


def _native(array: np.ndarray) -> np.ndarray:
    """``array`` in native byte order: itself, or a converted copy (values preserved)."""
    return array if array.dtype.isnative else array.astype(array.dtype.newbyteorder("="))


def is_npy_dir(path: str | Path) -> bool:
    """True when ``path`` holds the TensorRT-LLM ``.npy`` pair (as opposed to a PEFT adapter)."""
    return (Path(path) / WEIGHTS_FILE).is_file() and (Path(path) / CONFIG_FILE).is_file()


def load_dir(adapter_dir: str | Path, model_config: ModelConfig) -> tuple[LoraWeights, LoraConfig]:
    """An adapter directory of either kind: the TensorRT-LLM ``.npy`` pair (:func:`load_npy`) or a
    PEFT adapter converted for ``model_config`` (:func:`from_peft`). Not yet validated."""
    if is_npy_dir(adapter_dir):
        return load_npy(adapter_dir)
    return from_peft(adapter_dir, model_config)


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

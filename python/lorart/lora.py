"""LoRA adapters in lorart's (TensorRT-LLM's) tensor format.

An adapter is a pair ``(LoraWeights, LoraConfig)``: config row ``i`` is ``[module_id, layer_idx,
r]`` (or ``[module_id, layer_idx, r, is_dora]``) and weights row ``i`` is ``flatten(A_i [r, Hi]) ++
flatten(B_i [Ho, r])`` (``++ magnitude [Ho]`` for a DoRA row) zero-padded, with the PEFT scaling
folded into ``B``. Embedding-side parts (replacement ``embed_tokens`` / ``lm_head`` tables, LoRA on
them) ride on the weights as :class:`lorart.LoraEmbeddings`. This module converts PEFT adapter
directories to that format (:func:`from_peft`), reads and writes TensorRT-LLM's ``.npy`` file pair
and the parts' files beside it (:func:`save_npy`, :func:`load_npy`), splits an adapter for tensor
parallelism (:func:`tp_split`) and validates it against a model (:func:`validate`, in C++).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np

from lorart import _core
from lorart._core import LoraConfig, LoraEmbeddings, LoraError, LoraWeights, ModelConfig
from lorart._safetensors import read_safetensors

logger = logging.getLogger(__name__)


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
# The embedding-side parts' files beside the pair, one per LoraEmbeddings field (2-D each).
EMBEDDING_PARTS = (
    "embed_tokens",
    "lm_head",
    "embed_lora_a",
    "embed_lora_b",
    "lm_head_lora_a",
    "lm_head_lora_b",
)
EMBEDDING_FILES = {part: f"{part}.npy" for part in EMBEDDING_PARTS}
# Tokenizer files lorart convert copies from the PEFT directory (an extended vocabulary needs its
# own tokenizer).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "added_tokens.json",
    "tokenizer.model",
)
_CONFIG_COLUMNS = ("module_id", "layer_idx", "adapter_size", "is_dora")
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


class LoraRow(NamedTuple):
    """One adapted (module, layer): ``y += (x @ A.T) @ B.T`` with ``A [r, Hi]``, ``B [Ho, r]``."""

    module_id: int
    layer_idx: int
    A: np.ndarray
    B: np.ndarray


class DoraRow(NamedTuple):
    """A DoRA (module, layer): :class:`LoraRow` plus PEFT's ``lora_magnitude_vector`` ``[Ho]``
    (unscaled): ``y = magnitude / ||W + B A||_row * (W x + B A x) + bias``. A separate type so
    that code unpacking a :class:`LoraRow` into four names keeps working."""

    module_id: int
    layer_idx: int
    A: np.ndarray
    B: np.ndarray
    magnitude: np.ndarray


def module_id(name: str) -> int:
    """Module id for a TensorRT-LLM name (``attn_q``) or a Llama-family HF name (``q_proj``)."""
    if name in _BY_NAME:
        return _BY_NAME[name]
    if name in _BY_HF_NAME:
        return _BY_HF_NAME[name]
    raise LoraError(f"unknown LoRA module {name!r} (known: {', '.join(_BY_NAME)})")


# ---------------------------------------------------------------------------------------------
# Packing rows <-> the two tensors


def pack(
    rows: Sequence[LoraRow | DoraRow],
    dtype: str = "float32",
    embeddings: LoraEmbeddings | None = None,
) -> tuple[LoraWeights, LoraConfig]:
    """Build the weights/config pair from rows, in the given order, padding to the longest row.

    A :class:`DoraRow` makes the config 4 columns (``is_dora`` 1 for it, 0 for the others) and
    appends its magnitude to the row. ``embeddings`` are attached to the weights, converted to
    ``dtype``; with them ``rows`` may be empty (an adapter that only replaces tables).
    """
    np_dtype = _np_dtype(dtype)
    if embeddings is not None:
        embeddings = _embeddings_as(embeddings, np_dtype)
    if not rows:
        if embeddings is None:
            raise LoraError("a LoRA adapter needs at least one adapted module")
        return (
            LoraWeights(np.zeros((0, 0), np_dtype), embeddings=embeddings),
            LoraConfig(np.zeros((0, 3), np.int32)),
        )
    dora = any(isinstance(row, DoraRow) for row in rows)
    for i, row in enumerate(rows):
        if row.A.ndim != 2 or row.B.ndim != 2 or row.A.shape[0] != row.B.shape[1]:
            raise LoraError(
                f"row {i}: A is {list(row.A.shape)} and B is {list(row.B.shape)}; expected "
                "A [r, in] and B [out, r] with the same r"
            )
        if isinstance(row, DoraRow) and row.magnitude.shape != (row.B.shape[0],):
            raise LoraError(
                f"row {i}: magnitude is {list(row.magnitude.shape)}; expected [{row.B.shape[0]}] "
                "(one per output feature of B)"
            )
        for field, value in (("module_id", row.module_id), ("layer_idx", row.layer_idx)):
            if not _INT32_MIN <= value <= _INT32_MAX:
                raise LoraError(f"row {i}: {field} {value} is outside int32")
    lengths = [row.A.size + row.B.size + _magnitude_size(row) for row in rows]
    table = np.empty((len(rows), 4 if dora else 3), dtype=np.int32)
    try:
        packed = np.zeros((len(rows), max(lengths)), dtype=np.float32)
    except MemoryError:
        raise LoraError(
            f"padding {len(rows)} rows to the longest ({max(lengths)} values) needs "
            f"{len(rows) * max(lengths) * 4 / 2**30:.1f} GiB, more than this machine can allocate"
        ) from None
    for i, row in enumerate(rows):
        r = row.A.shape[0]
        table[i, :3] = (row.module_id, row.layer_idx, r)
        if dora:
            table[i, 3] = isinstance(row, DoraRow)
        end_b = row.A.size + row.B.size
        packed[i, : row.A.size] = row.A.reshape(-1)
        packed[i, row.A.size : end_b] = row.B.reshape(-1)
        if isinstance(row, DoraRow):
            packed[i, end_b : lengths[i]] = row.magnitude
    with np.errstate(over="ignore"):
        stored = packed.astype(np_dtype, copy=False)
    if stored is not packed and not np.isfinite(stored).all():
        i, j = np.argwhere(~np.isfinite(stored))[0]
        if np.isfinite(packed[i, j]):
            raise LoraError(
                f"row {i} (module {rows[i].module_id}, layer {rows[i].layer_idx}): value "
                f"{packed[i, j]:g} overflows {dtype}; store the adapter as float32 or bfloat16"
            )
    return LoraWeights(stored, embeddings=embeddings), LoraConfig(table)


def _magnitude_size(row: LoraRow | DoraRow) -> int:
    return row.magnitude.size if isinstance(row, DoraRow) else 0


def _embeddings_as(embeddings: LoraEmbeddings, np_dtype: np.dtype) -> LoraEmbeddings:
    """``embeddings`` with every part in ``np_dtype`` (itself when they already are); a part that
    overflows the dtype is refused, naming it; kept-tied tables stay one array."""
    parts = {name: getattr(embeddings, name) for name in EMBEDDING_PARTS}
    if all(v is None or v.dtype == np_dtype for v in parts.values()):
        return embeddings
    out: dict[str, np.ndarray] = {}
    for name, value in parts.items():
        if value is None:
            continue
        if name == "lm_head" and embeddings.lm_head_is_embed_tokens:
            out[name] = out["embed_tokens"]
            continue
        with np.errstate(over="ignore"):
            converted = value.astype(np_dtype)
        if not np.isfinite(converted).all() and np.isfinite(value.astype(np.float32)).all():
            raise LoraError(
                f"{name}: a value overflows {np_dtype.name}; store the adapter as float32 or "
                "bfloat16"
            )
        out[name] = converted
    return LoraEmbeddings(**out)


def unpack(
    weights: LoraWeights, config: LoraConfig, model_config: ModelConfig
) -> list[LoraRow | DoraRow]:
    """Split each row back into ``A [r, Hi]`` and ``B [Ho, r]`` (and a DoRA row's magnitude
    ``[Ho]``), float32 copies, in row order: a :class:`DoraRow` where ``is_dora`` is 1, else a
    :class:`LoraRow`. The embedding-side parts stay on ``weights.embeddings``.

    The model configuration supplies ``Hi``/``Ho``; a row is only self-describing given them.
    """
    validate(weights, config, model_config, max_lora_rank=_max_rank(config, weights))
    values = weights.numpy()
    rows: list[LoraRow | DoraRow] = []
    for i, entry in enumerate(config.numpy().tolist()):
        mid, layer, r = entry[:3]
        hi, ho = model_config.lora_module_dims(mid)
        a = values[i, : r * hi].astype(np.float32).reshape(r, hi)
        b = values[i, r * hi : r * hi + ho * r].astype(np.float32).reshape(ho, r)
        if len(entry) > 3 and entry[3]:
            m = values[i, r * hi + ho * r : r * hi + ho * r + ho].astype(np.float32)
            rows.append(DoraRow(mid, layer, a, b, m))
        else:
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
    counts equal; at least one row or embedding-side parts; each module id known and present in
    the model; ``0 <= layer_idx < num_layers``; ``0 < r <= max_lora_rank``; no (module, layer)
    twice; rows long enough for ``r*Hi + Ho*r`` values (``+ Ho`` for DoRA); dtype equal to
    ``dtype`` when given; used values finite; the embedding-side parts' shapes, ranks and
    vocabulary (at least the model's; both tables when larger).
    """
    _core.validate_lora(weights, config, model_config, max_lora_rank, dtype)


def _max_rank(config: LoraConfig, weights: LoraWeights | None = None) -> int:
    """The largest rank the adapter uses (rows and LoRA on embed_tokens / lm_head), at least 1."""
    ranks = [int(r) for r in config.numpy()[:, 2]]
    parts = weights.embeddings if weights is not None else None
    if parts is not None:
        ranks += [a.shape[0] for a in (parts.embed_lora_a, parts.lm_head_lora_a) if a is not None]
    return max([1, *ranks])


def _np_dtype(dtype: str) -> np.dtype:
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_FLOAT_DTYPES)}; got {dtype!r}")
    return _FLOAT_DTYPES[dtype]


# ---------------------------------------------------------------------------------------------
# PEFT adapter directories

_LORA_KEY = re.compile(r"(?P<path>.+)\.lora_(?P<which>A|B)(?:\.(?P<adapter>[^.]+))?\.weight")
_EMBED_LORA_KEY = re.compile(
    r"(?P<path>.+)\.lora_embedding_(?P<which>A|B)(?:\.(?P<adapter>[^.]+))?"
)
_MAGNITUDE_KEY = re.compile(
    r"(?P<path>.+)\.lora_magnitude_vector(?:\.(?P<adapter>[^.]+))?(?:\.weight)?"
)
# Whole tables of embed_tokens / lm_head: PEFT's modules_to_save copy (``modules_to_save[.name]``),
# or the frozen base table it saves beside the adapter (plain, ``base_layer``,
# ``original_module``) when the vocabulary was resized or the module carries LoRA.
_TABLE_KEY = re.compile(
    r"(?:(?P<prefix>.+)\.)?(?P<name>embed_tokens|lm_head)"
    r"(?:\.(?P<kind>modules_to_save(?:\.[^.]+)?|original_module|base_layer))?\.weight"
)
_TABLES = ("embed_tokens", "lm_head")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def from_peft(
    adapter_dir: str | Path, model_config: ModelConfig | None = None, dtype: str = "float32"
) -> tuple[LoraWeights, LoraConfig]:
    """Convert a PEFT LoRA adapter directory to ``(LoraWeights, LoraConfig)``.

    Reads ``adapter_config.json`` and ``adapter_model.safetensors`` (or ``adapter_model.bin``,
    which needs torch). Honours ``r``, ``lora_alpha``, ``use_rslora``, ``rank_pattern``,
    ``alpha_pattern``, ``target_modules``, ``layers_to_transform``, ``use_dora``,
    ``modules_to_save`` (``embed_tokens`` / ``lm_head`` only) and ``ensure_weight_tying``; maps HF
    projections to module ids as TensorRT-LLM does (``gate_proj`` -> ``mlp_h_to_4h`` 5,
    ``up_proj`` -> ``mlp_gate`` 7), splits a fused ``gate_up_proj`` (and its DoRA magnitude) into
    those two, folds the scaling into ``B`` and pads rows. Rows are ordered by layer, then module
    id.

    The embedding side comes back on ``weights.embeddings`` (:class:`lorart.LoraEmbeddings`), as
    PEFT's unmerged forward computes it: ``modules_to_save`` tables replace the model's;
    ``lora_embedding_A/B`` and ``lm_head``'s ``lora_A/B`` become ``embed_lora_*`` /
    ``lm_head_lora_*`` (scaling in ``B``); the frozen base tables PEFT saves beside an adapter are
    kept only when their vocabulary differs from the model's (with ``model_config``; without it,
    they are kept). Identical ``embed_tokens`` and ``lm_head`` tables become one array (kept
    tied); a tied base (``tie_word_embeddings``) whose adapter ties with ``ensure_weight_tying``
    but saved only ``embed_tokens`` gets that table as ``lm_head`` too. With ``model_config``
    every shape is checked against the model.
    """
    np_dtype = _np_dtype(dtype)
    adapter_dir = Path(adapter_dir)
    cfg = _read_adapter_config(adapter_dir)
    found = _adapter_parts(_read_adapter_tensors(adapter_dir), adapter_dir)
    layers_to_transform = cfg["layers_to_transform"]
    magnitudes = dict(found.magnitudes)

    rows: list[LoraRow | DoraRow] = []
    parts: dict[str, np.ndarray] = {}
    for path, (a, b) in sorted(found.pairs.items()):
        leaf = path.rsplit(".", 1)[-1]
        magnitude = magnitudes.pop(path, None)
        match = _LAYER.search(path)
        if match is None and leaf == "lm_head":
            if magnitude is not None:
                raise LoraError(f"{adapter_dir}: DoRA on lm_head ({path}) is not supported")
            parts["lm_head_lora_a"], parts["lm_head_lora_b"] = _scaled_pair(
                adapter_dir, cfg, path, a, b
            )
            continue
        if match is None:
            raise LoraError(
                f"{adapter_dir}: LoRA on {path!r} is outside the decoder layers; lorart adapts "
                f"the per-layer projections ({', '.join(_SUPPORTED_HF)}), embed_tokens and "
                "lm_head"
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
        a32, b32 = _scaled_pair(adapter_dir, cfg, path, a, b)
        m32 = _checked_magnitude(adapter_dir, cfg, path, magnitude, b32.shape[0])
        names = _FUSED_HF.get(leaf, (leaf,))
        if b32.shape[0] % len(names):
            raise LoraError(
                f"{adapter_dir}: {path}: lora_B rows {b32.shape[0]} do not split "
                f"evenly into {', '.join(names)}"
            )
        b_parts = np.split(b32, len(names))
        m_parts = np.split(m32, len(names)) if m32 is not None else [None] * len(names)
        for name, b_part, m_part in zip(names, b_parts, m_parts, strict=True):
            if m_part is None:
                rows.append(LoraRow(_BY_HF_NAME[name], layer, a32, b_part))
            else:
                rows.append(DoraRow(_BY_HF_NAME[name], layer, a32, b_part, m_part))

    for path, (a, b) in sorted(found.embed_pairs.items()):
        if path.rsplit(".", 1)[-1] != "embed_tokens" or _LAYER.search(path):
            raise LoraError(
                f"{adapter_dir}: LoRA embedding {path!r} is not the model's embed_tokens"
            )
        if magnitudes.pop(path, None) is not None:
            raise LoraError(f"{adapter_dir}: DoRA on embed_tokens ({path}) is not supported")
        if "embed_lora_a" in parts:
            raise LoraError(f"{adapter_dir}: more than one LoRA on embed_tokens ({path})")
        # PEFT's lora_embedding_A is [r, V] and lora_embedding_B [H, r]: A [r, in], B [out, r].
        parts["embed_lora_a"], parts["embed_lora_b"] = _scaled_pair(adapter_dir, cfg, path, a, b)
    for path in sorted(magnitudes):
        raise LoraError(
            f"{adapter_dir}: {path} has a lora_magnitude_vector (DoRA) but no lora_A / lora_B"
        )
    if not rows and not parts and not found.tables:
        raise LoraError(f"{adapter_dir}: the adapter holds no LoRA weights")

    rows.sort(key=lambda row: (row.layer_idx, row.module_id))
    for prev, row in itertools.pairwise(rows):
        if (prev.layer_idx, prev.module_id) == (row.layer_idx, row.module_id):
            raise LoraError(
                f"{adapter_dir}: two tensors adapt {LORA_MODULES[row.module_id].name} of layer "
                f"{row.layer_idx}; each (module, layer) may appear once"
            )
    parts.update(_replacement_tables(found.tables, cfg, model_config, adapter_dir))
    if model_config is not None:
        _check_against_model(rows, model_config, adapter_dir)
    try:
        embeddings = LoraEmbeddings(**parts) if parts else None
        weights, config = pack(rows, dtype, embeddings)
        if model_config is not None:
            validate(
                weights,
                config,
                model_config,
                max_lora_rank=_max_rank(config, weights),
                dtype=np_dtype.name,
            )
    except LoraError as err:
        raise LoraError(f"{adapter_dir}: {err}") from None
    if not rows and not parts:
        raise LoraError(
            f"{adapter_dir}: the adapter holds only copies of the base model's embed_tokens / "
            "lm_head; there is nothing to adapt"
        )
    return weights, config


def _scaled_pair(
    adapter_dir: Path, cfg: dict[str, Any], path: str, a: np.ndarray, b: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``(A, B * scaling)`` as float32, the rank checked against ``r`` / ``rank_pattern`` and the
    scaling from ``lora_alpha`` / ``alpha_pattern`` / ``use_rslora`` (PEFT's rules)."""
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
    return a32, b32


def _checked_magnitude(
    adapter_dir: Path, cfg: dict[str, Any], path: str, magnitude: np.ndarray | None, out: int
) -> np.ndarray | None:
    """The DoRA magnitude of ``path`` as float32 ``[out]``, or None for a plain LoRA module;
    ``use_dora`` and the tensors must agree."""
    if magnitude is None:
        if cfg["use_dora"]:
            raise LoraError(
                f"{adapter_dir}: use_dora is true but {path} has no lora_magnitude_vector"
            )
        return None
    if not cfg["use_dora"]:
        raise LoraError(
            f"{adapter_dir}: {path} has a lora_magnitude_vector (DoRA) but adapter_config.json "
            "has use_dora false"
        )
    if magnitude.shape != (out,):
        raise LoraError(
            f"{adapter_dir}: {path}.lora_magnitude_vector is {list(magnitude.shape)}; expected "
            f"[{out}] (one per output feature, as lora_B's rows)"
        )
    m32 = np.asarray(magnitude, dtype=np.float32)
    if not np.isfinite(m32).all():
        raise LoraError(
            f"{adapter_dir}: {path}.lora_magnitude_vector holds non-finite values; DoRA "
            "magnitudes must be finite"
        )
    return m32


def _replacement_tables(
    tables: dict[str, dict[str, np.ndarray]],
    cfg: dict[str, Any],
    model_config: ModelConfig | None,
    adapter_dir: Path,
) -> dict[str, np.ndarray]:
    """``{"embed_tokens" | "lm_head": [V, H] float32}``: the tables that replace the model's.

    A table listed in ``modules_to_save`` is PEFT's trained copy (``modules_to_save`` key, else
    the plain one). Any other table in the file is the base's own, frozen, which PEFT saves when
    the vocabulary was resized (``save_embedding_layers``) or the module carries LoRA
    (``base_layer``): it only matters when its vocabulary is not the model's.
    """
    trained = set(cfg["modules_to_save"])
    if cfg["ensure_weight_tying"] and "embed_tokens" in trained:
        trained.add("lm_head")  # PEFT's modules_to_tie: lm_head shares the trained copy, if saved
    base_vocab = model_config.vocab_size if model_config is not None else None
    out: dict[str, np.ndarray] = {}
    for name in _TABLES:
        kinds = tables.get(name, {})
        if name in trained:
            table = kinds.get("modules_to_save", kinds.get("weight"))
            if table is None and name not in cfg["modules_to_save"]:
                pass  # lm_head tied by ensure_weight_tying but not saved: the tie rule below
            elif table is None:
                raise LoraError(
                    f"{adapter_dir}: modules_to_save lists {name} but the adapter holds no {name} "
                    f"table (expected a key like base_model.model...{name}.weight)"
                )
        else:
            if "modules_to_save" in kinds:
                raise LoraError(
                    f"{adapter_dir}: the adapter holds a modules_to_save table for {name} but "
                    f"adapter_config.json's modules_to_save is {sorted(trained) or None}"
                )
            table = kinds.get("weight", kinds.get("base_layer", kinds.get("original_module")))
            if table is None or table.ndim != 2:
                pass  # refused below, naming its shape
            elif base_vocab is not None and table.shape[0] == base_vocab:
                table = None  # the base model's own table: nothing to replace
            elif base_vocab is None:
                logger.warning(
                    "%s: keeping the %s table PEFT saved beside the adapter (%s): without "
                    "the model's config it cannot be told from a resized one; pass the model "
                    "config (lorart convert --model_dir) to drop the base model's own table",
                    adapter_dir,
                    name,
                    list(table.shape),
                )
        if table is None:
            continue
        if table.ndim != 2 or 0 in table.shape:
            raise LoraError(
                f"{adapter_dir}: the {name} table is {list(table.shape)}; expected [V, hidden_size]"
            )
        table32 = np.asarray(table, dtype=np.float32)
        if not np.isfinite(table32).all():
            raise LoraError(f"{adapter_dir}: the {name} table holds non-finite values")
        out[name] = table32
    embed, head = out.get("embed_tokens"), out.get("lm_head")
    if embed is not None and head is not None and np.array_equal(embed, head):
        out["lm_head"] = embed  # one array: kept tied (stored once)
    elif (
        embed is not None
        and head is None
        and model_config is not None
        and model_config.tie_word_embeddings
        and (cfg["ensure_weight_tying"] or "embed_tokens" not in cfg["modules_to_save"])
    ):
        # A tied base's lm_head is its embedding table: PEFT ties the trained copy to it under
        # ensure_weight_tying, and a resized base table replaces both.
        out["lm_head"] = embed
    return out


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
    use_dora = typed("use_dora", False, _is_bool, "true or false")
    to_save = typed("modules_to_save", None, _is_str_list, "a list of module names or null") or []
    others = [m for m in to_save if m.rsplit(".", 1)[-1] not in _TABLES]
    if others:
        raise LoraError(
            f"{path}: modules_to_save entries {others} replace whole base modules; lorart "
            "replaces only embed_tokens and lm_head per request"
        )
    if typed("trainable_token_indices", None, lambda v: True, "") is not None:
        raise LoraError(
            f"{path}: trainable_token_indices (PEFT's trainable tokens) is not supported; save "
            "embed_tokens in modules_to_save instead"
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
        # PEFT matches a listed name against the end of a module path ("model.embed_tokens").
        known = {*_BY_HF_NAME, *_FUSED_HF, *_TABLES}
        unknown = [t for t in targets if t.rsplit(".", 1)[-1] not in known]
        if unknown:
            raise LoraError(
                f"{path}: target_modules {unknown} have no LoRA module in the Llama family "
                f"(supported: {', '.join([*_SUPPORTED_HF, *_TABLES])})"
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
        use_dora=use_dora,
        modules_to_save={m.rsplit(".", 1)[-1] for m in to_save},
        ensure_weight_tying=typed("ensure_weight_tying", False, _is_bool, "true or false"),
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


class _FoundParts(NamedTuple):
    """An adapter file's tensors by role (float arrays as read)."""

    pairs: dict[str, tuple[np.ndarray, np.ndarray]]  # module path -> (lora_A, lora_B)
    embed_pairs: dict[str, tuple[np.ndarray, np.ndarray]]  # -> (lora_embedding_A, _B)
    magnitudes: dict[str, np.ndarray]  # module path -> lora_magnitude_vector
    tables: dict[str, dict[str, np.ndarray]]  # embed_tokens | lm_head -> {kind: table}


def _adapter_parts(tensors: dict[str, np.ndarray], adapter_dir: Path) -> _FoundParts:
    halves: dict[str, dict[str, np.ndarray]] = {}
    embed_halves: dict[str, dict[str, np.ndarray]] = {}
    magnitudes: dict[str, np.ndarray] = {}
    tables: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        if value.dtype not in _ADAPTER_DTYPES:
            raise LoraError(
                f"{adapter_dir}: tensor {key!r} has dtype {value.dtype}; LoRA weights must be "
                "float32, float16 or bfloat16"
            )
        if match := _MAGNITUDE_KEY.fullmatch(key):
            if match["path"] in magnitudes:
                raise LoraError(
                    f"{adapter_dir}: {match['path']} has more than one lora_magnitude_vector "
                    "(several adapters in one file?)"
                )
            magnitudes[match["path"]] = value
            continue
        if match := _EMBED_LORA_KEY.fullmatch(key):
            target, which = embed_halves, f"embedding_{match['which']}"
        elif match := _LORA_KEY.fullmatch(key):
            target, which = halves, match["which"]
        elif (match := _TABLE_KEY.fullmatch(key)) and not _LAYER.search(key):
            kind = (match["kind"] or "weight").split(".")[0]
            by_kind = tables.setdefault(match["name"], {})
            if kind in by_kind:
                raise LoraError(
                    f"{adapter_dir}: more than one {kind} table for {match['name']} ({key}; "
                    "several adapters in one file?)"
                )
            by_kind[kind] = value
            continue
        else:
            raise LoraError(f"{adapter_dir}: unexpected tensor {key!r} in a LoRA adapter")
        half = target.setdefault(match["path"], {})
        if match["which"] in half:
            raise LoraError(
                f"{adapter_dir}: {match['path']} has more than one lora_{which} weight "
                "(several adapters in one file?)"
            )
        half[match["which"]] = value

    def complete(found: dict[str, dict[str, np.ndarray]], prefix: str) -> dict:
        out = {}
        for path, half in found.items():
            if set(half) != {"A", "B"}:
                missing = prefix + ("B" if "A" in half else "A")
                raise LoraError(f"{adapter_dir}: {path} has no {missing} weight")
            out[path] = (half["A"], half["B"])
        return out

    return _FoundParts(
        complete(halves, "lora_"), complete(embed_halves, "lora_embedding_"), magnitudes, tables
    )


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


def save_npy(out_dir: str | Path, weights: LoraWeights, config: LoraConfig) -> list[Path]:
    """Write ``model.lora_weights.npy`` ``[1, rows, max_row]`` and ``model.lora_config.npy``
    ``[1, rows, 3 or 4]`` int32, as TensorRT-LLM's ``hf_lora_convert.py`` does (bfloat16 is
    stored as 2-byte void ``|V2``, TensorRT-LLM's spelling), plus one 2-D ``<part>.npy`` per
    embedding-side part the weights carry (:data:`EMBEDDING_FILES`; kept-tied tables are written
    as both ``embed_tokens.npy`` and ``lm_head.npy`` and load back tied). Returns the paths
    written, in order."""
    if weights.num_rows != config.num_rows:
        raise LoraError(
            f"lora_weights has {weights.num_rows} rows but lora_config has {config.num_rows}"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / WEIGHTS_FILE, out_dir / CONFIG_FILE]
    np.save(written[0], _npy_view(weights.numpy())[None])
    np.save(written[1], config.numpy()[None])
    parts = weights.embeddings
    for part in EMBEDDING_PARTS:
        value = getattr(parts, part) if parts is not None else None
        path = out_dir / EMBEDDING_FILES[part]
        if value is None:
            path.unlink(missing_ok=True)  # a stale part from an earlier adapter would be read back
            continue
        np.save(path, _npy_view(value))
        written.append(path)
    return written


def _npy_view(values: np.ndarray) -> np.ndarray:
    return values.view(np.dtype("V2")) if values.dtype == ml_dtypes.bfloat16 else values


def load_npy(lora_dir: str | Path) -> tuple[LoraWeights, LoraConfig]:
    """Read the TensorRT-LLM file pair (2-D or 3-D) from ``lora_dir``, and the embedding-side
    parts' files beside it (:data:`EMBEDDING_FILES`, 2-D each); weights are memory-mapped.

    Each file's header is checked against its size before anything is mapped. Big-endian files
    are converted to native byte order (values preserved, one copy); config values of any
    integer dtype are range-checked before they become int32. ``embed_tokens.npy`` and
    ``lm_head.npy`` with identical contents load as one table (kept tied). Raises
    :class:`lorart.LoraError` naming the file and the field for anything malformed.
    """
    lora_dir = Path(lora_dir)
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        if not (lora_dir / name).is_file():
            raise LoraError(f"{lora_dir}: {name} not found")
    weights_path, config_path = lora_dir / WEIGHTS_FILE, lora_dir / CONFIG_FILE
    values = _float_npy(weights_path)
    table = _read_npy(config_path)
    if table.dtype.kind not in "iu":
        raise LoraError(f"{config_path}: expected int32 values, got dtype {table.dtype.str}")
    if table.size:
        out_of_range = (table < _INT32_MIN) | (table > _INT32_MAX)  # exact for 64-bit ints
        if out_of_range.any():
            where = np.unravel_index(np.argmax(out_of_range), table.shape)
            column = _CONFIG_COLUMNS[where[-1]] if table.ndim and where[-1] < 4 else ""
            index = [int(i) for i in where]
            raise LoraError(
                f"{config_path}: {column or 'value'} {table[where]} at index {index} is outside "
                "int32"
            )
    table = table.astype(np.int32)
    parts: dict[str, np.ndarray] = {}
    for part in EMBEDDING_PARTS:
        path = lora_dir / EMBEDDING_FILES[part]
        if not path.is_file():
            continue
        value = _float_npy(path)
        if value.ndim != 2:
            raise LoraError(f"{path}: expected a 2-D array, got shape {list(value.shape)}")
        parts[part] = value
    embed, head = parts.get("embed_tokens"), parts.get("lm_head")
    if (
        embed is not None
        and head is not None
        and embed.dtype == head.dtype
        and embed.shape == head.shape
        and _same_bits(embed, head)
    ):
        parts["lm_head"] = embed  # one table: kept tied
    try:
        embeddings = LoraEmbeddings(**parts) if parts else None
    except ValueError as err:
        raise LoraError(f"{lora_dir}: {err}") from None
    try:
        return LoraWeights(values, embeddings=embeddings), LoraConfig(table)
    except ValueError as err:
        path = config_path if "lora_config" in str(err) else weights_path
        raise LoraError(f"{path}: {err}") from None


def _float_npy(path: Path) -> np.ndarray:
    """A float32 / float16 / bfloat16 (``|V2``) ``.npy`` file, memory-mapped, native order."""
    values = _read_npy(path)
    if values.dtype.kind == "V" and values.dtype.itemsize == 2 and values.dtype.fields is None:
        return values.view(ml_dtypes.bfloat16)  # TensorRT-LLM's spelling of bfloat16
    if values.dtype.kind == "f" and values.dtype.itemsize in (2, 4):
        return _native(values)
    raise LoraError(
        f"{path}: dtype {values.dtype.str} is not supported (float32, float16, or "
        "bfloat16 stored as |V2)"
    )


def _bits(values: np.ndarray) -> np.ndarray:
    return values.view(np.dtype(f"u{values.dtype.itemsize}"))


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


def _same_bits(a: np.ndarray, b: np.ndarray, rows: int = 4096) -> bool:
    """Bitwise equality of two same-shape 2-D tables, a block of rows at a time: memory-mapped
    tables of a 13B model are 283 M values each, and most pairs differ in their first rows."""
    return all(
        np.array_equal(_bits(a[i : i + rows]), _bits(b[i : i + rows]))
        for i in range(0, a.shape[0], rows)
    )


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
    if weights.embeddings is not None:
        raise LoraError(
            "the adapter brings embedding-side parts (embed_tokens / lm_head tables or LoRA on "
            "them); splitting them for tensor parallelism is not supported yet"
        )
    if config.num_columns == 4 and config.numpy()[:, 3].any():
        # DoRA's per-output-row norm needs whole rows of W + B A, which column blocks split.
        raise LoraError(
            "the adapter has DoRA rows (is_dora = 1); splitting DoRA for tensor parallelism is not "
            "supported yet"
        )
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

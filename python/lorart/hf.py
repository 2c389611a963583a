"""Hugging Face checkpoint directories -> :class:`lorart.ModelConfig` and checked tensor lists.

Reads both spellings of the rotary settings: the older top-level ``rope_theta`` /
``rope_scaling`` keys (real checkpoints) and transformers v5's ``rope_parameters`` dict.
Every field is checked for its type and range; a bad ``config.json`` raises ``ValueError`` naming
the file, the field, what it holds and what was expected. :func:`check_checkpoint` compares the
safetensors headers with what the config implies before a single weight is allocated.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

from lorart._core import ModelConfig, RopeScaling
from lorart._safetensors import TensorInfo, read_index

# model_type -> architecture, for configs that omit "architectures".
_MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
# Upper bounds on the size fields: token ids and positions are int32 in the kernels; the others
# are generous (real models stay below 2^17) yet keep every product of sizes far inside int64.
MAX_VOCAB_SIZE = 2**31 - 1
MAX_POSITIONS = 2**31 - 1
MAX_WIDTH = 2**20  # hidden_size, intermediate_size
MAX_COUNT = 2**16  # num_hidden_layers, heads, head_dim
_MISSING = object()


class _Fields:
    """Typed, range-checked reads of one JSON object; errors name ``source`` and the key."""

    def __init__(self, d: dict[str, Any], source: str, prefix: str = "") -> None:
        self.d, self.source, self.prefix = d, source, prefix

    def _fail(self, key: str, value: Any, expected: str) -> NoReturn:
        shown = "null" if value is None else _short(value)
        raise ValueError(f"{self.source}: {self.prefix}{key} is {shown}; expected {expected}")

    def get(self, key: str, default: Any, expected: str) -> Any:
        """The value, or ``_MISSING`` when the key is absent or null and has a ``default``; a
        required key (``default is _MISSING``) that is absent or null is an error saying which."""
        value = self.d.get(key, _MISSING)
        if value is _MISSING or value is None:
            if default is not _MISSING:
                return _MISSING
            if value is _MISSING:
                raise ValueError(
                    f"{self.source}: missing required key {self.prefix}{key} (expected {expected})"
                )
            self._fail(key, value, expected)
        return value

    def integer(self, key: str, default: Any = _MISSING, lo: int = 1, hi: int = MAX_COUNT) -> int:
        expected = f"an integer in [{lo}, {hi}]"
        value = self.get(key, default, expected)
        if value is _MISSING:
            return default
        if not _is_int(value) or not lo <= value <= hi:
            self._fail(key, value, expected)
        return value

    def number(self, key: str, default: Any = _MISSING) -> float:
        expected = "a finite number > 0"
        value = self.get(key, default, expected)
        if value is _MISSING:
            return float(default)
        if not _is_number(value) or not (math.isfinite(value) and value > 0):
            self._fail(key, value, expected)
        return float(value)

    def boolean(self, key: str, default: bool) -> bool:
        value = self.get(key, default, "true or false")
        if value is _MISSING:
            return default
        if not isinstance(value, bool):
            self._fail(key, value, "true or false")
        return value

    def string(self, key: str, default: Any = _MISSING) -> str:
        value = self.get(key, default, "a string")
        if value is _MISSING:
            return default
        if not isinstance(value, str):
            self._fail(key, value, "a string")
        return value

    def mapping(self, key: str) -> dict[str, Any] | None:
        value = self.d.get(key)
        if value is not None and not isinstance(value, dict):
            self._fail(key, value, "an object (or null)")
        return value


def _short(value: Any) -> str:
    """``value`` as JSON spells it (``null``, ``true``, ``"text"``), cut to 60 characters."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def load_config(model_dir: str | Path) -> ModelConfig:
    """Read ``config.json`` from an HF checkpoint directory (or the file itself).

    Raises ``FileNotFoundError`` when there is no config, ``ValueError`` naming the file and the
    field when the JSON is malformed or a field is missing, null where a value is required, of
    the wrong type, out of range or inconsistent (head counts), or unsupported (architecture,
    rope type, dtype).
    """
    path = Path(model_dir)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json at {path}")
    return config_from_dict(_read_json(path), source=str(path))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError too
        raise ValueError(f"{path}: not valid UTF-8 JSON ({err})") from None


def config_from_dict(d: dict[str, Any], source: str = "config") -> ModelConfig:
    """Build and validate a :class:`ModelConfig` from a parsed HF ``config.json``.

    Absent and ``null`` optional keys take their transformers defaults (``num_key_value_heads``:
    ``num_attention_heads``; ``head_dim``: ``hidden_size / num_attention_heads``;
    ``rms_norm_eps``: 1e-6; ``max_position_embeddings``: 2048; ``rope_theta``: 10000).
    """
    if not isinstance(d, dict):
        raise ValueError(f"{source}: must hold a JSON object, got {type(d).__name__}")
    f = _Fields(d, source)
    arch = _architecture(d, f)
    cfg = ModelConfig()
    cfg.architecture = arch
    cfg.vocab_size = f.integer("vocab_size", hi=MAX_VOCAB_SIZE)
    cfg.hidden_size = f.integer("hidden_size", hi=MAX_WIDTH)
    cfg.intermediate_size = f.integer("intermediate_size", hi=MAX_WIDTH)
    cfg.num_layers = f.integer("num_hidden_layers")
    heads = f.integer("num_attention_heads")
    kv_heads = f.integer("num_key_value_heads", heads)
    if heads % kv_heads:
        raise ValueError(
            f"{source}: num_attention_heads ({heads}) must be a multiple of num_key_value_heads "
            f"({kv_heads})"
        )
    if d.get("head_dim") is None and cfg.hidden_size % heads:
        raise ValueError(
            f"{source}: hidden_size ({cfg.hidden_size}) is not divisible by num_attention_heads "
            f"({heads}) and there is no head_dim"
        )
    cfg.num_attention_heads = heads
    cfg.num_kv_heads = kv_heads
    cfg.head_dim = f.integer("head_dim", cfg.hidden_size // heads)
    if cfg.head_dim % 2:
        raise ValueError(f"{source}: head_dim ({cfg.head_dim}) must be even for rotary embeddings")
    cfg.max_position_embeddings = f.integer("max_position_embeddings", 2048, hi=MAX_POSITIONS)
    cfg.rms_norm_eps = f.number("rms_norm_eps", 1e-6)
    cfg.tie_word_embeddings = f.boolean("tie_word_embeddings", False)
    # Qwen2 always has q/k/v biases; Llama exposes the choice as attention_bias.
    attention_bias = f.boolean("attention_bias", False)
    cfg.attention_bias = arch == "Qwen2ForCausalLM" or attention_bias
    cfg.sliding_window = _sliding_window(f, arch)
    dtype_key = "torch_dtype" if d.get("torch_dtype") is not None else "dtype"
    cfg.dtype = _dtype(f.string(dtype_key, "float32"), source, dtype_key)
    cfg.rope_theta, cfg.rope_scaling = _rope(d, f)
    cfg.bos_token_id = f.integer("bos_token_id", -1, lo=0, hi=MAX_VOCAB_SIZE)
    cfg.eos_token_ids = _eos_ids(d, f)
    try:
        cfg.validate()
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from None
    return cfg


def _architecture(d: dict[str, Any], f: _Fields) -> str:
    archs = d.get("architectures")
    if archs is not None and (
        not isinstance(archs, list) or not all(isinstance(a, str) for a in archs)
    ):
        f._fail("architectures", archs, "a list of strings")
    if archs:
        arch = archs[0]
    else:
        model_type = f.string("model_type", "")
        arch = _MODEL_TYPES.get(model_type, model_type)
    supported = ModelConfig.supported_architectures
    if arch not in supported:
        raise ValueError(
            f"{f.source}: architecture {arch!r} is not supported (supported: "
            f"{', '.join(supported)})"
        )
    return arch


def _eos_ids(d: dict[str, Any], f: _Fields) -> list[int]:
    eos = d.get("eos_token_id")
    if eos is None:
        return []
    ids = eos if isinstance(eos, list) else [eos]
    if not all(_is_int(e) and 0 <= e <= MAX_VOCAB_SIZE for e in ids):
        f._fail("eos_token_id", eos, f"a token id or a list of token ids in [0, {MAX_VOCAB_SIZE}]")
    return ids


def _rope(d: dict[str, Any], f: _Fields) -> tuple[float, RopeScaling]:
    """theta and scaling from transformers v5's rope_parameters when present, else from the
    top-level rope_theta / rope_scaling."""
    params = f.mapping("rope_parameters")
    if params is not None:
        scaling = _Fields(params, f.source, "rope_parameters.")
        theta = scaling.number("rope_theta", f.number("rope_theta", 10000.0))
    else:
        theta = f.number("rope_theta", 10000.0)
        scaling = _Fields(f.mapping("rope_scaling") or {}, f.source, "rope_scaling.")
    rope = RopeScaling()
    type_key = "rope_type" if scaling.d.get("rope_type") is not None else "type"
    rope_type = scaling.string(type_key, "default")
    # Checked before it reaches C++: JSON can spell strings (lone surrogates) that are not UTF-8.
    if rope_type not in ("default", "linear", "llama3"):
        raise ValueError(
            f"{f.source}: {scaling.prefix}{type_key} {rope_type!r} is not supported "
            "(supported: default, linear, llama3)"
        )
    rope.rope_type = rope_type
    if rope.rope_type != "default":
        rope.factor = scaling.number("factor")
    if rope.rope_type == "llama3":
        rope.low_freq_factor = scaling.number("low_freq_factor")
        rope.high_freq_factor = scaling.number("high_freq_factor")
        rope.original_max_position_embeddings = scaling.integer(
            "original_max_position_embeddings", hi=MAX_POSITIONS
        )
        if not rope.high_freq_factor > rope.low_freq_factor:
            raise ValueError(
                f"{f.source}: {scaling.prefix}high_freq_factor ({rope.high_freq_factor}) must be "
                f"> low_freq_factor ({rope.low_freq_factor})"
            )
    return theta, rope


def _sliding_window(f: _Fields, arch: str) -> int:
    window = f.integer("sliding_window", 0, lo=0, hi=MAX_POSITIONS)
    use = f.boolean("use_sliding_window", False)
    if arch == "Qwen2ForCausalLM" and not use:
        return 0
    return window


def _dtype(name: str, source: str, key: str) -> str:
    name = name.removeprefix("torch.")
    if name not in ("float32", "float16", "bfloat16"):
        raise ValueError(
            f"{source}: {key} {name!r} is not supported (supported: float32, float16, bfloat16)"
        )
    return name


# ---------------------------------------------------------------------------------------------
# Checkpoint files

INDEX_FILE = "model.safetensors.index.json"


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of an HF checkpoint: ``model.safetensors`` or the shards listed in
    ``model.safetensors.index.json``.

    Raises ``FileNotFoundError`` for missing files and ``ValueError`` for a malformed index
    (not an object with a ``weight_map`` of names to plain file names in the directory).
    """
    return sorted(set(_weight_map(Path(model_dir)).values()))


def _weight_map(model_dir: Path) -> dict[str, Path]:
    """``{tensor name: shard}`` from the index, or ``{"": model.safetensors}`` without one."""
    index = model_dir / INDEX_FILE
    if index.is_file():
        data = _read_json(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(
                f"{index}: expected an object with a non-empty 'weight_map' {{tensor: file}}"
            )
        for name, shard in weight_map.items():
            # A shard is a plain file beside the index: never a path out of the directory.
            if not isinstance(shard, str) or shard in ("", ".", "..") or Path(shard).name != shard:
                raise ValueError(
                    f"{index}: weight_map[{name!r}] is {_short(shard)}; expected the file name of "
                    "a shard in the same directory"
                )
        missing = sorted({s for s in weight_map.values() if not (model_dir / s).is_file()})
        if missing:
            raise FileNotFoundError(
                f"{model_dir}: shard(s) listed in the index are missing: {', '.join(missing)}"
            )
        return {name: model_dir / shard for name, shard in weight_map.items()}
    single = model_dir / "model.safetensors"
    if single.is_file():
        return {"": single}
    raise FileNotFoundError(
        f"{model_dir}: no model.safetensors or {INDEX_FILE} (lorart reads "
        "safetensors checkpoints; re-save a .bin checkpoint with save_pretrained)"
    )


# Checkpoint entries that carry no parameters of the model (recomputed buffers).
_SKIPPED_SUFFIXES = ("rotary_emb.inv_freq",)
_WEIGHT_DTYPES = ("F32", "F16", "BF16")


class _Expected(NamedTuple):
    required: dict[str, tuple[int, ...]]
    # fused name -> (shape, the required names it stands in for)
    fused: dict[str, tuple[tuple[int, ...], tuple[str, ...]]]


def _expected_tensors(config: ModelConfig) -> _Expected:
    """The tensors a checkpoint of ``config`` holds, as ``ModelWeightsBuilder`` expects them."""
    h, inter, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    q_out = config.num_attention_heads * config.head_dim
    kv_out = config.num_kv_heads * config.head_dim
    required: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (vocab, h),
        "model.norm.weight": (h,),
    }
    if not config.tie_word_embeddings:
        required["lm_head.weight"] = (vocab, h)
    fused: dict[str, tuple[tuple[int, ...], tuple[str, ...]]] = {}
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        attn, mlp = p + "self_attn.", p + "mlp."
        required[p + "input_layernorm.weight"] = (h,)
        required[p + "post_attention_layernorm.weight"] = (h,)
        required[attn + "q_proj.weight"] = (q_out, h)
        required[attn + "k_proj.weight"] = (kv_out, h)
        required[attn + "v_proj.weight"] = (kv_out, h)
        required[attn + "o_proj.weight"] = (h, q_out)
        required[mlp + "gate_proj.weight"] = (inter, h)
        required[mlp + "up_proj.weight"] = (inter, h)
        required[mlp + "down_proj.weight"] = (h, inter)
        fused[attn + "qkv_proj.weight"] = (
            (q_out + 2 * kv_out, h),
            tuple(attn + n for n in ("q_proj.weight", "k_proj.weight", "v_proj.weight")),
        )
        fused[mlp + "gate_up_proj.weight"] = (
            (2 * inter, h),
            (mlp + "gate_proj.weight", mlp + "up_proj.weight"),
        )
        if config.attention_bias:
            required[attn + "q_proj.bias"] = (q_out,)
            required[attn + "k_proj.bias"] = (kv_out,)
            required[attn + "v_proj.bias"] = (kv_out,)
            if config.architecture == "LlamaForCausalLM":  # Llama's attention_bias covers o too
                required[attn + "o_proj.bias"] = (h,)
    return _Expected(required, fused)


def _is_skipped(name: str, config: ModelConfig) -> bool:
    return name.endswith(_SKIPPED_SUFFIXES) or (
        name == "lm_head.weight" and config.tie_word_embeddings
    )


def read_checkpoint_index(model_dir: str | Path) -> dict[str, tuple[Path, TensorInfo]]:
    """``{name: (file, TensorInfo)}`` for every tensor of the checkpoint, from the safetensors
    headers alone (nothing is mapped). Raises ``ValueError`` for malformed headers, a tensor in
    two shards, or an index entry its shard does not hold."""
    model_dir = Path(model_dir)
    weight_map = _weight_map(model_dir)
    out: dict[str, tuple[Path, TensorInfo]] = {}
    for path in sorted(set(weight_map.values())):
        for name, info in read_index(path).tensors.items():
            if name in out:
                raise ValueError(
                    f"{model_dir}: tensor {name!r} is in both {out[name][0].name} and {path.name}"
                )
            out[name] = (path, info)
    for name, shard in weight_map.items():
        if name and (name not in out or out[name][0] != shard):
            raise ValueError(
                f"{model_dir / INDEX_FILE}: lists tensor {name!r} in {shard.name}, which does "
                "not hold it"
            )
    return out


def check_checkpoint(model_dir: str | Path, config: ModelConfig) -> None:
    """Check the checkpoint's tensor index (names, shapes, dtypes, from the headers alone)
    against ``config`` before anything is allocated.

    Raises ``ValueError`` naming the first unexpected tensor, shape or dtype mismatch, the
    missing tensors (with the layers the checkpoint does hold when ``num_hidden_layers`` claims
    more), or a fused projection given together with its parts.
    """
    model_dir = Path(model_dir)
    index = read_checkpoint_index(model_dir)
    expected = _expected_tensors(config)
    present: set[str] = set()
    for name, (path, info) in index.items():
        if _is_skipped(name, config):
            continue
        if name in expected.required:
            shape = expected.required[name]
        elif name in expected.fused:
            shape = expected.fused[name][0]
        else:
            raise ValueError(
                f"{path}: checkpoint tensor {name!r} is not part of a {config.architecture} "
                f"model with this config.json (unexpected weight)"
            )
        if info.shape != shape:
            raise ValueError(
                f"{path}: checkpoint tensor {name!r} has shape {list(info.shape)}, config.json "
                f"implies {list(shape)}"
            )
        if info.dtype not in _WEIGHT_DTYPES:
            raise ValueError(
                f"{path}: checkpoint tensor {name!r} has dtype {info.dtype}; weights must be "
                f"{', '.join(_WEIGHT_DTYPES)}"
            )
        present.add(name)
    covered: set[str] = set()
    for name, (_, parts) in expected.fused.items():
        if name in present:
            both = [p for p in parts if p in present]
            if both:
                raise ValueError(
                    f"{model_dir}: checkpoint holds both {name!r} and {both[0]!r}; give the "
                    "fused projection or its parts, not both"
                )
            covered.update(parts)
    missing = [n for n in expected.required if n not in present and n not in covered]
    if missing:
        layers = {int(n.split(".")[2]) for n in present if n.startswith("model.layers.")}
        held = f"; the checkpoint holds layers 0..{max(layers)}" if layers else ""
        raise ValueError(
            f"{model_dir}: checkpoint is missing {len(missing)} tensor(s) that config.json "
            f"implies, first: {missing[0]!r} (num_hidden_layers = {config.num_layers}{held})"
        )


# Weight dtypes the model stores, by their safetensors spelling.
STORAGE_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
DTYPE_CHOICES = ("auto", "float32", "float16", "bfloat16")


def checkpoint_dtype(model_dir: str | Path, config: ModelConfig) -> str:
    """The checkpoint's stored weight dtype (``"float32"``, ``"float16"`` or ``"bfloat16"``), from
    the headers alone: the dtype holding most of the parameters, so a bf16 checkpoint with a few
    float32 norms is ``"bfloat16"``. What ``dtype="auto"`` loads as."""
    counts: dict[str, int] = {}
    for name, (_, info) in read_checkpoint_index(model_dir).items():
        if _is_skipped(name, config) or info.dtype not in STORAGE_DTYPES:
            continue
        counts[info.dtype] = counts.get(info.dtype, 0) + math.prod(info.shape)
    if not counts:
        return "float32"
    return STORAGE_DTYPES[max(counts, key=lambda d: counts[d])]


def resolve_dtype(dtype: str, model_dir: str | Path, config: ModelConfig) -> str:
    """``dtype`` (a :data:`DTYPE_CHOICES` entry, or ``fp32``/``fp16``/``bf16``) as the storage dtype
    to load: ``"auto"`` is :func:`checkpoint_dtype`. ``ValueError`` naming the field otherwise."""
    aliases = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
    name = aliases.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if name not in DTYPE_CHOICES:
        raise ValueError(
            f"dtype must be one of {', '.join(DTYPE_CHOICES)} (auto: the checkpoint's own); "
            f"got {dtype!r}"
        )
    return checkpoint_dtype(model_dir, config) if name == "auto" else name


def iter_weight_ranges(model_dir: str | Path, config: ModelConfig):
    """Yield ``(name, file, offset, nbytes, storage dtype name or None, array)`` for every
    parameter tensor: where its bytes sit in its file, and a memory-mapped view of them (no
    copies). The storage dtype is None for dtypes the model does not store (it converts)."""
    from lorart._safetensors import read_safetensors

    for path in checkpoint_files(model_dir):
        index = read_index(path)
        arrays = read_safetensors(path)
        for name, info in index.tensors.items():
            if _is_skipped(name, config):
                continue
            yield (
                name,
                path,
                index.data_start + info.begin,
                info.end - info.begin,
                STORAGE_DTYPES.get(info.dtype),
                arrays[name],
            )


def iter_weights(model_dir: str | Path, config: ModelConfig):
    """Yield ``(name, array)`` for every parameter tensor, memory-mapped (no copies), shard by
    shard. A tied ``lm_head.weight`` and recomputed buffers are skipped."""
    for name, *_, array in iter_weight_ranges(model_dir, config):
        yield name, array

"""Coverage-guided fuzz targets (atheris) for everything lorart parses or validates.

    python tests/fuzz/targets.py TARGET [CORPUS_DIR ...] [libFuzzer flags]

TARGET is one of ``safetensors`` (the reader, and the adapter and checkpoint paths that use it),
``npy`` (the TensorRT-LLM ``.npy`` pair), ``config`` (``hf.load_config`` on raw bytes and on
structured dicts) and ``lora`` (``LoraWeights`` / ``LoraConfig`` built from arrays of any dtype,
byte order, layout and alignment, then ``lora.validate``, which runs the C++ validation).
A target accepts only the documented failures: a ``ValueError`` (``lorart.LoraError`` is one)
that names the file it read. Anything else (another exception, a crash, a hang, memory blow-up)
is a finding; libFuzzer saves the input as ``crash-*`` / ``timeout-*`` / ``oom-*``, and passing
that file instead of a corpus directory replays it. ``tests/fuzz/run.py`` runs all targets.
"""

from __future__ import annotations

import json
import os
import struct
import sys
import tempfile
from pathlib import Path

import atheris
import ml_dtypes
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from seeds import ADAPTER_CONFIG, FUZZ_CONFIG, adapter_tensors, checkpoint_tensors

with atheris.instrument_imports(include=["lorart"]):
    import lorart  # noqa: F401
    from lorart import _core, _safetensors, hf, lora
    from lorart.model import load_core_model

WORK = Path(os.environ.get("LORART_FUZZ_WORKDIR") or tempfile.mkdtemp(prefix="lorart-fuzz-"))
MODEL_CONFIG = hf.config_from_dict(FUZZ_CONFIG)


class BadError(AssertionError):
    """The code under test failed in a way its documentation does not allow."""


# Words that tell the rules apart in error messages. Matching them in instrumented code gives
# each rule its own coverage edge, so the fuzzer keeps inputs that reach a rule it had not hit
# (most rules live in C++, which atheris does not instrument).
_RULES = [
    *("module_id", "layer_idx", "adapter_size", "both adapt", "needs", "finite", "dtype"),
    *("rows but", "columns", "leading dim", "contiguous", "is missing", "must hold", "outside"),
    *("data_offsets", "shape", "header", "overlap", "unused", "trailing", "not supported"),
    *("expected", "missing", "null", "multiple", "divisible", "even", "rope", "unexpected"),
]


@atheris.instrument_func
def _note_rule(message: str) -> None:
    for rule in _RULES:
        if rule in message:
            return


def expect_value_error(err: BaseException, *names: str) -> None:
    """Re-raise unless ``err`` is a ValueError whose message names one of ``names``."""
    if not isinstance(err, ValueError):
        raise err
    if names and not any(n in str(err) for n in names):
        raise BadError(f"the error does not name {names}: {err}") from err
    _note_rule(str(err))


def _dir(name: str) -> Path:
    path = WORK / name
    path.mkdir(parents=True, exist_ok=True)
    return path


# ----------------------------------------------------------------------------- safetensors

ADAPTER_DIR = _dir("adapter")
(ADAPTER_DIR / "adapter_config.json").write_text(json.dumps(ADAPTER_CONFIG))
MODEL_DIR = _dir("model")
(MODEL_DIR / "config.json").write_text(json.dumps(FUZZ_CONFIG))


# Every tensor name and shape a valid adapter or checkpoint of FUZZ_CONFIG holds.
_KNOWN = {
    name: array.shape
    for tensors in (
        adapter_tensors(np.random.default_rng(0), np.float32, fused=True),
        adapter_tensors(np.random.default_rng(0), np.float32),
        checkpoint_tensors(np.random.default_rng(0), np.float32),
    )
    for name, array in tensors.items()
}
_KNOWN_NAMES = sorted(_KNOWN)
_ST_DTYPES = (["F32", "F16", "BF16"], ["F64", "I64", "I32", "U8", "BOOL", "F8_E4M3", "X", 5, None])
_ST_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "U8": 1}
_ST_ITEMSIZE.update({"BOOL": 1, "F8_E4M3": 1})
_ODD_DIMS = [-1, 0, 1, 3, 2**31, 2**63, 2**70, "3", 1.5, True, None, [2]]
_ODD_OFFSETS = [[0], [0, 1, 2], [-8, 0], [0.0, 4.0], "0,4", None, [4, 0], [0, 2**64]]


@atheris.instrument_func
def _structured_safetensors(fdp: atheris.FuzzedDataProvider) -> bytes:
    """A safetensors file built field by field: mostly well-formed entries for the names an
    adapter or checkpoint holds, with fuzzed dtypes, shapes, offsets, values and framing."""
    header: dict = {}
    data = b""
    for _ in range(fdp.ConsumeIntInRange(0, 8)):
        if _rare(fdp, 0.1):
            name = fdp.ConsumeUnicodeNoSurrogates(12)
        else:
            name = fdp.PickValueInList(_KNOWN_NAMES)
        dtype = fdp.PickValueInList(_ST_DTYPES[_rare(fdp, 0.1)])
        shape = list(_KNOWN.get(name, (2, 3)))
        if _rare(fdp, 0.1):
            shape = [fdp.PickValueInList(_ODD_DIMS) for _ in range(fdp.ConsumeIntInRange(0, 3))]
        size = _ST_ITEMSIZE.get(dtype, 4) if isinstance(dtype, str) else 4
        try:
            nbytes = int(np.prod([int(d) for d in shape])) * size if shape else size
        except (TypeError, ValueError, OverflowError):
            nbytes = 4
        nbytes = max(0, min(nbytes, 4096))
        offsets: object = [len(data), len(data) + nbytes]
        if _rare(fdp, 0.1):
            offsets = fdp.PickValueInList(_ODD_OFFSETS)
        elif _rare(fdp, 0.1):
            offsets = [len(data) + fdp.ConsumeIntInRange(-4, 4), len(data) + nbytes]
        if _rare(fdp, 0.2):  # any bit pattern: NaN, inf, subnormals
            raw = fdp.ConsumeBytes(nbytes).ljust(nbytes, b"\0")
        else:
            gen = np.random.default_rng(fdp.ConsumeIntInRange(0, 255))
            raw = gen.standard_normal(max(1, nbytes // 4)).astype(np.float32).tobytes()[:nbytes]
            raw = raw.ljust(nbytes, b"\0")
        entry = {"dtype": dtype, "shape": shape, "data_offsets": offsets}
        if _rare(fdp, 0.05):
            entry.pop(fdp.PickValueInList(list(entry)))
        header[name] = entry
        data += raw
    if _rare(fdp, 0.1):
        header["__metadata__"] = fdp.PickValueInList([{"format": "pt"}, {"k": 1}, [1], "x", None])
    text = json.dumps(header).encode()
    if _rare(fdp, 0.1):
        data += fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 16))  # trailing bytes
    length = len(text)
    if _rare(fdp, 0.05):
        length = fdp.PickValueInList([0, length - 1, length + 1, 2**63, len(text) + len(data) + 1])
    return struct.pack("<Q", length % 2**64) + text + data


@atheris.instrument_func
def fuzz_safetensors(data: bytes) -> None:
    """The reader itself, then the same bytes as an adapter and as a checkpoint. Inputs whose
    first byte is 3 mod 4 describe a file field by field; others are the file's bytes (seeds
    have an 8-byte-aligned header length, so they are read as they are)."""
    if data[:1] and data[0] % 4 == 3:
        data = _structured_safetensors(atheris.FuzzedDataProvider(data[1:]))
    path = ADAPTER_DIR / "adapter_model.safetensors"
    path.write_bytes(data)
    try:
        tensors = _safetensors.read_safetensors(path)
    except Exception as err:
        expect_value_error(err, str(path))
        return
    for array in tensors.values():  # touch every mapped byte
        np.asarray(array).tobytes()
    for model_config in (None, MODEL_CONFIG):
        try:
            weights, config = lora.from_peft(ADAPTER_DIR, model_config)
        except Exception as err:
            expect_value_error(err, str(ADAPTER_DIR))
            continue
        if model_config is not None:  # validated against the model: must be usable
            _core.LoraAdapter(weights, config, model_config, 64)
    (MODEL_DIR / "model.safetensors").write_bytes(data)
    try:
        hf.check_checkpoint(MODEL_DIR, MODEL_CONFIG)
    except Exception as err:
        expect_value_error(err, str(MODEL_DIR))
        return
    load_core_model(MODEL_DIR, 16, 4)  # the index matched the config: loading must succeed


# ----------------------------------------------------------------------------- .npy pair

NPY_DIR = _dir("npy")


@atheris.instrument_func
def fuzz_npy(data: bytes) -> None:
    """Input: u32 length n, n bytes of model.lora_weights.npy, the rest model.lora_config.npy."""
    n = struct.unpack("<I", data[:4])[0] if len(data) >= 4 else 0
    (NPY_DIR / lora.WEIGHTS_FILE).write_bytes(data[4 : 4 + n])
    (NPY_DIR / lora.CONFIG_FILE).write_bytes(data[4 + n :])
    try:
        weights, config = lora.load_npy(NPY_DIR)
    except Exception as err:
        expect_value_error(err, str(NPY_DIR))
        return
    _check_adapter(weights, config, 64, None)


# ----------------------------------------------------------------------------- config.json

CONFIG_DIR = _dir("config")
_KEYS = [*FUZZ_CONFIG, "head_dim", "bos_token_id", "eos_token_id", "attention_bias", "dtype"]
_KEYS += ["sliding_window", "use_sliding_window", "model_type", "rope_scaling", "rope_parameters"]
_ROPE_KEYS = ["rope_type", "type", "factor", "low_freq_factor", "high_freq_factor"]
_ROPE_KEYS += ["original_max_position_embeddings", "rope_theta"]
_INTS = [0, 1, 2, 3, 4, 8, 12, 16, 32, 64, -1, 2**16, 2**20, 2**31 - 1, 2**31, 2**63, 2**70]
_FLOATS = [0.0, -0.0, 1e-6, 0.5, 1.0, 4.0, 8.0, 1e4, -1.0, float("inf"), float("nan"), 1e308]
_STRS = ["", "llama", "llama3", "linear", "default", "yarn", "float32", "bfloat16", "torch.float16"]
_STRS += ["LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM", "int8", "\udcff"]


@atheris.instrument_func
def _value(fdp: atheris.FuzzedDataProvider, depth: int = 0):
    kind = fdp.ConsumeIntInRange(0, 8)
    if kind == 0:
        return None
    if kind == 1:
        return fdp.PickValueInList(_INTS)
    if kind == 2:
        return fdp.ConsumeIntInRange(-(2**40), 2**40)
    if kind == 3:
        return fdp.PickValueInList(_FLOATS)
    if kind == 4:
        return fdp.PickValueInList(_STRS)
    if kind == 5:
        return fdp.ConsumeBool()
    if kind == 6 and depth < 2:
        return [_value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 3))]
    if kind == 7 and depth < 2:
        return _rope_dict(fdp, depth + 1)
    return fdp.ConsumeUnicodeNoSurrogates(8)


@atheris.instrument_func
def _rope_dict(fdp: atheris.FuzzedDataProvider, depth: int) -> dict:
    out = {}
    for key in _ROPE_KEYS:
        if fdp.ConsumeBool():
            out[key] = _value(fdp, depth)
    return out


@atheris.instrument_func
def fuzz_config(data: bytes) -> None:
    """Raw bytes as config.json (first byte even), or a dict of fuzzed field values (odd)."""
    if data[:1] and data[0] % 2:
        fdp = atheris.FuzzedDataProvider(data[1:])
        d = dict(FUZZ_CONFIG)
        for key in _KEYS:
            choice = fdp.ConsumeIntInRange(0, 3)
            if choice == 1:
                d.pop(key, None)
            elif choice == 2:
                d[key] = _value(fdp)
        try:
            config = hf.config_from_dict(d, source="fuzzed dict")
        except Exception as err:
            expect_value_error(err, "fuzzed dict")
            return
    else:
        path = CONFIG_DIR / "config.json"
        path.write_bytes(data[1:])
        try:
            config = hf.load_config(CONFIG_DIR)
        except Exception as err:
            expect_value_error(err, str(path))
            return
    # A config that loads is consistent: every derived size is computable.
    for module_id in config.lora_module_ids():
        config.lora_module_dims(module_id)
    if config.num_layers <= 64:
        hf._expected_tensors(config)
    repr(config)


# ----------------------------------------------------------------------------- LoraWeights/Config

# (accepted, refused) dtypes: mostly accepted ones, so that inputs get past construction.
_WEIGHT_DTYPES = (["<f4", ">f4", "<f2", ">f2", "bf16"], ["<f8", "<i4", "|u1", "<i8", "|b1"])
_CONFIG_DTYPES = (["<i4", ">i4"], ["<i8", ">i8", "<u4", "<i2", "<f4", "|u1"])
_COLUMNS = [0, 1, 3, 7, 16, 20, 24, 32, 40, 41, 64, 80]
_LAYOUTS = ["plain", "plain", "misaligned", "strided", "fortran", "list", "dlpack", "3d"]


def _rare(fdp: atheris.FuzzedDataProvider, p: float) -> bool:
    """True with probability ``p``; False once the input is used up (so short inputs stay on the
    common path)."""
    return fdp.ConsumeProbability() > 1 - p


def _field(fdp: atheris.FuzzedDataProvider, lo: int, hi: int) -> int:
    """A config value: mostly near the valid range, sometimes an extreme."""
    return fdp.PickValueInList(_INTS) if _rare(fdp, 0.3) else fdp.ConsumeIntInRange(lo, hi)


def _dtype(fdp: atheris.FuzzedDataProvider, choices: tuple[list, list]) -> np.dtype:
    name = fdp.PickValueInList(choices[_rare(fdp, 0.15)])
    return np.dtype(ml_dtypes.bfloat16) if name == "bf16" else np.dtype(name)


class DlpackOnly:
    """A DLPack producer that is not a numpy array (its strides arrive as they are)."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    def __dlpack__(self, **kwargs):
        return self.array.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self.array.__dlpack_device__()


@atheris.instrument_func
def _array(fdp: atheris.FuzzedDataProvider, dtype: np.dtype, shape: tuple, values) -> object:
    """``values`` (float64 or raw) as ``dtype`` of ``shape``, in a fuzzed memory layout."""
    n = int(np.prod(shape))
    if values is None:  # raw bytes: any bit pattern, NaN and inf included
        raw = fdp.ConsumeBytes(n * dtype.itemsize).ljust(n * dtype.itemsize, b"\0")
        base = np.frombuffer(raw, dtype=dtype).reshape(shape)
    else:
        with np.errstate(all="ignore"):
            base = np.asarray(values[:n]).reshape(shape).astype(dtype)
    layout = fdp.PickValueInList(_LAYOUTS)
    if layout == "misaligned":
        raw = bytearray(base.nbytes + 1)
        out = np.frombuffer(raw, dtype=dtype, offset=1).reshape(shape)
        raw[1:] = base.tobytes()
        return out
    if layout == "strided" and base.ndim >= 1:
        wide = np.zeros((*shape[:-1], shape[-1] * 2), dtype)
        wide[..., ::2] = base
        return wide[..., ::2]
    if layout == "fortran":
        return np.asfortranarray(base)
    if layout == "list":
        return base.tolist()
    if layout == "dlpack" and dtype.isnative and dtype.kind in "fiu" and dtype.itemsize > 1:
        return DlpackOnly(np.array(base))  # a writable copy: numpy exports no read-only DLPack
    if layout == "3d":
        return base[None]
    return base


@atheris.instrument_func
def fuzz_lora(data: bytes) -> None:
    """Adapter tensors of any dtype, byte order, shape and layout -> LoraWeights / LoraConfig
    -> lora.validate (C++); what validates must also unpack, split and load as an adapter."""
    fdp = atheris.FuzzedDataProvider(data)
    rows = fdp.ConsumeIntInRange(0, 4)
    w_rows = fdp.ConsumeIntInRange(0, 4) if _rare(fdp, 0.1) else rows
    w_dtype = _dtype(fdp, _WEIGHT_DTYPES)
    w_shape = (w_rows, fdp.PickValueInList(_COLUMNS))
    if _rare(fdp, 0.05):
        w_shape = tuple(fdp.ConsumeIntInRange(0, 3) for _ in range(fdp.ConsumeIntInRange(0, 5)))
    if fdp.ConsumeBool():
        gen = np.random.default_rng(fdp.ConsumeIntInRange(0, 2**16))
        values = gen.standard_normal(int(np.prod(w_shape))) * fdp.PickValueInList([1, 1e-3, 3e38])
    else:
        values = None
    c_dtype = _dtype(fdp, _CONFIG_DTYPES)
    dora = _rare(fdp, 0.2)  # TensorRT-LLM's 4th column, is_dora
    columns = 4 if dora else 3
    table = []
    for _ in range(rows):
        row = [_field(fdp, 0, 8), _field(fdp, 0, 2), _field(fdp, 1, 4)]
        table.append([*row, _field(fdp, 0, 1)] if dora else row)
    c_shape = (rows * columns,) if _rare(fdp, 0.05) else (rows, columns)
    embeddings = _embeddings(fdp) if _rare(fdp, 0.2) else None
    try:
        weights = lora.LoraWeights(_array(fdp, w_dtype, w_shape, values), embeddings=embeddings)
    except Exception as err:
        expect_value_error(err)
        weights = None
    try:
        flat = np.array(table, dtype=object).reshape(-1) if table else np.zeros(0)
        with np.errstate(all="ignore"):
            ints = np.array([int(v) % 2**64 for v in flat], dtype=np.uint64).view(np.int64)
        raw_list = _rare(fdp, 0.1)  # Python ints, 2**70 included
        config = lora.LoraConfig(table if raw_list else _array(fdp, c_dtype, c_shape, ints))
    except Exception as err:
        expect_value_error(err)
        config = None
    if weights is not None:
        repr(weights), weights.numpy(), weights.shape
    if config is not None:
        repr(config), config.numpy(), config.shape
    max_rank = 64
    if _rare(fdp, 0.3):
        max_rank = fdp.PickValueInList([1, 2, 4, 0, -1, 2**31 - 1, 2**63 - 1, -(2**63)])
    dtype = None
    if _rare(fdp, 0.3):
        dtype = fdp.PickValueInList(["float32", "float16", "bfloat16", "int8"])
    try:
        lora.validate(weights, config, MODEL_CONFIG, max_lora_rank=max_rank, dtype=dtype)
    except Exception as err:
        expect_value_error(err)
        return
    _check_adapter(weights, config, max_rank, dtype)


def _embeddings(fdp: atheris.FuzzedDataProvider):
    """Embedding-side parts of shapes near (and sometimes off) the model's, or None when the
    constructor refuses them (which must be a ValueError)."""
    h, v = MODEL_CONFIG.hidden_size, MODEL_CONFIG.vocab_size
    vocab = fdp.PickValueInList([v, v + 3, v - 1, 0])
    rank = fdp.PickValueInList([1, 2, 4, 0])
    shapes = {
        "embed_tokens": [(vocab, h), (vocab, h + 1)],
        "lm_head": [(vocab, h), (v, h)],
        "embed_lora_a": [(rank, vocab), (rank, v)],
        "embed_lora_b": [(h, rank), (h, rank + 1)],
        "lm_head_lora_a": [(rank, h), (rank, h - 1)],
        "lm_head_lora_b": [(vocab, rank), (v, rank)],
    }
    gen = np.random.default_rng(fdp.ConsumeIntInRange(0, 2**16))
    parts = {}
    for name, choices in shapes.items():
        if fdp.ConsumeBool():
            continue
        shape = fdp.PickValueInList(choices)
        values = gen.standard_normal(shape) * fdp.PickValueInList([1, 1e-3, 3e38])
        parts[name] = _array(fdp, _dtype(fdp, _WEIGHT_DTYPES), shape, values.reshape(-1))
    if "embed_tokens" in parts and _rare(fdp, 0.3):
        parts["lm_head"] = parts["embed_tokens"]  # kept tied
    try:
        return lora.LoraEmbeddings(**parts)
    except Exception as err:
        expect_value_error(err)
        return None


@atheris.instrument_func
def _check_adapter(weights, config, max_rank: int, dtype) -> None:
    """What validate() accepts must work everywhere an adapter goes."""
    try:
        lora.validate(weights, config, MODEL_CONFIG, max_lora_rank=max_rank, dtype=dtype)
    except Exception as err:
        expect_value_error(err)
        return
    rows = lora.unpack(weights, config, MODEL_CONFIG)
    assert len(rows) == config.num_rows
    dora = config.num_columns == 4 and bool(config.numpy()[:, 3].any())
    for tp_rank in (0, 1):
        try:
            lora.tp_split(weights, config, MODEL_CONFIG, 2, tp_rank)
        except lora.LoraError:  # what tensor parallelism cannot split yet, and only that
            assert dora or weights.embeddings is not None
    max_rank = max(1, lora._max_rank(config), *_part_ranks(weights))
    try:
        _core.LoraAdapter(weights, config, MODEL_CONFIG, max_rank)
    except lora.LoraError as err:  # DoRA's scales need a model's weights
        assert dora and "DoRA rows" in str(err), err


def _part_ranks(weights) -> list[int]:
    e = weights.embeddings
    if e is None:
        return []
    return [p.shape[0] for p in (e.embed_lora_a, e.lm_head_lora_a) if p is not None]


TARGETS = {
    "safetensors": fuzz_safetensors,
    "npy": fuzz_npy,
    "config": fuzz_config,
    "lora": fuzz_lora,
}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(TARGETS)}}} [corpus dirs] [libFuzzer flags]")
    target = TARGETS[sys.argv[1]]
    atheris.Setup([sys.argv[0], *sys.argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()

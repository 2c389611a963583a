"""Memory-mapped reading of ``.safetensors`` files into numpy arrays, bfloat16 included.

The ``safetensors`` library's numpy backend cannot return bfloat16 tensors (numpy has no such
type), and adapters and checkpoints are often stored in bf16. The format is a little-endian u64
header length, a JSON header ``{name: {dtype, shape, data_offsets}}``, then raw bytes; we map the
file once and hand out zero-copy views, typed with ``ml_dtypes.bfloat16`` where needed.

Files come from anywhere, so the header is checked as strictly as the reference implementation
checks it before any byte is mapped: every malformed file raises ``ValueError`` naming the file,
the tensor and the field.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
# The reference implementation's bound (it refuses larger headers as a denial of service).
MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_DIMS = 32
# Bound on one tensor's bytes counting only its non-zero dims: an empty tensor [0, 2**70] has no
# bytes but numpy cannot shape it, and no real tensor comes near 2**48 bytes (256 TiB).
MAX_TENSOR_BYTES = 2**48


class TensorInfo(NamedTuple):
    """One checked header entry: ``data_offsets`` are relative to the data section."""

    dtype: str  # safetensors spelling: "F32", "BF16", ...
    shape: tuple[int, ...]
    begin: int
    end: int


class SafetensorsIndex(NamedTuple):
    """What the header of a safetensors file says, checked against the file's size."""

    tensors: dict[str, TensorInfo]  # in file order
    metadata: dict[str, str]
    data_start: int  # file offset of the data section


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {_short(key)}")
        out[key] = value
    return out


def read_index(path: str | Path) -> SafetensorsIndex:
    """Read and check the header of ``path`` (names, dtypes, shapes, offsets); maps nothing.

    Raises ``ValueError`` naming the file, the tensor and the field for any malformed header:
    a length past the file or over 100 MiB, JSON that is not an object of objects, unknown
    dtypes, shapes that are not lists of non-negative ints, offsets that are not ints, not
    ``dtype size x shape`` long, outside the data section, overlapping, leaving holes, or not
    covering the data section (the reference reader's rules), ``__metadata__`` that is not a
    dict of strings.
    """
    path = Path(path)
    with open(path, "rb") as f:
        file_size = os.fstat(f.fileno()).st_size
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(
                f"{path}: not a safetensors file ({len(raw)} bytes, shorter than the 8-byte "
                "header length)"
            )
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > MAX_HEADER_BYTES:
            raise ValueError(
                f"{path}: not a safetensors file (header length {header_len} is over the "
                f"{MAX_HEADER_BYTES}-byte limit)"
            )
        if header_len > file_size - 8:
            raise ValueError(
                f"{path}: truncated or not a safetensors file (header length {header_len} but "
                f"only {file_size - 8} bytes follow)"
            )
        text = f.read(header_len)
    try:
        header = json.loads(text.decode("utf-8"), object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError too
        raise ValueError(f"{path}: cannot parse the JSON header ({err})") from None
    if not isinstance(header, dict):
        raise ValueError(
            f"{path}: header must be a JSON object {{name: tensor}}, got {type(header).__name__}"
        )
    data_start = 8 + header_len
    data_size = file_size - data_start
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError(
            f"{path}: __metadata__ must be an object of strings, got {_short(metadata)}"
        )
    tensors = {
        name: _tensor_info(path, name, info, data_size)
        for name, info in header.items()
        if name != "__metadata__"
    }
    _check_layout(path, tensors, data_size)
    return SafetensorsIndex(tensors, dict(metadata), data_start)


def _tensor_info(path: Path, name: str, info: Any, data_size: int) -> TensorInfo:
    where = f"{path}: tensor {name!r}"
    if not isinstance(info, dict):
        raise ValueError(f"{where}: entry must be an object, got {_short(info)}")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in info:
            raise ValueError(f"{where}: missing field {key!r}")
    dtype = info["dtype"]
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise ValueError(
            f"{where}: dtype {_short(dtype)} is not supported (supported: {', '.join(_DTYPES)})"
        )
    shape = info["shape"]
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_DIMS
        or not all(_is_int(d) and d >= 0 for d in shape)
    ):
        raise ValueError(
            f"{where}: shape must be a list of at most {MAX_DIMS} non-negative ints, got "
            f"{_short(shape)}"
        )
    itemsize = _DTYPES[dtype].itemsize
    if math.prod(max(d, 1) for d in shape) * itemsize > MAX_TENSOR_BYTES:
        raise ValueError(
            f"{where}: shape {_short(shape)} is over the {MAX_TENSOR_BYTES}-byte limit"
        )
    offsets = info["data_offsets"]
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_int, offsets)):
        raise ValueError(f"{where}: data_offsets must be a list of two ints, got {_short(offsets)}")
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        raise ValueError(
            f"{where}: data_offsets {offsets} are outside the data section [0, {data_size}]"
        )
    nbytes = math.prod(shape) * itemsize
    if end - begin != nbytes:
        raise ValueError(
            f"{where}: data_offsets {offsets} span {end - begin} bytes but dtype {dtype} x shape "
            f"{shape} needs {nbytes}"
        )
    return TensorInfo(dtype, tuple(shape), begin, end)


def _check_layout(path: Path, tensors: dict[str, TensorInfo], data_size: int) -> None:
    """Tensors tile the data section in offset order: no overlap, no hole, nothing after."""
    position, previous = 0, None
    for name, info in sorted(tensors.items(), key=lambda item: (item[1].begin, item[1].end)):
        if info.begin < position:
            raise ValueError(
                f"{path}: tensor {name!r}: data_offsets [{info.begin}, {info.end}] overlap tensor "
                f"{previous!r}, which ends at {position}"
            )
        if info.begin > position:
            raise ValueError(
                f"{path}: tensor {name!r}: data_offsets [{info.begin}, {info.end}] leave bytes "
                f"[{position}, {info.begin}) of the data section unused"
            )
        position, previous = info.end, name
    if position != data_size:
        raise ValueError(
            f"{path}: the tensors cover {position} bytes but the data section holds {data_size} "
            "(trailing bytes after the last tensor)"
        )


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """Return ``{name: read-only array}`` viewing a memory map of ``path`` (no copies).

    The header is checked first (:func:`read_index`); raises ``ValueError`` naming the file, the
    tensor and the field when it is malformed.
    """
    index = read_index(path)
    if not index.tensors:
        return {}
    mapped = np.memmap(path, dtype=np.uint8, mode="r")
    start = index.data_start
    return {
        name: mapped[start + info.begin : start + info.end]
        .view(_DTYPES[info.dtype])
        .reshape(info.shape)
        for name, info in index.tensors.items()
    }

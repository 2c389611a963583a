"""Memory-mapped reading of ``.safetensors`` files into numpy arrays, bfloat16 included.

The ``safetensors`` library's numpy backend cannot return bfloat16 tensors (numpy has no such
type), and adapters and checkpoints are often stored in bf16. The format is a little-endian u64
header length, a JSON header ``{name: {dtype, shape, data_offsets}}``, then raw bytes; we map the
file once and hand out zero-copy views, typed with ``ml_dtypes.bfloat16`` where needed.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """Return ``{name: read-only array}`` viewing a memory map of ``path`` (no copies)."""
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header)")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > 100 * 1024 * 1024:
            raise ValueError(f"{path}: not a safetensors file (header length {header_len})")
        header = json.loads(f.read(header_len))
    data_start = 8 + header_len
    mapped = np.memmap(path, dtype=np.uint8, mode="r")
    out: dict[str, np.ndarray] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if end - begin != expected or data_start + end > mapped.size:
            raise ValueError(f"{path}: tensor {name!r} has inconsistent data offsets")
        out[name] = mapped[data_start + begin : data_start + end].view(dtype).reshape(shape)
    return out

"""Malformed files on every path lorart reads them: safetensors (checkpoints and adapters), the
TensorRT-LLM .npy pair, adapter_model.bin, adapter_config.json, sharded checkpoint indexes. Each
must give a ValueError (lorart.LoraError for adapters) naming the file and the field; none may
escape as another exception or be read wrongly."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import lorart
from lorart import hf, lora
from lorart._safetensors import read_safetensors


def write_safetensors(path: Path, header, data: bytes = b"") -> Path:
    """A safetensors file with exactly this header (an object, or raw bytes) and data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def entry(dtype="F32", shape=(1,), offsets=(0, 4)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


F32x2 = np.float32([1.5, -2.0]).tobytes()

# (id, header, data, words the message must contain)
BAD_SAFETENSORS = [
    ("negative-offset", {"a": entry(offsets=(-4, 0))}, F32x2, ["'a'", "data_offsets"]),
    ("negative-shape", {"a": entry(shape=(-1,), offsets=(0, 4))}, F32x2[:4], ["'a'", "shape"]),
    ("overlap", {"a": entry(offsets=(0, 4)), "b": entry(offsets=(2, 6))}, F32x2, ["overlap"]),
    ("hole", {"a": entry(offsets=(4, 8))}, F32x2, ["'a'", "unused"]),
    ("trailing", {"a": entry(offsets=(0, 4))}, F32x2, ["trailing"]),
    ("past-end", {"a": entry(shape=(4,), offsets=(0, 16))}, F32x2, ["'a'", "data_offsets"]),
    ("list-header", [1, 2], b"", ["JSON object"]),
    ("null-header", None, b"", ["JSON object"]),
    ("entry-not-object", {"a": 3}, b"", ["'a'", "object"]),
    ("missing-dtype", {"a": {"shape": [1], "data_offsets": [0, 4]}}, F32x2[:4], ["'dtype'"]),
    ("missing-shape", {"a": {"dtype": "F32", "data_offsets": [0, 4]}}, F32x2[:4], ["'shape'"]),
    ("missing-offsets", {"a": {"dtype": "F32", "shape": [1]}}, F32x2[:4], ["'data_offsets'"]),
    ("string-shape", {"a": entry(shape="12")}, F32x2[:4], ["'a'", "shape"]),
    ("huge-shape", {"a": entry(shape=(2**70,))}, F32x2[:4], ["'a'", "shape"]),
    ("huge-empty-shape", {"a": entry(shape=(0, 2**62), offsets=(0, 0))}, b"", ["'a'", "limit"]),
    ("bool-shape", {"a": entry(shape=(True,))}, F32x2[:4], ["'a'", "shape"]),
    ("float-offsets", {"a": entry(offsets=(0.0, 4.0))}, F32x2[:4], ["'a'", "data_offsets"]),
    ("three-offsets", {"a": entry(offsets=(0, 4, 8))}, F32x2, ["'a'", "data_offsets"]),
    ("size-mismatch", {"a": entry(shape=(2,), offsets=(0, 4))}, F32x2[:4], ["'a'", "needs 8"]),
    ("unknown-dtype", {"a": entry(dtype="F128")}, F32x2[:4], ["'a'", "dtype"]),
    ("dtype-not-string", {"a": entry(dtype=["F32"])}, F32x2[:4], ["'a'", "dtype"]),
    ("metadata-list", {"__metadata__": ["x"]}, b"", ["__metadata__"]),
    ("metadata-int-value", {"__metadata__": {"k": 1}}, b"", ["__metadata__"]),
    ("duplicate-name", b'{"a": {}, "a": {}}', b"", ["duplicate key"]),
    ("not-utf8", b"\xff\xfe{}", b"", ["JSON"]),
    ("deep-nesting", b"[" * 100000 + b"]" * 100000, b"", ["JSON"]),
    ("not-json", b"{not json", b"", ["JSON"]),
]


@pytest.mark.parametrize(
    "header,data,words", [c[1:] for c in BAD_SAFETENSORS], ids=[c[0] for c in BAD_SAFETENSORS]
)
def test_malformed_safetensors(tmp_path, header, data, words):
    path = write_safetensors(tmp_path / "x.safetensors", header, data)
    with pytest.raises(ValueError) as exc:
        read_safetensors(path)
    msg = str(exc.value)
    assert str(path) in msg
    for word in words:
        assert word in msg, msg


@pytest.mark.parametrize(
    "raw,words",
    [
        (b"", ["shorter than the 8-byte"]),
        (b"\x01\x02\x03", ["shorter than the 8-byte"]),
        (struct.pack("<Q", 2**63) + b"{}", ["limit"]),
        (struct.pack("<Q", 100) + b"{}", ["truncated"]),
    ],
    ids=["empty", "short", "huge-header-length", "header-past-file"],
)
def test_malformed_safetensors_length(tmp_path, raw, words):
    path = tmp_path / "x.safetensors"
    path.write_bytes(raw)
    with pytest.raises(ValueError, match=words[0]) as exc:
        read_safetensors(path)
    assert str(path) in str(exc.value)


def test_negative_offset_never_reads_the_header_text(tmp_path):
    # Before: begin=-8 made the view start inside the JSON header, returning its bytes as floats.
    header = {"a": entry(shape=(2,), offsets=(-8, 0))}
    path = write_safetensors(tmp_path / "x.safetensors", header, F32x2)
    with pytest.raises(ValueError, match=r"data_offsets \[-8, 0\] are outside the data section"):
        read_safetensors(path)


def test_valid_safetensors_edge_cases(tmp_path):
    path = tmp_path / "ok.safetensors"
    save_file(
        {
            "empty": np.zeros((0, 7), np.float32),
            "scalar": np.array(3.0, np.float32),
            "ints": np.arange(3, dtype=np.int64),
        },
        str(path),
        metadata={"format": "pt"},
    )
    out = read_safetensors(path)
    assert out["empty"].shape == (0, 7)
    assert out["scalar"].shape == () and float(out["scalar"]) == 3.0
    np.testing.assert_array_equal(out["ints"], [0, 1, 2])
    # A header that is not padded to 8 bytes leaves the data misaligned: still read correctly.
    raw = b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'
    assert (8 + len(raw)) % 4 != 0
    path2 = write_safetensors(tmp_path / "odd.safetensors", raw, F32x2)
    np.testing.assert_array_equal(read_safetensors(path2)["a"], [1.5, -2.0])


# ----------------------------------------------------------------------------- adapters


@pytest.fixture
def peft_dir(all_proj_adapter, tmp_path) -> Path:
    """A writable copy of a valid PEFT adapter directory."""
    return Path(shutil.copytree(all_proj_adapter.dir, tmp_path / "adapter"))


def test_adapter_with_list_safetensors_header(peft_dir):
    write_safetensors(peft_dir / "adapter_model.safetensors", [1], b"")
    with pytest.raises(lorart.LoraError, match="adapter_model.safetensors: header must be a JSON"):
        lora.from_peft(peft_dir)


def test_adapter_with_negative_offsets(peft_dir):
    header = {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": entry(offsets=(-4, 0))
    }
    write_safetensors(peft_dir / "adapter_model.safetensors", header, F32x2[:4])
    with pytest.raises(lorart.LoraError, match="data_offsets"):
        lora.from_peft(peft_dir)


def tensors_of(peft_dir: Path) -> dict[str, np.ndarray]:
    return load_file(str(peft_dir / "adapter_model.safetensors"))


def resave(peft_dir: Path, tensors: dict[str, np.ndarray]) -> None:
    save_file(tensors, str(peft_dir / "adapter_model.safetensors"))


def first_key(tensors, which: str) -> str:
    return next(k for k in sorted(tensors) if f"lora_{which}" in k)


def test_adapter_zero_rank_and_zero_dim_tensors(peft_dir):
    tensors = tensors_of(peft_dir)
    a = first_key(tensors, "A")
    b = a.replace("lora_A", "lora_B")
    tensors[a] = np.zeros((0, 64), np.float32)  # before: ZeroDivisionError in the scaling
    tensors[b] = np.zeros((tensors[b].shape[0], 0), np.float32)
    resave(peft_dir, tensors)
    with pytest.raises(lorart.LoraError, match="all >= 1"):
        lora.from_peft(peft_dir)


def test_adapter_scalar_tensor(peft_dir):
    tensors = tensors_of(peft_dir)
    tensors[first_key(tensors, "A")] = np.array(1.0, np.float32)  # before: IndexError
    resave(peft_dir, tensors)
    with pytest.raises(lorart.LoraError, match="rank mismatch"):
        lora.from_peft(peft_dir)


def test_adapter_integer_tensor(peft_dir):
    tensors = tensors_of(peft_dir)
    key = first_key(tensors, "A")
    tensors[key] = tensors[key].astype(np.int64)
    resave(peft_dir, tensors)
    with pytest.raises(lorart.LoraError, match="dtype int64; LoRA weights must be float"):
        lora.from_peft(peft_dir)


def test_adapter_two_tensors_for_one_module(peft_dir):
    tensors = tensors_of(peft_dir)
    a = first_key(tensors, "A")
    b = a.replace("lora_A", "lora_B")
    other = a.replace("base_model.model.", "other.")
    tensors[other] = tensors[a]
    tensors[other.replace("lora_A", "lora_B")] = tensors[b]
    resave(peft_dir, tensors)
    with pytest.raises(lorart.LoraError, match="each .module, layer. may appear once"):
        lora.from_peft(peft_dir)


def test_adapter_huge_layer_index(peft_dir):
    tensors = tensors_of(peft_dir)
    a = first_key(tensors, "A")
    b = a.replace("lora_A", "lora_B")
    layer = a.split("layers.")[1].split(".")[0]
    for key in (a, b):
        tensors[key.replace(f"layers.{layer}.", f"layers.{2**40}.")] = tensors.pop(key)
    resave(peft_dir, tensors)
    with pytest.raises(lorart.LoraError, match="outside int32"):  # before: OverflowError
        lora.from_peft(peft_dir)


def test_adapter_non_finite_values_name_the_tensor(peft_dir):
    tensors = tensors_of(peft_dir)
    b = first_key(tensors, "B")
    tensors[b] = tensors[b].copy()
    tensors[b][0, 0] = np.inf
    resave(peft_dir, tensors)
    path = b.removesuffix(".weight").removesuffix(".lora_B")
    with pytest.raises(lorart.LoraError, match=f"{path}.lora_B holds non-finite values"):
        lora.from_peft(peft_dir)  # before: accepted without a model, inf in the rows


def test_float16_overflow_is_refused(peft_dir):
    tensors = tensors_of(peft_dir)
    b = first_key(tensors, "B")
    tensors[b] = tensors[b].copy()
    tensors[b][0, 0] = 1e6
    resave(peft_dir, tensors)
    with pytest.raises(lorart.LoraError, match="value 2e[+]06 overflows float16"):
        lora.from_peft(peft_dir, dtype="float16")  # before: silently inf
    assert lora.from_peft(peft_dir, dtype="bfloat16")[0].dtype == "bfloat16"


def edit_config(peft_dir: Path, **changes) -> None:
    path = peft_dir / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"r": "8"}, r"r is '8'; expected an integer"),
        ({"r": 0}, r"r is 0; expected an integer in \[1,"),
        ({"lora_alpha": "x"}, "lora_alpha is 'x'; expected a finite number"),
        ({"rank_pattern": {"q_proj": "four"}}, "rank_pattern"),
        ({"rank_pattern": {"(": 4}}, "not a valid regex"),
        ({"alpha_pattern": ["x"]}, "alpha_pattern"),
        ({"use_rslora": "yes"}, "use_rslora is 'yes'; expected true or false"),
        ({"layers_to_transform": ["0"]}, "layers_to_transform"),
        ({"target_modules": 5}, "target_modules"),
        ({"peft_type": 5}, "peft_type"),
        ({"modules_to_save": "lm_head"}, "modules_to_save"),
    ],
)
def test_adapter_config_fields(peft_dir, changes, match):
    edit_config(peft_dir, **changes)
    with pytest.raises(lorart.LoraError, match=match) as exc:
        lora.from_peft(peft_dir)
    assert "adapter_config.json" in str(exc.value)


@pytest.mark.parametrize("text", ["[1, 2]", "null", "{oops", "\udcff"])
def test_adapter_config_not_an_object(peft_dir, text):
    (peft_dir / "adapter_config.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(lorart.LoraError, match="adapter_config.json"):
        lora.from_peft(peft_dir)


@pytest.fixture
def bin_dir(peft_dir) -> Path:
    (peft_dir / "adapter_model.safetensors").unlink()
    return peft_dir


@pytest.mark.parametrize("raw", [b"", b"garbage", b"PK\x03\x04broken zip"])
def test_adapter_bin_not_a_state_dict(bin_dir, raw):
    (bin_dir / "adapter_model.bin").write_bytes(raw)
    with pytest.raises(lorart.LoraError, match="adapter_model.bin: not a readable torch state"):
        lora.from_peft(bin_dir)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda torch: [1, 2], "expected a state dict"),
        (lambda torch: {"x": 3}, "is not a named tensor"),
        (lambda torch: {"a.lora_A.weight": torch.arange(4)}, "dtype torch.int64"),
    ],
    ids=["list", "int-value", "int-tensor"],
)
def test_adapter_bin_wrong_contents(bin_dir, make, match):
    import torch

    torch.save(make(torch), bin_dir / "adapter_model.bin")
    with pytest.raises(lorart.LoraError, match=match):
        lora.from_peft(bin_dir)


def test_adapter_bin_valid_still_loads(all_proj_adapter, bin_dir, model_config):
    import torch

    tensors = load_file(str(all_proj_adapter.dir / "adapter_model.safetensors"))
    torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, bin_dir / "adapter_model.bin")
    w_bin, c_bin = lora.from_peft(bin_dir, model_config)
    w_st, c_st = lora.from_peft(all_proj_adapter.dir, model_config)
    np.testing.assert_array_equal(w_bin.numpy(), w_st.numpy())
    np.testing.assert_array_equal(c_bin.numpy(), c_st.numpy())


# ----------------------------------------------------------------------------- .npy pair


@pytest.fixture
def npy_dir(all_proj_adapter, model_config, tmp_path) -> Path:
    lora.save_npy(tmp_path, *lora.from_peft(all_proj_adapter.dir, model_config))
    return tmp_path


def test_npy_config_int64_min_is_refused(npy_dir):
    table = np.load(npy_dir / lora.CONFIG_FILE).astype(np.int64)
    table[0, 0, 0] = -(2**63)  # before: np.abs overflowed, the check passed, the id became 0
    np.save(npy_dir / lora.CONFIG_FILE, table)
    with pytest.raises(lorart.LoraError) as exc:
        lora.load_npy(npy_dir)
    msg = str(exc.value)
    assert lora.CONFIG_FILE in msg and "module_id" in msg and "-9223372036854775808" in msg


@pytest.mark.parametrize("column,name", [(1, "layer_idx"), (2, "adapter_size")])
def test_npy_config_uint64_out_of_range(npy_dir, column, name):
    table = np.load(npy_dir / lora.CONFIG_FILE).astype(np.uint64)
    table[0, 1, column] = 2**63
    np.save(npy_dir / lora.CONFIG_FILE, table)
    with pytest.raises(lorart.LoraError, match=rf"{name} 9223372036854775808 at index \[0, 1, "):
        lora.load_npy(npy_dir)


def npy_header(shape, descr="<f4", fortran=False) -> bytes:
    header = repr({"descr": descr, "fortran_order": fortran, "shape": tuple(shape)}).encode()
    header += b" " * (-(10 + len(header) + 1) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header


@pytest.mark.parametrize(
    "raw,match",
    [
        (b"", "not a readable .npy file"),  # before: EOFError
        (b"\x93NUMPY\x01", "not a readable .npy file"),
        (b"PK\x03\x04" + b"\0" * 60, "not a readable .npy file"),
        (npy_header((2**40, 16)), "needs 70368744177664"),  # before: MemoryError
        (npy_header((-1, 16)), "not a tuple of non-negative ints"),  # before: OverflowError
        (npy_header((0, 2**62)), "limit"),
        (npy_header((True, 2)), "not a tuple of non-negative ints"),
        (npy_header((1, 4), descr="|O"), "not a plain numeric dtype"),
        (npy_header((1, 4), descr="<f8") + b"\0" * 32, "dtype <f8 is not supported"),
        (npy_header((1, 4), descr="<i4") + b"\0" * 16, "dtype <i4 is not supported"),
        (npy_header((1, 4)) + b"\0" * 15, "holds 15 data bytes"),
        # Zero bytes per value passed the size bound and then asked numpy for 4 TiB.
        (npy_header((2**40,), descr="<U0"), "not a plain numeric dtype"),
        (npy_header((2**62, 2**62), descr="|S0"), "not a plain numeric dtype"),
        (npy_header((1, 4)) + b"\0" * 17, "holds 17 data bytes"),
        (b"\x93NUMPY\x09\x00" + b"\0" * 60, "version"),
        (b"\x93NUMPY\x01\x00\x20\x00{'descr': 'zz', 'shape': (1,)}   ", "not a readable .npy"),
    ],
)
def test_npy_weights_malformed(npy_dir, raw, match):
    path = npy_dir / lora.WEIGHTS_FILE
    path.write_bytes(raw)
    with pytest.raises(lorart.LoraError, match=match) as exc:
        lora.load_npy(npy_dir)
    assert lora.WEIGHTS_FILE in str(exc.value)


@pytest.mark.parametrize(
    "table,match",
    [
        (np.zeros((1, 2, 3), np.float32), "expected int32 values, got dtype <f4"),
        (np.zeros((1, 2, 3), np.bool_), "expected int32 values"),
        (np.zeros((2, 2, 3), np.int32), "leading dim of the 3-D form must be 1"),
        (np.zeros((2, 5), np.int32), "3 columns"),
    ],
)
def test_npy_config_malformed(npy_dir, table, match):
    np.save(npy_dir / lora.CONFIG_FILE, table)
    with pytest.raises(lorart.LoraError, match=match) as exc:
        lora.load_npy(npy_dir)
    assert lora.CONFIG_FILE in str(exc.value)


@pytest.mark.parametrize("weights_dtype", [">f4", ">f2"])
def test_npy_big_endian_files_keep_their_values(npy_dir, weights_dtype):
    weights, config = lora.load_npy(npy_dir)
    # Copies: the loaded weights map the file that is rewritten below.
    values, table = np.array(weights.numpy(), np.float32), np.array(config.numpy())
    del weights, config
    if weights_dtype == ">f2":
        values = values.astype(np.float16)
    np.save(npy_dir / lora.WEIGHTS_FILE, values[None].astype(weights_dtype))
    np.save(npy_dir / lora.CONFIG_FILE, table[None].astype(">i4"))
    w2, c2 = lora.load_npy(npy_dir)
    assert w2.dtype == ("float32" if weights_dtype == ">f4" else "float16")
    np.testing.assert_array_equal(w2.numpy(), values)
    np.testing.assert_array_equal(c2.numpy(), table)


def test_npy_fortran_order_and_2d_files_load(npy_dir):
    weights, config = lora.load_npy(npy_dir)
    values, table = np.array(weights.numpy()), np.array(config.numpy())
    del weights, config
    np.save(npy_dir / lora.WEIGHTS_FILE, np.asfortranarray(values))
    np.save(npy_dir / lora.CONFIG_FILE, table.astype(np.int64))
    w2, c2 = lora.load_npy(npy_dir)
    np.testing.assert_array_equal(w2.numpy(), values)
    np.testing.assert_array_equal(c2.numpy(), table)


# ----------------------------------------------------------------------------- checkpoints


def copy_checkpoint(src: Path, dst: Path, config_edit=None, tensors=None) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    config = json.loads((src / "config.json").read_text())
    if config_edit:
        config_edit(config)
    (dst / "config.json").write_text(json.dumps(config))
    if tensors is None:
        shutil.copy(src / "model.safetensors", dst / "model.safetensors")
    else:
        save_file(tensors, str(dst / "model.safetensors"))
    return dst


@pytest.fixture
def no_allocation(monkeypatch):
    """Fails the test if the weights would be allocated (the builder zeroes every buffer)."""

    def refuse(*args, **kwargs):
        raise AssertionError("ModelWeightsBuilder was created before the checkpoint was checked")

    monkeypatch.setattr(lorart._core, "ModelWeightsBuilder", refuse)


def from_pretrained(model_dir):
    from lorart.model import Model

    return Model.from_pretrained(model_dir, max_num_tokens=16, num_kv_blocks=2)


def test_config_claiming_more_layers_fails_before_allocating(llama_dir, tmp_path, no_allocation):
    def claim(cfg):
        cfg["num_hidden_layers"] = 4000

    model_dir = copy_checkpoint(llama_dir, tmp_path, claim)
    with pytest.raises(ValueError) as exc:
        from_pretrained(model_dir)
    msg = str(exc.value)
    assert "missing 35973 tensor(s)" in msg, msg  # 9 per layer for layers 3..3999
    assert "'model.layers.3.input_layernorm.weight'" in msg
    assert "num_hidden_layers = 4000; the checkpoint holds layers 0..2" in msg


def test_config_claiming_huge_sizes_fails_before_allocating(llama_dir, tmp_path, no_allocation):
    def claim(cfg):
        cfg["vocab_size"] = 2**31 - 1
        cfg["hidden_size"] = 2**20
        cfg["head_dim"] = 16

    model_dir = copy_checkpoint(llama_dir, tmp_path, claim)
    with pytest.raises(
        ValueError, match=r"has shape \[128, 64\], config.json implies \[2147483647, 1048576\]"
    ):
        from_pretrained(model_dir)


def test_checkpoint_tensor_errors(llama_dir, tmp_path, no_allocation):
    weights = load_file(str(llama_dir / "model.safetensors"))
    cases = {
        "unexpected": (
            {**weights, "model.layers.0.extra.weight": np.zeros(2, np.float32)},
            "extra",
        ),
        "dtype": (
            {**weights, "model.norm.weight": weights["model.norm.weight"].astype(np.int32)},
            "'model.norm.weight' has dtype I32",
        ),
        "both": (
            {
                **weights,
                "model.layers.1.mlp.gate_up_proj.weight": np.zeros((192, 64), np.float32),
            },
            "both 'model.layers.1.mlp.gate_up_proj.weight' and",
        ),
    }
    for case, (tensors, match) in cases.items():
        with pytest.raises(ValueError, match=match):
            from_pretrained(copy_checkpoint(llama_dir, tmp_path / case, tensors=tensors))


def test_checkpoint_with_malformed_safetensors(llama_dir, tmp_path):
    model_dir = copy_checkpoint(llama_dir, tmp_path)
    write_safetensors(model_dir / "model.safetensors", {"a": entry(offsets=(-4, 0))}, F32x2[:4])
    with pytest.raises(ValueError, match="model.safetensors: tensor 'a': data_offsets"):
        from_pretrained(model_dir)


def shard(llama_dir: Path, dst: Path, weight_map_edit=None) -> Path:
    """The checkpoint split into two shards with an index."""
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(llama_dir / "config.json", dst / "config.json")
    weights = load_file(str(llama_dir / "model.safetensors"))
    names = sorted(weights)
    halves = {"a.safetensors": names[::2], "b.safetensors": names[1::2]}
    weight_map = {}
    for file, part in halves.items():
        save_file({n: weights[n] for n in part}, str(dst / file))
        weight_map.update(dict.fromkeys(part, file))
    index = {"metadata": {}, "weight_map": weight_map}
    if weight_map_edit:
        weight_map_edit(index)
    (dst / hf.INDEX_FILE).write_text(json.dumps(index))
    return dst


def first_in(index: dict, shard_name: str) -> str:
    return next(k for k, v in index["weight_map"].items() if v == f"{shard_name}.safetensors")


def test_sharded_checkpoint_loads(llama_dir, tmp_path):
    model = from_pretrained(shard(llama_dir, tmp_path))
    assert model.config.num_layers == 3


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda ix: ix.update(weight_map=["a"]), "non-empty 'weight_map'"),
        (lambda ix: ix.clear(), "non-empty 'weight_map'"),
        (lambda ix: ix["weight_map"].update(x="../../etc/passwd"), "file name of a shard"),
        (lambda ix: ix["weight_map"].update(x=3), "file name of a shard"),
        (lambda ix: ix["weight_map"].update(x="a.safetensors"), "'x' in a.safetensors"),
        (lambda ix: ix["weight_map"].update({first_in(ix, "b"): "a.safetensors"}), "not hold it"),
    ],
    ids=["list", "empty", "traversal", "int", "absent", "wrong-shard"],
)
def test_sharded_index_malformed(llama_dir, tmp_path, edit, match):
    model_dir = shard(llama_dir, tmp_path, edit)
    with pytest.raises(ValueError, match=match):
        hf.check_checkpoint(model_dir, hf.load_config(model_dir))


def test_tensor_in_two_shards(llama_dir, tmp_path):
    model_dir = shard(llama_dir, tmp_path)
    a = load_file(str(model_dir / "a.safetensors"))
    b = load_file(str(model_dir / "b.safetensors"))
    name = next(iter(b))
    save_file({**a, name: b[name]}, str(model_dir / "a.safetensors"))
    with pytest.raises(ValueError, match=f"'{name}' is in both a.safetensors and b.safetensors"):
        hf.check_checkpoint(model_dir, hf.load_config(model_dir))


# ----------------------------------------------------------------------------- fuzz targets


def test_fuzz_targets_run_clean(tmp_path):
    """Every fuzz target over its seeds plus a bounded, seeded run (tests/fuzz/run.py)."""
    pytest.importorskip("atheris")
    if "asan" in os.environ.get("LD_PRELOAD", ""):
        pytest.skip("atheris brings its own libFuzzer runtime; the fuzz run is the plain pass's")
    run = Path(__file__).parents[1] / "fuzz" / "run.py"
    cmd = [sys.executable, str(run), "--runs", "400", "--seed", "1", "--workdir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("no findings") == 4, proc.stdout

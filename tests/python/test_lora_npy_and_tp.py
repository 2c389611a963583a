"""TensorRT-LLM .npy file pair, LoraWeights/LoraConfig construction, and tensor-parallel split."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import (
    ALL_PROJECTIONS,
    COLUMN_MODULES,
    ROW_MODULES,
    TINY_LLAMA,
    Dims,
    bits,
    parse_rows,
)

import lorart

DIMS = Dims.from_kwargs(TINY_LLAMA)
MHA_DIMS = Dims.from_kwargs({**TINY_LLAMA, "num_key_value_heads": 4})


@pytest.fixture(scope="module")
def converted(all_proj_adapter, model_config):
    """{dtype: (LoraWeights, LoraConfig)} from the all-projection adapter."""
    return {
        dt: lorart.lora.from_peft(str(all_proj_adapter.dir), model_config, dtype=dt)
        for dt in ("float32", "float16", "bfloat16")
    }


# ----------------------------------------------------------------------------- npy files


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_save_load_round_trip(converted, tmp_path, dtype):
    weights, config = converted[dtype]
    lorart.lora.save_npy(str(tmp_path), weights, config)
    w2, c2 = lorart.lora.load_npy(str(tmp_path))
    w, w_back = weights.numpy(), w2.numpy()
    assert str(w_back.dtype) == dtype
    assert w_back.shape == w.shape
    np.testing.assert_array_equal(bits(w_back), bits(w))
    assert c2.numpy().dtype == np.int32
    np.testing.assert_array_equal(c2.numpy(), config.numpy())


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_saved_files_are_3d(converted, tmp_path, dtype):
    weights, config = converted[dtype]
    lorart.lora.save_npy(str(tmp_path), weights, config)
    rows, max_row = weights.numpy().shape
    fw = np.load(tmp_path / "model.lora_weights.npy", allow_pickle=False)
    fc = np.load(tmp_path / "model.lora_config.npy", allow_pickle=False)
    assert fw.shape == (1, rows, max_row)
    assert fc.shape == (1, rows, 3)
    assert fc.dtype == np.int32
    np.testing.assert_array_equal(fc[0], config.numpy())
    assert fw.dtype.itemsize == np.dtype(weights.numpy().dtype).itemsize
    if dtype != "bfloat16":  # plain numpy dtypes: readable by anyone as-is
        assert fw.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(fw[0], weights.numpy())
    else:
        np.testing.assert_array_equal(bits(np.ascontiguousarray(fw[0])), bits(weights.numpy()))


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_load_hand_written_files(tmp_path, ndim, dtype):
    """Files as TensorRT-LLM's converter (3-D) or a user (2-D) writes them with numpy."""
    rng = np.random.default_rng(0)
    c = np.array([[1, 0, 2], [6, 2, 1]], dtype=np.int32)
    w = np.zeros((2, 2 * (64 + 64)), dtype=dtype)
    w[0, :] = rng.standard_normal(256)
    w[1, : 96 + 64] = rng.standard_normal(160)
    if ndim == 3:
        np.save(tmp_path / "model.lora_weights.npy", w[None])
        np.save(tmp_path / "model.lora_config.npy", c[None])
    else:
        np.save(tmp_path / "model.lora_weights.npy", w)
        np.save(tmp_path / "model.lora_config.npy", c)
    weights, config = lorart.lora.load_npy(str(tmp_path))
    assert weights.numpy().dtype == dtype
    np.testing.assert_array_equal(weights.numpy(), w)
    np.testing.assert_array_equal(config.numpy(), c)


def test_load_npy_missing_files(tmp_path):
    with pytest.raises(lorart.LoraError, match=r"lora_weights|lora_config"):
        lorart.lora.load_npy(str(tmp_path))


# ----------------------------------------------------------------------------- wrappers


def test_lora_weights_from_2d_numpy_shares_memory():
    a = np.random.default_rng(1).standard_normal((5, 40)).astype(np.float32)
    w = lorart.LoraWeights(a)
    assert w.numpy().shape == (5, 40)
    np.testing.assert_array_equal(w.numpy(), a)
    assert np.shares_memory(w.numpy(), a)


def test_lora_weights_from_3d_numpy():
    a = np.random.default_rng(2).standard_normal((1, 5, 40)).astype(np.float32)
    w = lorart.LoraWeights(a)
    assert w.numpy().shape == (5, 40)
    np.testing.assert_array_equal(w.numpy(), a[0])
    assert np.shares_memory(w.numpy(), a)


@pytest.mark.parametrize("leading", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_lora_weights_from_torch(dtype, leading):
    t = torch.randn(4, 24, generator=torch.Generator().manual_seed(3)).to(dtype)
    w = lorart.LoraWeights(t[None] if leading else t)
    arr = w.numpy()
    assert arr.shape == (4, 24)
    assert str(arr.dtype) == str(dtype).removeprefix("torch.")
    np.testing.assert_array_equal(arr.astype(np.float32), t.float().numpy())


@pytest.mark.parametrize(
    "make",
    [
        lambda c: c,
        lambda c: c[None],
        lambda c: torch.from_numpy(c),
        lambda c: torch.from_numpy(c)[None],
    ],
    ids=["np2d", "np3d", "torch2d", "torch3d"],
)
def test_lora_config_from_arrays(make):
    c = np.array([[1, 0, 8], [7, 2, 4], [4, 1, 2]], dtype=np.int32)
    cfg = lorart.LoraConfig(make(c))
    assert cfg.numpy().dtype == np.int32
    np.testing.assert_array_equal(cfg.numpy(), c)


# ----------------------------------------------------------------------------- TP split


@pytest.fixture(scope="module")
def tp_cases(make_adapter, llama_dir, llama_mha_dir, model_config, mha_model_config):
    kwargs = dict(
        r=8,
        lora_alpha=16,
        target_modules=ALL_PROJECTIONS,
        rank_pattern={"q_proj": 4, "down_proj": 2},
    )
    gqa = make_adapter(llama_dir, **kwargs)
    mha = make_adapter(llama_mha_dir, **kwargs)
    return {
        "gqa": (gqa, model_config, DIMS),
        "mha": (mha, mha_model_config, MHA_DIMS),
    }


@pytest.mark.parametrize(("case", "tp"), [("gqa", 2), ("mha", 2), ("mha", 4)])
def test_tp_split(tp_cases, case, tp):
    adapter, mc, dims = tp_cases[case]
    weights, config = lorart.lora.from_peft(str(adapter.dir), mc)
    full = parse_rows(weights.numpy(), config.numpy(), dims.module_dims)

    shards = []
    for rank in range(tp):
        w_r, c_r = lorart.lora.tp_split(weights, config, mc, tp, rank)
        assert c_r.numpy().dtype == np.int32
        np.testing.assert_array_equal(c_r.numpy(), config.numpy())
        assert w_r.numpy().dtype == weights.numpy().dtype

        def shard_dims(mid, tp=tp):
            hi, ho = dims.module_dims(mid)
            return (hi, ho // tp) if mid in COLUMN_MODULES else (hi // tp, ho)

        shards.append(parse_rows(w_r.numpy(), c_r.numpy(), shard_dims))

    rng = np.random.default_rng(7)
    for i, (mid, layer, a, b) in enumerate(full):
        hi, ho = dims.module_dims(mid)
        x = rng.standard_normal((3, hi))
        y_full = x @ a.T.astype(np.float64) @ b.T.astype(np.float64)
        parts = [s[i] for s in shards]
        assert all((p[0], p[1]) == (mid, layer) for p in parts)
        if mid in COLUMN_MODULES:
            blk = ho // tp
            for rank, (_, _, a_r, b_r) in enumerate(parts):
                np.testing.assert_array_equal(a_r, a)
                np.testing.assert_array_equal(b_r, b[rank * blk : (rank + 1) * blk])
            y = np.concatenate([x @ a_r.T @ b_r.T for _, _, a_r, b_r in parts], axis=1)
        else:
            assert mid in ROW_MODULES
            blk = hi // tp
            y = np.zeros_like(y_full)
            for rank, (_, _, a_r, b_r) in enumerate(parts):
                np.testing.assert_array_equal(a_r, a[:, rank * blk : (rank + 1) * blk])
                np.testing.assert_array_equal(b_r, b)
                x_r = x[:, rank * blk : (rank + 1) * blk]
                y += x_r @ a_r.T @ b_r.T
        np.testing.assert_allclose(y, y_full, rtol=1e-5, atol=1e-5, err_msg=f"{(mid, layer)}")


def test_tp_split_size_1_is_identity(tp_cases):
    adapter, mc, _ = tp_cases["gqa"]
    weights, config = lorart.lora.from_peft(str(adapter.dir), mc)
    w1, c1 = lorart.lora.tp_split(weights, config, mc, 1, 0)
    np.testing.assert_array_equal(c1.numpy(), config.numpy())
    np.testing.assert_array_equal(w1.numpy(), weights.numpy())


@pytest.mark.parametrize(("tp", "rank"), [(2, 2), (2, -1), (3, 0), (0, 0)])
def test_tp_split_bad_arguments(tp_cases, tp, rank):
    adapter, mc, _ = tp_cases["gqa"]
    weights, config = lorart.lora.from_peft(str(adapter.dir), mc)
    with pytest.raises((ValueError, TypeError)):
        lorart.lora.tp_split(weights, config, mc, tp, rank)

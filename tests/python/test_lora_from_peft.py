"""lorart.lora.from_peft / unpack against PEFT's own tensors (A, and B times PEFT's scaling)."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
from tiny_models import (
    ALL_PROJECTIONS,
    MODULE_IDS,
    TINY_LLAMA,
    Dims,
    parse_rows,
    peft_scalings,
)

import lorart

DIMS = Dims.from_kwargs(TINY_LLAMA)


def rows_of(weights, config):
    w, c = weights.numpy(), config.numpy()
    assert c.dtype == np.int32
    assert c.ndim == 2 and c.shape[1] == 3
    assert w.ndim == 2 and w.shape[0] == c.shape[0]
    return w, c


def assert_matches_peft(weights, config, ref, rtol=1e-6):
    """Every row equals PEFT's (A, B*scaling); the row set is exactly PEFT's LoRA layers."""
    w, c = rows_of(weights, config)
    keys = [(int(m), int(layer)) for m, layer, _ in c]
    assert len(set(keys)) == len(keys), f"duplicate rows: {keys}"
    assert set(keys) == set(ref)
    expected_rows = {(m, layer, ref[(m, layer)][0].shape[0]) for (m, layer) in ref}
    assert {tuple(int(v) for v in row) for row in c} == expected_rows
    for mid, layer, a, b in parse_rows(w.astype(np.float32), c, DIMS.module_dims):
        ref_a, ref_b = ref[(mid, layer)]
        np.testing.assert_allclose(a, ref_a, rtol=rtol, atol=0, err_msg=f"A of {(mid, layer)}")
        np.testing.assert_allclose(b, ref_b, rtol=rtol, atol=0, err_msg=f"B of {(mid, layer)}")
    max_row = max(int(r) * sum(DIMS.module_dims(int(m))) for m, _, r in c)
    assert w.shape[1] == max_row


# ----------------------------------------------------------------------------- conversions


def test_all_projections_match_peft(all_proj_adapter, model_config):
    weights, config = lorart.lora.from_peft(str(all_proj_adapter.dir), model_config)
    assert weights.numpy().dtype == np.float32
    assert len(all_proj_adapter.ref) == 7 * 3
    assert_matches_peft(weights, config, all_proj_adapter.ref)


def test_all_projections_without_model_config(all_proj_adapter, model_config):
    w1, c1 = lorart.lora.from_peft(all_proj_adapter.dir)  # a pathlib.Path works too
    w2, c2 = lorart.lora.from_peft(str(all_proj_adapter.dir), model_config)
    assert_matches_peft(w1, c1, all_proj_adapter.ref)
    np.testing.assert_array_equal(c1.numpy(), c2.numpy())
    np.testing.assert_array_equal(w1.numpy(), w2.numpy())


def test_shape_attribute(all_proj_adapter, model_config):
    weights, config = lorart.lora.from_peft(str(all_proj_adapter.dir), model_config)
    assert tuple(weights.shape) == weights.numpy().shape
    assert tuple(config.shape) == config.numpy().shape == (21, 3)


def test_gate_proj_is_5_and_up_proj_is_7(all_proj_adapter, model_config):
    """gate_proj and up_proj have the same shape; only the ids tell them apart."""
    weights, config = lorart.lora.from_peft(str(all_proj_adapter.dir), model_config)
    w, c = rows_of(weights, config)
    rows = {(m, layer): (a, b) for m, layer, a, b in parse_rows(w, c, DIMS.module_dims)}
    mlp = all_proj_adapter.model.base_model.model.model.layers[1].mlp
    for proj, mid in (("gate_proj", 5), ("up_proj", 7)):
        mod = getattr(mlp, proj)
        a = mod.lora_A["default"].weight.detach().numpy()
        b = mod.lora_B["default"].weight.detach().numpy() * mod.scaling["default"]
        np.testing.assert_allclose(rows[(mid, 1)][0], a, rtol=1e-6, err_msg=proj)
        np.testing.assert_allclose(rows[(mid, 1)][1], b, rtol=1e-6, err_msg=proj)


@pytest.mark.parametrize("proj", ["gate_proj", "up_proj", "o_proj", "down_proj"])
def test_single_module_id(make_adapter, llama_dir, model_config, proj):
    ad = make_adapter(llama_dir, r=4, lora_alpha=8, target_modules=[proj])
    weights, config = lorart.lora.from_peft(str(ad.dir), model_config)
    c = config.numpy()
    assert sorted(map(tuple, c.tolist())) == [(MODULE_IDS[proj], layer, 4) for layer in range(3)]
    assert_matches_peft(weights, config, ad.ref)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_rank_and_alpha_pattern(make_adapter, llama_dir, model_config, use_rslora):
    ad = make_adapter(
        llama_dir,
        r=8,
        lora_alpha=16,
        target_modules=ALL_PROJECTIONS,
        rank_pattern={"q_proj": 4, "down_proj": 2, "model.layers.1.mlp.up_proj": 3},
        alpha_pattern={"q_proj": 32, "v_proj": 4},
        use_rslora=use_rslora,
    )
    ranks = {key: a.shape[0] for key, (a, _) in ad.ref.items()}
    # The patterns must have taken effect in PEFT itself, or this test proves nothing.
    assert ranks[(1, 0)] == 4 and ranks[(6, 2)] == 2 and ranks[(7, 1)] == 3
    assert ranks[(7, 0)] == 8 and ranks[(3, 0)] == 8
    sc = peft_scalings(ad.model)
    root = math.sqrt if use_rslora else (lambda r: r)
    assert sc[(1, 0)] == pytest.approx(32 / root(4))
    assert sc[(3, 0)] == pytest.approx(4 / root(8))
    assert sc[(6, 0)] == pytest.approx(16 / root(2))
    assert sc[(7, 1)] == pytest.approx(16 / root(3))

    weights, config = lorart.lora.from_peft(str(ad.dir), model_config)
    assert_matches_peft(weights, config, ad.ref)


def test_rslora(make_adapter, llama_dir, model_config):
    ad = make_adapter(
        llama_dir, r=16, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "down_proj"]
    )
    for s in peft_scalings(ad.model).values():
        assert s == pytest.approx(8 / 4.0)  # alpha / sqrt(r), not alpha / r = 0.5
    weights, config = lorart.lora.from_peft(str(ad.dir), model_config)
    assert_matches_peft(weights, config, ad.ref)


def test_subset_q_v(make_adapter, llama_dir, model_config):
    ad = make_adapter(
        llama_dir, r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
    )
    weights, config = lorart.lora.from_peft(str(ad.dir), model_config)
    expected = {(m, layer, 4) for m in (1, 3) for layer in range(3)}
    assert set(map(tuple, config.numpy().tolist())) == expected
    assert weights.numpy().shape == (6, 4 * (64 + 64))
    assert_matches_peft(weights, config, ad.ref)


def test_layers_to_transform(make_adapter, llama_dir, model_config):
    ad = make_adapter(
        llama_dir, r=4, lora_alpha=8, target_modules=ALL_PROJECTIONS, layers_to_transform=[0, 2]
    )
    assert {layer for _, layer in ad.ref} == {0, 2}
    weights, config = lorart.lora.from_peft(str(ad.dir), model_config)
    c = config.numpy()
    assert set(c[:, 1].tolist()) == {0, 2}
    assert len(c) == 14
    assert_matches_peft(weights, config, ad.ref)


def test_target_modules_regex(make_adapter, llama_dir, model_config):
    ad = make_adapter(
        llama_dir,
        r=2,
        lora_alpha=6,
        target_modules=r".*\.layers\.[12]\.(self_attn\.k_proj|mlp\.up_proj)",
    )
    assert set(ad.ref) == {(2, 1), (2, 2), (7, 1), (7, 2)}
    weights, config = lorart.lora.from_peft(str(ad.dir), model_config)
    assert_matches_peft(weights, config, ad.ref)


def test_max_row_and_zero_padding(make_adapter, llama_dir, model_config):
    ad = make_adapter(
        llama_dir,
        r=8,
        lora_alpha=16,
        target_modules=ALL_PROJECTIONS,
        rank_pattern={"q_proj": 2, "k_proj": 1},
    )
    weights, config = lorart.lora.from_peft(str(ad.dir), model_config)
    w, c = rows_of(weights, config)
    used = [int(r) * sum(DIMS.module_dims(int(m))) for m, _, r in c]
    assert w.shape[1] == max(used) == 8 * (64 + 96)
    for row, n in zip(w, used, strict=True):
        assert np.all(row[n:] == 0)
        assert np.count_nonzero(row[:n]) > 0.9 * n  # random values actually stored


@pytest.mark.parametrize(
    ("dtype", "mantissa_bits"), [("float16", 10), ("bfloat16", 7), ("float32", 23)]
)
def test_storage_dtype(all_proj_adapter, model_config, dtype, mantissa_bits):
    ref_w, ref_c = lorart.lora.from_peft(str(all_proj_adapter.dir), model_config)
    weights, config = lorart.lora.from_peft(str(all_proj_adapter.dir), model_config, dtype=dtype)
    w = weights.numpy()
    assert str(w.dtype) == dtype
    np.testing.assert_array_equal(config.numpy(), ref_c.numpy())
    assert w.shape == ref_w.numpy().shape
    expected = ref_w.numpy().astype(w.dtype).astype(np.float32)
    got = w.astype(np.float32)
    # Exact to the storage dtype: at most one unit in the last place (rounding of B*scaling).
    tiny = float(np.finfo(np.float16).smallest_subnormal) if dtype == "float16" else 0.0
    ulp = np.maximum(np.abs(expected) * 2.0**-mantissa_bits, tiny)
    assert np.all(np.abs(got - expected) <= ulp), np.max(np.abs(got - expected) / (ulp + 1e-30))
    assert np.mean(got == expected) > 0.99
    assert np.all(got[expected == 0] == 0)


def test_unpack_matches_peft_in_row_order(make_adapter, llama_dir, model_config):
    ad = make_adapter(
        llama_dir,
        r=8,
        lora_alpha=16,
        target_modules=ALL_PROJECTIONS,
        rank_pattern={"o_proj": 3},
    )
    weights, config = lorart.lora.from_peft(str(ad.dir), model_config)
    parts = lorart.lora.unpack(weights, config, model_config)
    c = config.numpy()
    assert len(parts) == len(c)
    for (mid, layer, a, b), row in zip(parts, c, strict=True):
        assert (int(mid), int(layer)) == (int(row[0]), int(row[1]))
        assert a.dtype == np.float32 and b.dtype == np.float32
        hi, ho = DIMS.module_dims(int(mid))
        assert a.shape == (int(row[2]), hi) and b.shape == (ho, int(row[2]))
        ref_a, ref_b = ad.ref[(int(mid), int(layer))]
        np.testing.assert_allclose(a, ref_a, rtol=1e-6, atol=0)
        np.testing.assert_allclose(b, ref_b, rtol=1e-6, atol=0)


def test_unpack_of_float16(all_proj_adapter, model_config):
    weights, config = lorart.lora.from_peft(
        str(all_proj_adapter.dir), model_config, dtype="float16"
    )
    for mid, layer, a, b in lorart.lora.unpack(weights, config, model_config):
        assert a.dtype == np.float32 and b.dtype == np.float32
        ref_a, ref_b = all_proj_adapter.ref[(mid, layer)]
        np.testing.assert_allclose(a, ref_a, rtol=2**-10, atol=1e-7)
        np.testing.assert_allclose(b, ref_b, rtol=2**-10, atol=1e-7)


# ----------------------------------------------------------------------------- errors


def test_lora_error_is_value_error():
    assert issubclass(lorart.LoraError, ValueError)


def test_missing_dir(tmp_path):
    missing = tmp_path / "no_such_adapter"
    with pytest.raises(lorart.LoraError, match=r"no_such_adapter|adapter_config"):
        lorart.lora.from_peft(str(missing))


def test_missing_adapter_config(all_proj_adapter, tmp_path):
    d = tmp_path / "ad"
    shutil.copytree(all_proj_adapter.dir, d)
    (d / "adapter_config.json").unlink()
    with pytest.raises(lorart.LoraError, match=r"adapter_config\.json"):
        lorart.lora.from_peft(str(d))


def test_missing_weights_file(all_proj_adapter, tmp_path):
    d = tmp_path / "ad"
    shutil.copytree(all_proj_adapter.dir, d)
    (d / "adapter_model.safetensors").unlink()
    with pytest.raises(lorart.LoraError, match="adapter_model"):
        lorart.lora.from_peft(str(d))


def test_dora_on_lm_head_rejected(make_adapter, llama_dir, model_config):
    """DoRA is converted for the per-layer projections only (tests: test_lora_peft_extended)."""
    ad = make_adapter(
        llama_dir, r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], use_dora=True
    )
    assert json.loads((ad.dir / "adapter_config.json").read_text())["use_dora"] is True
    with pytest.raises(lorart.LoraError, match=r"DoRA on lm_head"):
        lorart.lora.from_peft(str(ad.dir), model_config)


def test_rank_mismatch(make_adapter, llama_dir, model_config, tmp_path):
    from safetensors.numpy import load_file, save_file

    ad = make_adapter(llama_dir, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    d = tmp_path / "ad"
    shutil.copytree(ad.dir, d)
    f = d / "adapter_model.safetensors"
    tensors = load_file(str(f))
    key = next(k for k in tensors if "layers.1.self_attn.v_proj.lora_B" in k)
    b = tensors[key]
    assert b.shape == (32, 4)
    tensors[key] = np.concatenate([b, np.ones((32, 1), b.dtype)], axis=1)  # [Ho, r+1]
    save_file(tensors, str(f), metadata={"format": "pt"})
    with pytest.raises(lorart.LoraError, match=r"(?i)rank"):
        lorart.lora.from_peft(str(d), model_config)
    with pytest.raises(lorart.LoraError, match=r"(?i)rank"):
        lorart.lora.from_peft(str(d))


def test_model_config_mismatch(all_proj_adapter, llama_other_dir):
    other = lorart.hf.load_config(str(llama_other_dir))
    assert other.hidden_size == 32
    with pytest.raises(lorart.LoraError):
        lorart.lora.from_peft(str(all_proj_adapter.dir), other)


def test_unsupported_target_module(make_adapter, llama_dir, model_config):
    ad = make_adapter(llama_dir, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    cfg = json.loads((ad.dir / "adapter_config.json").read_text())
    cfg["target_modules"] = ["q_proj", "v_proj", "rotary_emb"]
    d = ad.dir.parent / (ad.dir.name + "_bad_target")
    shutil.copytree(ad.dir, d, dirs_exist_ok=True)
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(lorart.LoraError, match=r"target_modules \['rotary_emb'\]"):
        lorart.lora.from_peft(str(d), model_config)

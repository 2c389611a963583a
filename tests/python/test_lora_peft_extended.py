"""lora.from_peft / save_npy / load_npy / lorart convert for adapters with embedding-side parts
(modules_to_save embed_tokens / lm_head over a resized vocabulary, LoRA on embed_tokens and
lm_head, tied-embedding bases) and DoRA, against the tensors transformers + peft themselves hold,
and end to end through lorart.Executor against PEFT's forward.

The merged-weight checks rebuild every adapted weight from the converted parts alone and compare
it with ``merge_and_unload()``; the forward checks compare with the unmerged PeftModel (which is
what PEFT serves; for LoRA on a tied base's embed_tokens ``merge_and_unload`` also changes
lm_head, see test_tied_lora_on_embed_tokens).
"""

from __future__ import annotations

import copy
import json
import os
import shutil

import numpy as np
import pytest
from executor_helpers import final
from tiny_models import ALL_PROJECTIONS, MODULE_IDS, hf_greedy, hf_logits, run_lorart_cli

import lorart
from lorart import lora

BASE_VOCAB = 128  # build_causal_lm's default (TINY_LLAMA)
EXTENDED = BASE_VOCAB + 1000  # resize_token_embeddings by 1,000 tokens
HF_NAMES = {mid: name for name, mid in MODULE_IDS.items()}
SUBLAYER = {
    n: ("self_attn" if n.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp")
    for n in MODULE_IDS
}

# name -> (base fixture, make_ext_adapter kwargs)
ADAPTERS = {
    # (a) replacement tables over a vocabulary resized by 1,000 tokens, plus LoRA on q and v.
    "extended": (
        "ext_llama_dir",
        dict(
            seed=31,
            resize=EXTENDED,
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj"],
            modules_to_save=["embed_tokens", "lm_head"],
        ),
    ),
    # (b) LoRA on embed_tokens and lm_head (own rank / alpha through the patterns) and o_proj.
    "embed_lora": (
        "ext_llama_dir",
        dict(
            seed=32,
            r=6,
            lora_alpha=12,
            target_modules=["embed_tokens", "lm_head", "o_proj"],
            rank_pattern={"embed_tokens": 4},
            alpha_pattern={"lm_head": 3},
        ),
    ),
    # (c) a tied base: one adapter keeps embed_tokens and lm_head tied, one unties them.
    "tied_kept": (
        "ext_tied_dir",
        dict(
            seed=33,
            r=4,
            lora_alpha=8,
            target_modules=["q_proj"],
            modules_to_save=["embed_tokens"],
            ensure_weight_tying=True,
        ),
    ),
    "tied_untied": (
        "ext_tied_dir",
        dict(
            seed=34, r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["embed_tokens"]
        ),
    ),
    "tied_both": (
        "ext_tied_dir",
        dict(
            seed=35,
            r=4,
            lora_alpha=8,
            target_modules=["k_proj"],
            modules_to_save=["embed_tokens", "lm_head"],
        ),
    ),
    "tied_embed_lora": (
        "ext_tied_dir",
        dict(seed=36, r=4, lora_alpha=8, target_modules=["embed_tokens", "v_proj"]),
    ),
    # A tied base resized by 1,000 tokens: a trained table kept tied, and LoRA only (PEFT then
    # saves the resized base table, which serves as both embed_tokens and lm_head).
    "tied_resized_kept": (
        "ext_tied_dir",
        dict(
            seed=41,
            resize=1160,
            r=4,
            lora_alpha=8,
            target_modules=["q_proj"],
            modules_to_save=["embed_tokens"],
            ensure_weight_tying=True,
        ),
    ),
    "tied_resized_lora": (
        "ext_tied_dir",
        dict(seed=42, resize=1160, r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]),
    ),
    # (d) DoRA on all seven projections with mixed ranks and alphas.
    "dora": (
        "ext_llama_dir",
        dict(
            seed=37,
            r=8,
            lora_alpha=16,
            use_dora=True,
            target_modules=ALL_PROJECTIONS,
            rank_pattern={"q_proj": 2, "layers.1.mlp.down_proj": 12, "k_proj": 5},
            alpha_pattern={"v_proj": 3},
        ),
    ),
}


@pytest.fixture(scope="module")
def adapter(request, make_ext_adapter):
    """adapter(name) -> (Adapter, base model dir, ModelConfig)."""

    def get(name: str):
        fixture, kw = ADAPTERS[name]
        base = request.getfixturevalue(fixture)
        return make_ext_adapter(base, **kw), base, lorart.hf.load_config(str(base))

    return get


def base_state(model_dir) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(model_dir / "model.safetensors"))


def merged_state(peft_model) -> dict[str, np.ndarray]:
    """merge_and_unload() of a copy: {HF name: float64 weight}."""
    merged = copy.deepcopy(peft_model).merge_and_unload()
    return {k: v.detach().double().numpy() for k, v in merged.state_dict().items()}


def rebuild(weights, config, model_config, base: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The adapted weights rebuilt from the converted parts alone (float64): W + B A per row,
    DoRA rows rescaled to magnitude / ||W + B A|| per output row; the tables and their LoRA."""
    out = {}
    for row in lora.unpack(weights, config, model_config):
        name = HF_NAMES[row.module_id]
        key = f"model.layers.{row.layer_idx}.{SUBLAYER[name]}.{name}.weight"
        w = base[key].astype(np.float64) + row.B.astype(np.float64) @ row.A.astype(np.float64)
        if isinstance(row, lora.DoraRow):
            w = w * (row.magnitude.astype(np.float64) / np.linalg.norm(w, axis=1))[:, None]
        out[key] = w
    parts = weights.embeddings
    if parts is not None:
        embed = (
            parts.embed_tokens
            if parts.embed_tokens is not None
            else base["model.embed_tokens.weight"]
        )
        head = parts.lm_head
        if head is None:
            head = base.get("lm_head.weight", base["model.embed_tokens.weight"])
        embed, head = embed.astype(np.float64), head.astype(np.float64)
        if parts.embed_lora_a is not None:
            embed = embed + (parts.embed_lora_b.astype(np.float64) @ parts.embed_lora_a).T
        if parts.lm_head_lora_a is not None:
            head = head + parts.lm_head_lora_b.astype(np.float64) @ parts.lm_head_lora_a
        out["model.embed_tokens.weight"], out["lm_head.weight"] = embed, head
    return out


def assert_rebuilds_merged(name, adapter, tol=1e-5):
    ad, base_dir, mc = adapter(name)
    weights, config = lora.from_peft(ad.dir, mc)
    rebuilt = rebuild(weights, config, mc, base_state(base_dir))
    merged = merged_state(ad.model)
    assert rebuilt, name
    for key, w in rebuilt.items():
        ref = merged[key] if key in merged else merged["model.embed_tokens.weight"]  # tied lm_head
        np.testing.assert_allclose(w, ref, rtol=0, atol=tol, err_msg=f"{name}: {key}")
    return weights, config, merged


def peft_module(peft_model, path: str):
    return peft_model.get_submodule(path)


# ----------------------------------------------------------------------------- (a) extended


def test_modules_to_save_over_resized_vocab(adapter):
    ad, _, mc = adapter("extended")
    saved = json.loads((ad.dir / "adapter_config.json").read_text())
    assert saved["modules_to_save"] == ["embed_tokens", "lm_head"]
    weights, config = lora.from_peft(ad.dir, mc)
    parts = weights.embeddings
    assert parts is not None and parts.vocab_size == EXTENDED
    pm = ad.model.base_model.model
    embed = pm.model.embed_tokens.modules_to_save["default"].weight.detach().numpy()
    head = pm.lm_head.modules_to_save["default"].weight.detach().numpy()
    assert parts.embed_tokens.shape == parts.lm_head.shape == (EXTENDED, 64)
    np.testing.assert_array_equal(parts.embed_tokens, embed)
    np.testing.assert_array_equal(parts.lm_head, head)
    assert not parts.lm_head_is_embed_tokens
    assert parts.embed_lora_a is None and parts.lm_head_lora_a is None
    assert config.num_columns == 3
    assert sorted(config.numpy()[:, :2].tolist()) == sorted(
        [m, layer] for m in (1, 3) for layer in range(3)
    )
    assert_rebuilds_merged("extended", adapter)


def test_modules_to_save_key_spellings(adapter, tmp_path):
    """PEFT writes the trained copy as ``...embed_tokens.modules_to_save.weight`` beside the
    frozen ``original_module`` and a plain ``...embed_tokens.weight``; older files have only the
    plain key, others ``modules_to_save.default.weight``. All give the trained table."""
    from safetensors.numpy import load_file, save_file

    ad, _, mc = adapter("extended")
    tensors = load_file(str(ad.dir / "adapter_model.safetensors"))
    key = "base_model.model.model.embed_tokens.modules_to_save.weight"
    assert (
        key in tensors and "base_model.model.model.embed_tokens.original_module.weight" in tensors
    )
    ref, _ = lora.from_peft(ad.dir, mc)
    for variant in ("plain", "default"):
        d = tmp_path / variant
        shutil.copytree(ad.dir, d)
        edited = {}
        for k, v in tensors.items():
            if ".modules_to_save." in k or ".original_module." in k:
                if variant == "default" and ".modules_to_save." in k:
                    edited[k.replace(".modules_to_save.", ".modules_to_save.default.")] = v
                continue
            if variant == "default" and k.endswith(("embed_tokens.weight", "lm_head.weight")):
                continue
            edited[k] = v
        save_file(edited, str(d / "adapter_model.safetensors"))
        got, _ = lora.from_peft(d, mc)
        np.testing.assert_array_equal(got.embeddings.embed_tokens, ref.embeddings.embed_tokens)
        np.testing.assert_array_equal(got.embeddings.lm_head, ref.embeddings.lm_head)


def test_extended_vocab_needs_both_tables(adapter, tmp_path):
    from safetensors.numpy import load_file, save_file

    ad, _, mc = adapter("extended")
    d = tmp_path / "ad"
    shutil.copytree(ad.dir, d)
    tensors = load_file(str(d / "adapter_model.safetensors"))
    save_file(
        {k: v for k, v in tensors.items() if "lm_head" not in k},
        str(d / "adapter_model.safetensors"),
    )
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["modules_to_save"] = ["embed_tokens"]
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(lorart.LoraError, match=r"embed_tokens has 1128 rows .*needs both tables"):
        lora.from_peft(d, mc)


# ----------------------------------------------------------------------------- (b) LoRA on tables


def test_lora_on_embed_tokens_and_lm_head(adapter):
    ad, _, mc = adapter("embed_lora")
    weights, config = lora.from_peft(ad.dir, mc)
    parts = weights.embeddings
    embed = ad.model.base_model.model.model.embed_tokens
    head = ad.model.base_model.model.lm_head
    assert embed.scaling["default"] == pytest.approx(12 / 4)  # rank_pattern took effect in PEFT
    assert head.scaling["default"] == pytest.approx(3 / 6)  # and alpha_pattern
    np.testing.assert_array_equal(parts.embed_lora_a, embed.lora_embedding_A["default"].detach())
    np.testing.assert_allclose(
        parts.embed_lora_b, embed.lora_embedding_B["default"].detach() * 3.0, rtol=1e-6
    )
    np.testing.assert_array_equal(parts.lm_head_lora_a, head.lora_A["default"].weight.detach())
    np.testing.assert_allclose(
        parts.lm_head_lora_b, head.lora_B["default"].weight.detach() * 0.5, rtol=1e-6
    )
    assert parts.embed_lora_a.shape == (4, BASE_VOCAB) and parts.embed_lora_b.shape == (64, 4)
    assert parts.lm_head_lora_a.shape == (6, 64) and parts.lm_head_lora_b.shape == (BASE_VOCAB, 6)
    # PEFT saved the frozen base tables beside the LoRA; they are the model's, so not kept.
    assert parts.embed_tokens is None and parts.lm_head is None and parts.vocab_size is None
    assert sorted(config.numpy().tolist()) == [[4, layer, 6] for layer in range(3)]
    assert_rebuilds_merged("embed_lora", adapter)


def test_base_tables_kept_without_model_config(adapter):
    """Without the model, the frozen base tables PEFT saved cannot be told from replacements:
    they are kept (the same outputs, more memory)."""
    ad, base_dir, mc = adapter("embed_lora")
    weights, _ = lora.from_peft(ad.dir)
    base = base_state(base_dir)
    np.testing.assert_array_equal(
        weights.embeddings.embed_tokens, base["model.embed_tokens.weight"]
    )
    np.testing.assert_array_equal(weights.embeddings.lm_head, base["lm_head.weight"])
    with_model, _ = lora.from_peft(ad.dir, mc)
    np.testing.assert_array_equal(
        weights.embeddings.embed_lora_b, with_model.embeddings.embed_lora_b
    )


# ----------------------------------------------------------------------------- (c) tied bases


def test_tied_kept_tied(adapter):
    ad, _, mc = adapter("tied_kept")
    assert mc.tie_word_embeddings
    weights, _ = lora.from_peft(ad.dir, mc)
    parts = weights.embeddings
    assert parts.lm_head_is_embed_tokens
    trained = ad.model.base_model.model.model.embed_tokens.modules_to_save["default"].weight
    np.testing.assert_array_equal(parts.embed_tokens, trained.detach())
    assert parts.vocab_size == 160
    _, _, merged = assert_rebuilds_merged("tied_kept", adapter)
    np.testing.assert_array_equal(merged["lm_head.weight"], merged["model.embed_tokens.weight"])


def test_tied_untied(adapter):
    ad, base_dir, mc = adapter("tied_untied")
    weights, _ = lora.from_peft(ad.dir, mc)
    parts = weights.embeddings
    # PEFT copies embed_tokens; the output stays the base's (tied) table.
    head = ad.model.get_output_embeddings().weight.detach().numpy()
    np.testing.assert_array_equal(head, base_state(base_dir)["model.embed_tokens.weight"])
    assert parts.lm_head is None and not parts.lm_head_is_embed_tokens
    trained = ad.model.base_model.model.model.embed_tokens.modules_to_save["default"].weight
    np.testing.assert_array_equal(parts.embed_tokens, trained.detach())
    assert_rebuilds_merged("tied_untied", adapter)


def test_tied_both_replaced_separately(adapter):
    ad, _, mc = adapter("tied_both")
    weights, _ = lora.from_peft(ad.dir, mc)
    parts = weights.embeddings
    assert parts.embed_tokens is not None and parts.lm_head is not None
    assert not parts.lm_head_is_embed_tokens
    assert not np.array_equal(parts.embed_tokens, parts.lm_head)
    assert_rebuilds_merged("tied_both", adapter)


def test_tied_ensure_weight_tying_without_lm_head_key(adapter, tmp_path):
    """A tied base whose adapter ties with ensure_weight_tying but whose file holds only
    embed_tokens (the tie flag supplies lm_head); the same file on an untied base stays untied."""
    from safetensors.numpy import load_file, save_file

    ad, _, mc = adapter("tied_kept")
    d = tmp_path / "ad"
    shutil.copytree(ad.dir, d)
    tensors = load_file(str(d / "adapter_model.safetensors"))
    assert "base_model.model.lm_head.weight" in tensors
    del tensors["base_model.model.lm_head.weight"]
    save_file(tensors, str(d / "adapter_model.safetensors"))
    weights, _ = lora.from_peft(d, mc)
    assert weights.embeddings.lm_head_is_embed_tokens
    untied = mc.copy()
    untied.tie_word_embeddings = False
    weights, _ = lora.from_peft(d, untied)
    assert weights.embeddings.lm_head is None


def test_tied_lora_on_embed_tokens(adapter):
    """PEFT's forward adds the LoRA to the looked-up embeddings only: the tied lm_head keeps the
    base table (merge_and_unload would fold it into the shared table and change lm_head too)."""
    ad, base_dir, mc = adapter("tied_embed_lora")
    weights, _ = lora.from_peft(ad.dir, mc)
    parts = weights.embeddings
    assert parts.embed_lora_a.shape == (4, 160)
    assert parts.lm_head_lora_a is None and parts.lm_head is None and parts.embed_tokens is None
    base = base_state(base_dir)["model.embed_tokens.weight"]
    np.testing.assert_array_equal(ad.model.get_output_embeddings().weight.detach(), base)
    merged = merged_state(ad.model)  # PEFT's merge folds the LoRA into the shared table
    assert not np.allclose(merged["lm_head.weight"], base)


@pytest.mark.parametrize("name", ["tied_resized_kept", "tied_resized_lora"])
def test_tied_resized(adapter, name):
    """A resized tied base: the trained copy (ensure_weight_tying, saved for both modules) or the
    resized base table PEFT saves (LoRA only) is both embed_tokens and lm_head, one array."""
    ad, _, mc = adapter(name)
    weights, _ = lora.from_peft(ad.dir, mc)
    parts = weights.embeddings
    assert parts.vocab_size == 1160 and parts.lm_head_is_embed_tokens
    np.testing.assert_array_equal(
        parts.embed_tokens, ad.model.get_input_embeddings().weight.detach()
    )
    assert_rebuilds_merged(name, adapter)


# ----------------------------------------------------------------------------- (d) DoRA


def test_dora_all_projections_mixed_ranks(adapter):
    ad, _, mc = adapter("dora")
    weights, config = lora.from_peft(ad.dir, mc)
    c = config.numpy()
    assert config.num_columns == 4 and c.shape == (21, 4)
    assert (c[:, 3] == 1).all()
    ranks = {(int(m), int(layer)): int(r) for m, layer, r, _ in c}
    assert ranks[(1, 0)] == 2 and ranks[(2, 1)] == 5 and ranks[(6, 1)] == 12 and ranks[(5, 0)] == 8
    rows = lora.unpack(weights, config, mc)
    by_key = {(row.module_id, row.layer_idx): row for row in rows}
    for layer in range(3):
        for name, mid in MODULE_IDS.items():
            mod = ad.model.base_model.model.model.layers[layer].get_submodule(
                f"{SUBLAYER[name]}.{name}"
            )
            row = by_key[(mid, layer)]
            assert isinstance(row, lora.DoraRow)
            m = mod.lora_magnitude_vector["default"].weight.detach().numpy()
            np.testing.assert_array_equal(row.magnitude, m, err_msg=f"{name} {layer}")
            scaling = mod.scaling["default"]
            np.testing.assert_allclose(
                row.B, mod.lora_B["default"].weight.detach() * scaling, rtol=1e-6
            )
    # The magnitude sits right after B in the packed row, then zero padding.
    w = weights.numpy()
    for i, (mid, layer, r, _) in enumerate(c.tolist()):
        hi, ho = mc.lora_module_dims(mid)
        n = r * (hi + ho)
        np.testing.assert_array_equal(w[i, n : n + ho], by_key[(mid, layer)].magnitude)
        assert not w[i, n + ho :].any()
    assert_rebuilds_merged("dora", adapter)


def test_dora_fused_gate_up_proj_splits_magnitude(adapter, tmp_path):
    """A fused gate_up_proj (shared A, B and magnitude stacked gate then up) becomes rows 5 and 7
    with B and the magnitude split the same way."""
    from safetensors.numpy import load_file, save_file

    ad, _, mc = adapter("dora")
    tensors = load_file(str(ad.dir / "adapter_model.safetensors"))
    d = tmp_path / "fused"
    shutil.copytree(ad.dir, d)
    p = "base_model.model.model.layers.0.mlp."
    a = tensors[p + "gate_proj.lora_A.weight"]
    rng = np.random.default_rng(0)
    b = rng.normal(0, 0.1, (2 * 96, a.shape[0])).astype(np.float32)
    m = (1 + rng.random(2 * 96)).astype(np.float32)
    fused = {k: v for k, v in tensors.items() if not k.startswith((p + "gate_proj", p + "up_proj"))}
    fused |= {
        p + "gate_up_proj.lora_A.weight": a,
        p + "gate_up_proj.lora_B.weight": b,
        p + "gate_up_proj.lora_magnitude_vector": m,
    }
    save_file(fused, str(d / "adapter_model.safetensors"))
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["target_modules"] = [*cfg["target_modules"], "gate_up_proj"]
    cfg["rank_pattern"]["layers.0.mlp.gate_up_proj"] = a.shape[0]
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    weights, config = lora.from_peft(d, mc)
    rows = {(r.module_id, r.layer_idx): r for r in lora.unpack(weights, config, mc)}
    scaling = 16 / 8
    for mid, half in ((5, slice(0, 96)), (7, slice(96, 192))):
        row = rows[(mid, 0)]
        np.testing.assert_array_equal(row.A, a)
        np.testing.assert_allclose(row.B, b[half] * scaling, rtol=1e-6)
        np.testing.assert_array_equal(row.magnitude, m[half])


def test_pack_mixes_dora_and_plain_rows(adapter):
    _, _, mc = adapter("dora")
    rng = np.random.default_rng(1)
    plain = lora.LoraRow(1, 0, rng.normal(size=(2, 64)), rng.normal(size=(64, 2)))
    dora = lora.DoraRow(6, 2, rng.normal(size=(3, 96)), rng.normal(size=(64, 3)), rng.random(64))
    weights, config = lora.pack([plain, dora])
    assert config.numpy().tolist() == [[1, 0, 2, 0], [6, 2, 3, 1]]
    back = lora.unpack(weights, config, mc)
    assert type(back[0]) is lora.LoraRow and type(back[1]) is lora.DoraRow
    mid, layer, a, _ = back[0]  # a plain row still unpacks into four names
    assert (mid, layer) == (1, 0)
    np.testing.assert_allclose(a, plain.A, rtol=1e-6)
    np.testing.assert_allclose(back[1].magnitude, dora.magnitude, rtol=1e-6)
    with pytest.raises(lorart.LoraError, match=r"row 0: magnitude is \[3\]; expected \[64\]"):
        lora.pack([dora._replace(magnitude=np.ones(3))])


# ----------------------------------------------------------------------------- storage


@pytest.mark.parametrize("name", ["extended", "embed_lora", "tied_kept", "dora"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_npy_round_trip(adapter, tmp_path, name, dtype):
    ad, _, mc = adapter(name)
    weights, config = lora.from_peft(ad.dir, mc, dtype=dtype)
    lora.save_npy(tmp_path, weights, config)
    written = {p.name for p in tmp_path.iterdir()}
    parts = weights.embeddings
    present = {
        p for p in lora.EMBEDDING_PARTS if parts is not None and getattr(parts, p) is not None
    }
    assert written == {lora.WEIGHTS_FILE, lora.CONFIG_FILE} | {f"{p}.npy" for p in present}
    if dtype == "bfloat16":
        for p in present:
            assert np.load(tmp_path / f"{p}.npy").dtype == np.dtype("V2")
    assert lora.is_npy_dir(tmp_path)
    got_w, got_c = lora.load_npy(tmp_path)
    np.testing.assert_array_equal(got_c.numpy(), config.numpy())
    assert got_w.dtype == dtype
    np.testing.assert_array_equal(got_w.numpy().view(np.uint8), weights.numpy().view(np.uint8))
    if parts is None:
        assert got_w.embeddings is None
        return
    for p in lora.EMBEDDING_PARTS:
        a, b = getattr(parts, p), getattr(got_w.embeddings, p)
        assert (a is None) == (b is None), p
        if a is not None:
            assert b.dtype == a.dtype
            np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8), err_msg=p)
    assert got_w.embeddings.lm_head_is_embed_tokens == parts.lm_head_is_embed_tokens
    got_w2, got_c2 = lora.load_dir(tmp_path, mc)
    lora.validate(got_w2, got_c2, mc, max_lora_rank=16, dtype=dtype)


def test_npy_tables_only_adapter(tmp_path, adapter):
    """An adapter that only replaces tables: zero rows in the pair."""
    ad, _, mc = adapter("tied_kept")
    table = np.asarray(lora.from_peft(ad.dir, mc)[0].embeddings.embed_tokens)
    weights, config = lora.pack([], embeddings=lorart.LoraEmbeddings(embed_tokens=table))
    assert weights.num_rows == 0 and config.numpy().shape == (0, 3)
    lora.save_npy(tmp_path, weights, config)
    got_w, got_c = lora.load_npy(tmp_path)
    assert got_w.num_rows == 0 and got_c.num_rows == 0
    np.testing.assert_array_equal(got_w.embeddings.embed_tokens, table)
    lora.validate(got_w, got_c, mc)
    with pytest.raises(lorart.LoraError, match="at least one adapted module"):
        lora.pack([])


@pytest.mark.parametrize(
    ("array", "match"),
    [
        (
            np.zeros((2, 3, 4), np.float32),
            r"embed_tokens.npy: expected a 2-D array, got shape \[2, 3, 4\]",
        ),
        (np.zeros((4, 64), np.int32), r"embed_tokens.npy: dtype <i4 is not supported"),
        (np.zeros((4, 64), np.float64), r"embed_tokens.npy: dtype <f8 is not supported"),
    ],
)
def test_npy_part_files_hostile(adapter, tmp_path, array, match):
    ad, _, mc = adapter("extended")
    lora.save_npy(tmp_path, *lora.from_peft(ad.dir, mc))
    np.save(tmp_path / "embed_tokens.npy", array)
    with pytest.raises(lorart.LoraError, match=match):
        lora.load_npy(tmp_path)


def test_npy_part_file_truncated(adapter, tmp_path):
    ad, _, mc = adapter("extended")
    lora.save_npy(tmp_path, *lora.from_peft(ad.dir, mc))
    path = tmp_path / "lm_head.npy"
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(lorart.LoraError, match=r"lm_head.npy: holds .* data bytes but its header"):
        lora.load_npy(tmp_path)


def test_npy_big_endian_part_and_config_is_dora_range(adapter, tmp_path):
    ad, _, mc = adapter("dora")
    lora.save_npy(tmp_path, *lora.from_peft(ad.dir, mc))
    table = np.load(tmp_path / lora.CONFIG_FILE).astype(np.int64)
    table[0, 3, 3] = 2**40
    np.save(tmp_path / lora.CONFIG_FILE, table)
    with pytest.raises(lorart.LoraError, match=r"is_dora 1099511627776 at index \[0, 3, 3\]"):
        lora.load_npy(tmp_path)
    ad, _, mc = adapter("embed_lora")
    d = tmp_path / "be"
    lora.save_npy(d, *lora.from_peft(ad.dir, mc))
    a = np.load(d / "embed_lora_a.npy")
    np.save(d / "embed_lora_a.npy", a.astype(">f4"))
    got, _ = lora.load_npy(d)
    np.testing.assert_array_equal(got.embeddings.embed_lora_a, a)


def test_convert_cli_writes_parts_and_tokenizer(adapter, tmp_path):
    ad, base_dir, mc = adapter("extended")
    src = tmp_path / "src"
    shutil.copytree(ad.dir, src)
    tokenizer = {"tokenizer.json": '{"model": "x"}', "tokenizer_config.json": "{}"}
    for name, text in tokenizer.items():
        (src / name).write_text(text)
    out = tmp_path / "out"
    res = run_lorart_cli(
        "convert",
        "-i",
        str(src),
        "-o",
        str(out),
        "--storage-type",
        "float32",
        "--model_dir",
        str(base_dir),
    )
    assert res.returncode == 0, res.stderr
    assert f"wrote {out / 'embed_tokens.npy'} [{EXTENDED}, 64]" in res.stdout
    assert f"wrote {out / 'lm_head.npy'} [{EXTENDED}, 64]" in res.stdout
    assert f"copied {out / 'tokenizer.json'}" in res.stdout
    for name, text in tokenizer.items():
        assert (out / name).read_text() == text
    assert not (out / "special_tokens_map.json").exists()
    # Another adapter converted into the same directory leaves none of these tokenizer files.
    plain = tmp_path / "plain"
    shutil.copytree(adapter("dora")[0].dir, plain)
    for name in tokenizer:
        (plain / name).unlink(missing_ok=True)
    res2 = run_lorart_cli("convert", "-i", str(plain), "-o", str(out), "--model_dir", str(base_dir))
    assert res2.returncode == 0, res2.stderr
    assert not any((out / name).exists() for name in tokenizer), sorted(os.listdir(out))
    assert not (out / "embed_tokens.npy").exists()
    res = run_lorart_cli(
        "convert",
        "-i",
        str(src),
        "-o",
        str(out),
        "--storage-type",
        "float32",
        "--model_dir",
        str(base_dir),
    )
    assert res.returncode == 0, res.stderr
    ref_w, ref_c = lora.from_peft(src, mc)
    got_w, got_c = lora.load_npy(out)
    np.testing.assert_array_equal(got_c.numpy(), ref_c.numpy())
    np.testing.assert_array_equal(got_w.embeddings.embed_tokens, ref_w.embeddings.embed_tokens)
    np.testing.assert_array_equal(got_w.embeddings.lm_head, ref_w.embeddings.lm_head)


def test_tp_split_refuses_embeddings_and_dora(adapter):
    for name, match in (("extended", "embed_tokens / lm_head"), ("dora", "DoRA")):
        ad, _, mc = adapter(name)
        weights, config = lora.from_peft(ad.dir, mc)
        with pytest.raises(lorart.LoraError, match=f"{match}.*tensor parallelism"):
            lora.tp_split(weights, config, mc, 2, 0)


# ----------------------------------------------------------------------------- refusals


def edited_copy(ad, tmp_path, config_changes=None, drop=(), add=None):
    from safetensors.numpy import load_file, save_file

    d = tmp_path / "edited"
    shutil.copytree(ad.dir, d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg.update(config_changes or {})
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    tensors = load_file(str(d / "adapter_model.safetensors"))
    tensors = {k: v for k, v in tensors.items() if not any(s in k for s in drop)}
    tensors.update(add or {})
    save_file(tensors, str(d / "adapter_model.safetensors"))
    return d


def test_other_modules_to_save_refused(adapter, tmp_path):
    ad, _, mc = adapter("extended")
    d = edited_copy(ad, tmp_path, {"modules_to_save": ["embed_tokens", "lm_head", "norm"]})
    with pytest.raises(
        lorart.LoraError, match=r"adapter_config.json: modules_to_save entries \['norm'\]"
    ):
        lora.from_peft(d, mc)


def test_modules_to_save_without_table_refused(adapter, tmp_path):
    ad, _, mc = adapter("extended")
    d = edited_copy(ad, tmp_path, drop=("lm_head",))
    with pytest.raises(
        lorart.LoraError,
        match="modules_to_save lists lm_head but the adapter holds no lm_head table",
    ):
        lora.from_peft(d, mc)


@pytest.mark.parametrize("with_model", [True, False])
def test_a_frozen_table_of_the_wrong_rank_is_refused(adapter, tmp_path, with_model):
    """A saved base table that is not 2-D (found by the fuzzer: it raised IndexError)."""
    ad, _, mc = adapter("embed_lora")
    d = edited_copy(
        ad,
        tmp_path,
        drop=("lm_head.weight",),
        add={"base_model.model.lm_head.weight": np.zeros((), np.float32)},
    )
    with pytest.raises(lorart.LoraError, match=r"the lm_head table is \[\]; expected \[V, hidden"):
        lora.from_peft(d, mc if with_model else None)


def test_dora_tensors_and_config_must_agree(adapter, tmp_path):
    ad, _, mc = adapter("dora")
    d = edited_copy(ad, tmp_path, {"use_dora": False})
    with pytest.raises(lorart.LoraError, match="lora_magnitude_vector .*use_dora false"):
        lora.from_peft(d, mc)
    shutil.rmtree(d)
    d = edited_copy(ad, tmp_path, drop=("layers.2.mlp.down_proj.lora_magnitude_vector",))
    with pytest.raises(
        lorart.LoraError,
        match=r"use_dora is true but .*layers.2.mlp.down_proj has no lora_magnitude_vector",
    ):
        lora.from_peft(d, mc)
    shutil.rmtree(d)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
    d = edited_copy(ad, tmp_path, add={key: np.ones(5, np.float32)})
    with pytest.raises(
        lorart.LoraError, match=r"q_proj.lora_magnitude_vector is \[5\]; expected \[64\]"
    ):
        lora.from_peft(d, mc)


def test_dora_on_embed_tokens_refused(make_ext_adapter, ext_llama_dir):
    ad = make_ext_adapter(
        ext_llama_dir, seed=40, r=4, lora_alpha=8, use_dora=True, target_modules=["embed_tokens"]
    )
    with pytest.raises(lorart.LoraError, match="DoRA on embed_tokens"):
        lora.from_peft(ad.dir, lorart.hf.load_config(str(ext_llama_dir)))


def test_trainable_token_indices_refused(adapter, tmp_path):
    ad, _, mc = adapter("embed_lora")
    d = edited_copy(ad, tmp_path, {"trainable_token_indices": [1, 2]})
    with pytest.raises(lorart.LoraError, match="trainable_token_indices"):
        lora.from_peft(d, mc)


def test_embed_lora_rank_checked(adapter, tmp_path):
    ad, _, mc = adapter("embed_lora")
    d = edited_copy(ad, tmp_path, {"rank_pattern": {}})
    with pytest.raises(
        lorart.LoraError, match=r"rank 6 for model.embed_tokens .* lora_A has 4 rows"
    ):
        lora.from_peft(d, mc)


# ----------------------------------------------------------------------------- end to end

NEW_TOKENS = 8
PLAIN = dict(seed=38, r=8, lora_alpha=16, target_modules=ALL_PROJECTIONS)  # task 1 of each base
BASES = {"ext_llama_dir": BASE_VOCAB, "ext_tied_dir": 160}
E2E = [
    "extended",
    "embed_lora",
    "dora",
    "tied_kept",
    "tied_untied",
    "tied_both",
    "tied_embed_lora",
    "tied_resized_kept",
    "tied_resized_lora",
]


class Served:
    """One executor over a base, its PEFT references and the adapters it has been sent."""

    def __init__(self, exe, base_dir, vocab: int, plain) -> None:
        self.exe, self.base_dir, self.vocab = exe, base_dir, vocab
        self.models = {None: load_hf_eval(base_dir), 1: plain.model}
        self.tensors = {1: lora.from_peft(plain.dir, lorart.hf.load_config(str(base_dir)))}
        self.sent: set[int] = set()
        self._f64: dict = {}

    def request(self, ids, task=None, **kw) -> lorart.InferenceRequest:
        if task is not None:
            kw["lora_task_id"] = task
            if task not in self.sent:
                kw["lora_weights"], kw["lora_config"] = self.tensors[task]
                self.sent.add(task)
        return lorart.InferenceRequest(
            list(ids),
            max_new_tokens=NEW_TOKENS,
            sampling_config=lorart.SamplingConfig(top_k=1),
            return_context_logits=True,
            **kw,
        )

    def run_all(self, jobs) -> list:
        """Enqueue every (ids, task) at once (one in-flight batch), then collect them."""
        rids = [self.exe.enqueue_request(self.request(ids, task)) for ids, task in jobs]
        return [final(self.exe, rid) for rid in rids]

    def f64(self, task):
        if task not in self._f64:
            self._f64[task] = copy.deepcopy(self.models[task]).double()
        return self._f64[task]

    def check(self, response, ids, task, what: str) -> None:
        """Context logits within the suite's fp32 tolerance of PEFT, greedy tokens identical."""
        assert response.finish_reason == "length", (what, response.finish_reason, response.error)
        ref = self.models[task]
        hf32, hf64 = hf_logits(ref, ids), hf_logits(self.f64(task), ids)
        got = np.asarray(response.context_logits)
        assert got.shape == hf32.shape, f"{what}: logits {got.shape} != PEFT {hf32.shape}"
        assert response.vocab_size == hf32.shape[1], what
        tol = max(1e-4, 3 * float(np.max(np.abs(hf32 - hf64))))
        err = float(np.max(np.abs(got - hf32)))
        assert err <= tol, f"{what}: max |lorart - PEFT fp32| = {err:.3g} > {tol:.3g}"
        tokens, _ = hf_greedy(ref, ids, NEW_TOKENS)
        assert list(response.output_token_ids) == tokens, what


def load_hf_eval(model_dir):
    from tiny_models import load_hf

    return load_hf(model_dir)


@pytest.fixture(scope="module")
def served(request, make_ext_adapter):
    """served(base fixture name) -> Served, one executor per base for the module."""
    made: dict[str, Served] = {}

    def get(fixture: str) -> Served:
        if fixture not in made:
            base = request.getfixturevalue(fixture)
            cfg = lorart.ExecutorConfig(
                max_batch_size=8,
                max_num_tokens=256,
                max_seq_len=128,
                max_lora_rank=16,
                kv_cache=lorart.KvCacheConfig(block_size=16, max_tokens=4096),
            )
            exe = lorart.Executor(str(base), cfg)
            made[fixture] = Served(exe, base, BASES[fixture], make_ext_adapter(base, **PLAIN))
        return made[fixture]

    yield get
    for s in made.values():
        s.exe.shutdown()


def e2e_task(name: str) -> int:
    return 10 + E2E.index(name)


def setup_adapter(served, adapter, name: str) -> tuple[Served, int, int]:
    """(Served, task id, the adapter's vocabulary) with the adapter registered."""
    ad, _, mc = adapter(name)
    s = served(ADAPTERS[name][0])
    task = e2e_task(name)
    if task not in s.tensors:
        s.tensors[task] = lora.from_peft(ad.dir, mc)
        s.models[task] = ad.model
    parts = s.tensors[task][0].embeddings
    vocab = parts.vocab_size if parts is not None and parts.vocab_size else s.vocab
    return s, task, vocab


def prompt(vocab: int, length: int, seed: int) -> list[int]:
    ids = [int(t) for t in np.random.default_rng(seed).integers(0, vocab, length)]
    return ids


@pytest.mark.parametrize("name", E2E)
def test_executor_alone_matches_peft(served, adapter, name):
    s, task, vocab = setup_adapter(served, adapter, name)
    ids = prompt(vocab, 21, seed=e2e_task(name))
    if name == "extended":
        assert max(ids) >= BASE_VOCAB  # ids only the extended vocabulary has
    [response] = s.run_all([(ids, task)])
    s.check(response, ids, task, f"{name} alone")


@pytest.mark.parametrize("name", E2E)
def test_executor_mixed_batch_matches_peft(served, adapter, name):
    """Tasks -1 0 1 -1 0 1 (base, this adapter, a plain LoRA) in one in-flight batch."""
    s, task, vocab = setup_adapter(served, adapter, name)
    order = [None, task, 1, None, task, 1]
    jobs = [
        (prompt(vocab if t == task else s.vocab, 11 + 3 * i, seed=100 + i), t)
        for i, t in enumerate(order)
    ]
    mixed = s.run_all(jobs)
    for i, ((ids, t), response) in enumerate(zip(jobs, mixed, strict=True)):
        s.check(response, ids, t, f"{name} mixed #{i} (task {t})")
    for i, ((ids, t), response) in enumerate(zip(jobs, mixed, strict=True)):
        if t is None:
            [solo] = s.run_all([(ids, None)])
            assert list(solo.output_token_ids) == list(response.output_token_ids)
            np.testing.assert_array_equal(
                np.asarray(solo.context_logits).view(np.uint32),
                np.asarray(response.context_logits).view(np.uint32),
                err_msg=f"{name}: base row #{i} differs from its solo run",
            )


def test_token_ids_past_base_vocab(served, adapter):
    s, task, vocab = setup_adapter(served, adapter, "extended")
    assert vocab == EXTENDED
    ids = [3, BASE_VOCAB + 500, 7, EXTENDED - 1]
    base, plain, ext = s.run_all([(ids, None), (ids, 1), (ids, task)])
    for response in (base, plain):
        assert response.finish_reason == "error"
        assert "input_token_ids[1] = 628 is out of the vocabulary [0, 128)" in response.error
    s.check(ext, ids, task, "extended ids")
    assert np.asarray(ext.context_logits).shape == (len(ids), EXTENDED)


@pytest.mark.parametrize("name", ["extended", "dora", "tied_kept", "embed_lora"])
def test_convert_npy_executor_same_tokens(served, adapter, tmp_path, name):
    """PEFT -> lorart convert -> .npy -> executor gives from_peft's tokens (and logits)."""
    s, task, vocab = setup_adapter(served, adapter, name)
    ad, base_dir, _ = adapter(name)
    out = tmp_path / "npy"
    res = run_lorart_cli(
        "convert",
        "-i",
        str(ad.dir),
        "-o",
        str(out),
        "--storage-type",
        "float32",
        "--model_dir",
        str(base_dir),
    )
    assert res.returncode == 0, res.stderr
    npy_task = 100 + e2e_task(name)
    s.tensors[npy_task] = lora.load_npy(out)
    ids = prompt(vocab, 17, seed=7)
    direct, converted = s.run_all([(ids, task), (ids, npy_task)])
    assert converted.finish_reason == "length", converted.error
    assert list(converted.output_token_ids) == list(direct.output_token_ids)
    np.testing.assert_array_equal(converted.context_logits, direct.context_logits)

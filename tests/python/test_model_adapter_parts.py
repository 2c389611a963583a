"""The Model layer with adapters that bring their own embedding-side parts (replacement
embed_tokens / lm_head with a larger vocabulary, LoRA on embed_tokens and lm_head) and DoRA,
against transformers + peft, in one mixed batch with base rows.

The adapters are built here from PEFT's own modules (not through lora.from_peft), so these tests
check the core's math alone; test_lora_peft_extended.py covers the converter end to end.
"""

from __future__ import annotations

import numpy as np
import pytest
from tiny_models import _LAYER_RE, MODULE_IDS, bits, build_llama, load_hf

import lorart
from lorart import _core
from lorart.model import Model, SequenceChunk

BASE_VOCAB = 128  # TINY_LLAMA
EXTRA = 1000


def randomize(peft_model, seed: int):
    """Re-draw every adapter parameter (PEFT starts B, and the magnitude's deviation, at 0)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(peft_model.named_parameters()):
            if "magnitude" in name:
                p.mul_(1 + 0.3 * torch.rand(p.shape, generator=gen))
            elif "lora_" in name or "modules_to_save" in name:
                torch.nn.init.normal_(p, 0.0, 0.3, generator=gen)
    return peft_model.eval()


def rows_of(peft_model) -> tuple[lorart.LoraWeights, lorart.LoraConfig]:
    """The per-layer rows (A, B * scaling, DoRA magnitude) read from PEFT's modules."""
    rows = []
    for name, mod in peft_model.named_modules():
        lora_a = getattr(mod, "lora_A", None)
        match = _LAYER_RE.search(name)
        if lora_a is None or "default" not in lora_a or match is None:
            continue
        a = mod.lora_A["default"].weight.detach().float().numpy()
        b = mod.lora_B["default"].weight.detach().float().numpy() * float(mod.scaling["default"])
        magnitudes = getattr(mod, "lora_magnitude_vector", None)
        m = None
        if magnitudes is not None and "default" in magnitudes:
            m = magnitudes["default"].weight.detach().float().numpy()
        rows.append((int(match.group(1)), MODULE_IDS[match.group(2)], a, b, m))
    rows.sort(key=lambda r: r[:2])
    dora = any(r[4] is not None for r in rows)
    values = [
        np.concatenate([a.ravel(), b.ravel()] + ([m] if m is not None else []))
        for *_, a, b, m in rows
    ]
    weights = np.zeros((len(rows), max((v.size for v in values), default=0)), np.float32)
    config = np.zeros((len(rows), 4 if dora else 3), np.int32)
    for i, ((layer, module, a, _, m), v) in enumerate(zip(rows, values, strict=True)):
        weights[i, : v.size] = v
        config[i, :3] = (module, layer, a.shape[0])
        if dora:
            config[i, 3] = m is not None
    return weights, config


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return build_llama(tmp_path_factory.mktemp("parts_base"), seed=3)


@pytest.fixture(scope="module")
def adapters(base_dir):
    """{name: (peft model, LoraWeights, LoraConfig)}."""
    from peft import LoraConfig, get_peft_model

    out = {}
    # modules_to_save tables over a vocabulary resized by EXTRA tokens, plus LoRA on q and v.
    hf = load_hf(base_dir)
    hf.resize_token_embeddings(BASE_VOCAB + EXTRA)
    pm = randomize(
        get_peft_model(
            hf,
            LoraConfig(
                r=4,
                lora_alpha=8,
                target_modules=["q_proj", "v_proj"],
                modules_to_save=["embed_tokens", "lm_head"],
            ),
        ),
        1,
    )
    w, c = rows_of(pm)
    tables = lorart.LoraEmbeddings(
        embed_tokens=pm.base_model.model.model.embed_tokens.modules_to_save["default"]
        .weight.detach()
        .numpy()
        .copy(),
        lm_head=pm.base_model.model.lm_head.modules_to_save["default"]
        .weight.detach()
        .numpy()
        .copy(),
    )
    out["extended"] = (pm, lorart.LoraWeights(w, embeddings=tables), lorart.LoraConfig(c))
    # LoRA on embed_tokens and lm_head (and o_proj).
    pm = randomize(
        get_peft_model(
            load_hf(base_dir),
            LoraConfig(r=6, lora_alpha=12, target_modules=["embed_tokens", "lm_head", "o_proj"]),
        ),
        2,
    )
    w, c = rows_of(pm)
    embed, head = pm.base_model.model.model.embed_tokens, pm.base_model.model.lm_head
    parts = lorart.LoraEmbeddings(
        embed_lora_a=embed.lora_embedding_A["default"].detach().numpy().copy(),
        embed_lora_b=(embed.lora_embedding_B["default"].detach() * embed.scaling["default"])
        .numpy()
        .copy(),
        lm_head_lora_a=head.lora_A["default"].weight.detach().numpy().copy(),
        lm_head_lora_b=(head.lora_B["default"].weight.detach() * head.scaling["default"])
        .numpy()
        .copy(),
    )
    out["embed_lora"] = (pm, lorart.LoraWeights(w, embeddings=parts), lorart.LoraConfig(c))
    # DoRA on all 7 projections with mixed ranks.
    pm = randomize(
        get_peft_model(
            load_hf(base_dir),
            LoraConfig(
                r=4,
                lora_alpha=8,
                use_dora=True,
                target_modules=list(MODULE_IDS),
                rank_pattern={"q_proj": 8, "down_proj": 2},
            ),
        ),
        3,
    )
    w, c = rows_of(pm)
    out["dora"] = (pm, lorart.LoraWeights(w), lorart.LoraConfig(c))
    return out


def peft_logits(model, ids) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()


@pytest.fixture(scope="module")
def model(base_dir, adapters):
    m = Model.from_pretrained(base_dir, max_num_tokens=256, num_kv_blocks=64, max_lora_rank=16)
    slots = {name: m.add_adapter(w, c) for name, (_, w, c) in adapters.items()}
    return m, slots


def prompts() -> dict:
    rng = np.random.default_rng(0)
    out = {
        None: rng.integers(0, BASE_VOCAB, 9).tolist(),
        "extended": rng.integers(0, BASE_VOCAB + EXTRA, 11).tolist(),
        "embed_lora": rng.integers(0, BASE_VOCAB, 7).tolist(),
        "dora": rng.integers(0, BASE_VOCAB, 8).tolist(),
    }
    out["extended"][3] = BASE_VOCAB + 500  # an id only the extended vocabulary has
    return out


def run(m: Model, chunks: list[tuple[list[int], int]]) -> list[np.ndarray]:
    """Each (ids, slot) as a fresh sequence with its own KV blocks; all logits."""
    per = -(-max(len(ids) for ids, _ in chunks) // m.block_size)
    return m.forward(
        [
            SequenceChunk(ids, 0, list(range(i * per, (i + 1) * per)), slot, all_logits=True)
            for i, (ids, slot) in enumerate(chunks)
        ]
    )


def test_mixed_batch_matches_peft_and_base_rows_are_bitwise_solo(model, adapters, base_dir):
    m, slots = model
    p = prompts()
    names = [None, "extended", "embed_lora", "dora"] * 2  # every kind twice, interleaved
    got = run(m, [(p[n], slots.get(n, -1)) for n in names])
    base_hf = load_hf(base_dir)
    for name, logits in zip(names, got, strict=True):
        ref = peft_logits(base_hf if name is None else adapters[name][0], p[name])
        assert logits.shape == ref.shape, name  # each row over its own vocabulary
        np.testing.assert_allclose(logits, ref, atol=1e-4, rtol=0, err_msg=str(name))
    solo = run(m, [(p[None], -1)])[0]
    assert np.array_equal(bits(got[0]), bits(solo)) and np.array_equal(bits(got[4]), bits(solo))
    assert m.vocab_size(slots["extended"]) == BASE_VOCAB + EXTRA
    assert m.vocab_size(slots["dora"]) == m.vocab_size() == BASE_VOCAB


def test_ids_are_checked_against_each_slots_vocabulary(model):
    m, slots = model
    with pytest.raises(ValueError, match=r"chunk 0: token_ids.*128"):
        run(m, [([1, BASE_VOCAB + 5], -1)])
    with pytest.raises(ValueError, match=r"chunk 1: token_ids"):
        run(m, [([1], slots["extended"]), ([BASE_VOCAB + EXTRA], slots["extended"])])
    assert run(m, [([BASE_VOCAB + EXTRA - 1], slots["extended"])])[0].shape == (
        1,
        BASE_VOCAB + EXTRA,
    )


def test_the_core_pads_narrower_rows_with_minus_inf(model):
    """The raw forward is as wide as the widest vocabulary in the table; base rows end in -inf."""
    m, slots = model
    got = m._core.forward(
        np.array([1, 2], np.int32),
        np.array([0, 0], np.int32),
        np.array([0, 1, 2], np.int32),
        np.array([0, 0], np.int32),
        np.array([[0], [1]], np.int32),
        np.array([-1, slots["extended"]], np.int32),
        np.array([0, 1], np.int32),
        m.kv_cache,
        m._adapters,
        "float32",
    )
    assert got.shape == (2, BASE_VOCAB + EXTRA)
    assert np.all(got[0, BASE_VOCAB:] == -np.inf) and np.isfinite(got[0, :BASE_VOCAB]).all()
    assert np.isfinite(got[1]).all()


def test_dora_rows_need_the_model(adapters, model):
    m, _ = model
    _, w, c = adapters["dora"]
    with pytest.raises(lorart.LoraError, match="DoRA rows: it needs their"):
        _core.LoraAdapter(w, c, m.config, 16)
    adapter = _core.LoraAdapter(w, c, m.config, 16, model=m._core)
    assert adapter.nbytes > 0


def test_parts_count_in_the_adapters_bytes(adapters, model):
    m, _ = model
    _, w, c = adapters["extended"]
    tables = w.embeddings
    assert tables.vocab_size == BASE_VOCAB + EXTRA
    assert tables.nbytes == 2 * (BASE_VOCAB + EXTRA) * 64 * 4
    assert w.nbytes == w.numpy().nbytes + tables.nbytes
    adapter = _core.LoraAdapter(w, c, m.config, 16)
    assert adapter.vocab_size == BASE_VOCAB + EXTRA
    assert (
        adapter.nbytes
        == _core.LoraAdapter(lorart.LoraWeights(w.numpy()), c, m.config, 16).nbytes + tables.nbytes
    )
    tied = lorart.LoraEmbeddings(embed_tokens=tables.embed_tokens, lm_head=tables.embed_tokens)
    assert tied.lm_head_is_embed_tokens and tied.nbytes == tables.nbytes // 2


def test_an_adapter_checked_against_another_vocabulary_is_refused(model, base_dir):
    """Its lm_head LoRA's B has that vocabulary's rows: the table refuses it (no read past B)."""
    m, _ = model
    other = lorart.hf.load_config(base_dir)
    other.vocab_size = 2
    rng = np.random.default_rng(0)
    parts = lorart.LoraEmbeddings(
        lm_head_lora_a=rng.normal(size=(4, 64)).astype(np.float32),
        lm_head_lora_b=np.ones((2, 4), np.float32),
    )
    weights = lorart.LoraWeights(np.zeros((0, 0), np.float32), embeddings=parts)
    adapter = _core.LoraAdapter(weights, lorart.LoraConfig(np.zeros((0, 3), np.int32)), other, 16)
    with pytest.raises(ValueError, match=r"another shape .*vocab 2; this model: .*vocab 128"):
        m._core.forward(
            *(np.array(v, np.int32) for v in ([1], [0], [0, 1], [0], [[0]], [0], [0])),
            m.kv_cache,
            [adapter],
            "float32",
        )


def test_a_lora_pair_has_one_dtype(model):
    m, _ = model
    import ml_dtypes

    parts = lorart.LoraEmbeddings(
        lm_head_lora_a=np.ones((4, 64), np.float32),
        lm_head_lora_b=np.ones((BASE_VOCAB, 4), ml_dtypes.bfloat16),
    )
    weights = lorart.LoraWeights(np.zeros((0, 0), np.float32), embeddings=parts)
    with pytest.raises(lorart.LoraError, match="lm_head_lora_a is float32 but lm_head_lora_b is"):
        lorart.lora.validate(weights, lorart.LoraConfig(np.zeros((0, 3), np.int32)), m.config, 16)


def test_a_request_refused_for_its_ids_leaves_the_cache_alone(base_dir, adapters):
    """Ids are checked against the most the request could have before its weights are cached."""
    _, w, c = adapters["extended"]
    _, w2, c2 = adapters["embed_lora"]
    config = lorart.ExecutorConfig(max_batch_size=4, max_num_tokens=64, max_seq_len=64)
    greedy = lorart.SamplingConfig(top_k=1)
    with lorart.Executor(str(base_dir), config) as exe:
        rid = exe.enqueue_request(
            lorart.InferenceRequest(
                [BASE_VOCAB + 7],
                max_new_tokens=2,
                sampling_config=greedy,
                lora_task_id=5,
                lora_weights=w,
                lora_config=c,
            )
        )
        first = exe.await_responses(rid, timeout=30)[-1]
        assert first.finish_reason == "length" and first.vocab_size == BASE_VOCAB + EXTRA
        # Other weights under task 5, with an id past even the extended vocabulary.
        rid = exe.enqueue_request(
            lorart.InferenceRequest(
                [1, BASE_VOCAB + EXTRA],
                max_new_tokens=2,
                lora_task_id=5,
                lora_weights=w2,
                lora_config=c2,
            )
        )
        bad = exe.await_responses(rid, timeout=30)[-1]
        assert bad.finish_reason == "error" and "out of the vocabulary [0, 128)" in bad.error
        stats = exe.stats()["lora_cache"]
        assert stats["replacements"] == 0 and stats["referenced_tasks"] == 0, stats
        # A task-id-only request is bounded by the cached adapter's vocabulary.
        rid = exe.enqueue_request(
            lorart.InferenceRequest(
                [BASE_VOCAB + EXTRA], max_new_tokens=2, sampling_config=greedy, lora_task_id=5
            )
        )
        bad = exe.await_responses(rid, timeout=30)[-1]
        assert "out of the vocabulary [0, 1128) of the request's adapter" in bad.error
        rid = exe.enqueue_request(
            lorart.InferenceRequest(
                [BASE_VOCAB + 7], max_new_tokens=2, sampling_config=greedy, lora_task_id=5
            )
        )
        again = exe.await_responses(rid, timeout=30)[-1]
        assert list(again.output_token_ids) == list(first.output_token_ids)
        assert exe.stats()["lora_cache"]["referenced_tasks"] == 0

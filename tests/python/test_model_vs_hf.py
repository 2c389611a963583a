"""lorart.model.Model against transformers (+ peft) in float32: context logits, greedy tokens and
chunked prefill, for every supported family (GQA Llama, llama3 rope scaling with tied embeddings,
MQA Mistral with a sliding window, Qwen2 with q/k/v biases) and for PEFT adapters.

Tolerance: max |lorart - HF fp32| <= max(1e-4, 3 x |HF fp32 - HF float64|), so a model that
amplifies rounding is held to a multiple of HF's own float32 error, never to a loose constant.
"""

from __future__ import annotations

import copy
import itertools
import json

import numpy as np
import pytest
from tiny_models import ALL_PROJECTIONS, hf_greedy, hf_logits, load_hf

from lorart.model import SequenceChunk

BLOCK = 16
ARCHS = ["gqa_llama_dir", "llama3_tied_dir", "mistral_mqa_dir", "qwen2_bias_dir"]
PROMPT_LENS = (23, 40)  # both cross 16-token blocks; 40 crosses the sliding window many times

# PEFT adapters on the GQA Llama (3 layers): name -> LoraConfig kwargs.
ADAPTERS = {
    "all7": dict(r=8, lora_alpha=16, target_modules=ALL_PROJECTIONS),
    "patterns": dict(
        r=4,
        lora_alpha=8,
        target_modules=ALL_PROJECTIONS,
        rank_pattern={"q_proj": 2, "layers.1.mlp.down_proj": 12},
        alpha_pattern={"v_proj": 3, "layers.2.self_attn.o_proj": 24},
    ),
    "rslora": dict(r=16, lora_alpha=8, use_rslora=True, target_modules=ALL_PROJECTIONS),
    "subset": dict(
        r=6,
        lora_alpha=12,
        target_modules=["q_proj", "v_proj", "down_proj"],
        layers_to_transform=[0, 2],
    ),
}


def peft_adapter(make_adapter, model_dir, name: str):
    seed = 100 + list(ADAPTERS).index(name)
    return make_adapter(model_dir, seed=seed, std=0.1, **ADAPTERS[name])


def prompt(vocab: int, length: int, seed: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(0, vocab, length)]


def blocks_for(num_tokens: int, seed: int) -> list[int]:
    """A scattered, non-monotonic block table (distinct ids below MODEL_KW's num_kv_blocks)."""
    n = -(-num_tokens // BLOCK)
    return [int(b) for b in np.random.default_rng(seed).permutation(96)[:n]]


def context_logits(model, ids, slot=-1, seed=0) -> np.ndarray:
    chunk = SequenceChunk(
        token_ids=list(ids),
        context_len=0,
        block_table=blocks_for(len(ids), seed),
        lora_slot=slot,
        all_logits=True,
    )
    [out] = model.forward([chunk])
    return out


def assert_matches_hf(got, hf32, hf64, what: str) -> None:
    assert got.dtype == np.float32, what
    assert got.shape == hf32.shape, f"{what}: shape {got.shape} != HF {hf32.shape}"
    hf_err = float(np.max(np.abs(hf32 - hf64)))
    tol = max(1e-4, 3 * hf_err)
    err = float(np.max(np.abs(got - hf32)))
    err64 = float(np.max(np.abs(got - hf64)))
    assert err <= tol, (
        f"{what}: max |lorart - HF fp32| = {err:.3g} > {tol:.3g} "
        f"(|lorart - HF f64| = {err64:.3g}, HF's own fp32 error {hf_err:.3g}; "
        f"worst at token {np.unravel_index(np.argmax(np.abs(got - hf32)), got.shape)})"
    )


@pytest.fixture(scope="module")
def hf():
    """Factory: hf(model_dir, dtype) -> cached transformers model (eager attention)."""
    cache: dict = {}

    def get(model_dir, dtype="float32"):
        key = (str(model_dir), dtype)
        if key not in cache:
            cache[key] = load_hf(model_dir, dtype)
        return cache[key]

    return get


@pytest.fixture(scope="module")
def peft64():
    """Factory: float64 copy of a PeftModel (cached)."""
    cache: dict = {}

    def get(peft_model):
        if id(peft_model) not in cache:
            cache[id(peft_model)] = copy.deepcopy(peft_model).double().eval()
        return cache[id(peft_model)]

    return get


def vocab_of(model_dir) -> int:
    return json.loads((model_dir / "config.json").read_text())["vocab_size"]


# ----------------------------------------------------------------------------- the references


def test_references_exercise_each_feature(hf, llama3_tied_dir, mistral_mqa_dir, qwen2_bias_dir):
    """The checkpoints are built so that each feature changes HF's logits by far more than the
    tolerance; otherwise a runtime that ignored it would pass the comparisons below."""
    import torch

    ids = torch.tensor([prompt(152, 24, 7)])

    def change(model, zero_bias=False, **config_changes) -> float:
        cfg = copy.deepcopy(model.config)
        for key, value in config_changes.items():
            setattr(cfg, key, value)
        alt = type(model)(cfg).eval()
        state = model.state_dict()
        if zero_bias:
            state = {k: (v * 0 if k.endswith(".bias") else v) for k, v in state.items()}
        alt.load_state_dict(state)
        with torch.no_grad():
            return float((model(ids).logits - alt(ids).logits).abs().max())

    default_rope = {"rope_type": "default", "rope_theta": 10000.0}
    assert change(hf(llama3_tied_dir), rope_parameters=default_rope) > 0.1
    assert change(hf(mistral_mqa_dir), sliding_window=None) > 0.1
    assert change(hf(qwen2_bias_dir), zero_bias=True) > 0.1
    tied = hf(llama3_tied_dir)
    assert tied.lm_head.weight.data_ptr() == tied.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("arch", ARCHS)
def test_model_config(arch, request, lorart_model):
    model_dir = request.getfixturevalue(arch)
    cfg = lorart_model(model_dir).config
    raw = json.loads((model_dir / "config.json").read_text())
    assert cfg.vocab_size == raw["vocab_size"]
    assert cfg.num_layers == raw["num_hidden_layers"]
    assert cfg.num_kv_heads == raw["num_key_value_heads"]
    assert cfg.sliding_window == (8 if arch == "mistral_mqa_dir" else 0)
    assert cfg.tie_word_embeddings == (arch == "llama3_tied_dir")
    assert cfg.attention_bias == (arch == "qwen2_bias_dir")


# ----------------------------------------------------------------------------- context logits


@pytest.mark.parametrize("length", PROMPT_LENS)
@pytest.mark.parametrize("arch", ARCHS)
def test_context_logits_base(arch, length, request, lorart_model, hf):
    model_dir = request.getfixturevalue(arch)
    model = lorart_model(model_dir)
    ids = prompt(vocab_of(model_dir), length, seed=length)
    got = context_logits(model, ids, seed=length)
    assert_matches_hf(
        got, hf_logits(hf(model_dir), ids), hf_logits(hf(model_dir, "float64"), ids), arch
    )


@pytest.mark.parametrize("arch", ARCHS)
def test_last_token_logits(arch, request, lorart_model):
    """all_logits=False returns [1, vocab]: the last row of the all-logits result."""
    model_dir = request.getfixturevalue(arch)
    model = lorart_model(model_dir)
    ids = prompt(vocab_of(model_dir), 29, seed=3)
    full = context_logits(model, ids, seed=1)
    chunk = SequenceChunk(
        token_ids=ids, context_len=0, block_table=blocks_for(29, 2), lora_slot=-1, all_logits=False
    )
    [last] = model.forward([chunk])
    assert last.shape == (1, full.shape[1])
    np.testing.assert_allclose(last[0], full[-1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_context_logits_peft_adapters(
    name, gqa_llama_dir, make_adapter, lorart_model, adapter_slot, peft64
):
    adapter = peft_adapter(make_adapter, gqa_llama_dir, name)
    model = lorart_model(gqa_llama_dir)
    slot = adapter_slot(model, adapter.dir)
    ids = prompt(160, 37, seed=5)
    ref32 = hf_logits(adapter.model, ids)
    got = context_logits(model, ids, slot=slot, seed=4)
    assert_matches_hf(got, ref32, hf_logits(peft64(adapter.model), ids), f"adapter {name}")
    # The adapter must matter: the base logits are far from PEFT's.
    base = context_logits(model, ids, seed=4)
    assert np.max(np.abs(base - ref32)) > 0.05


@pytest.mark.parametrize("arch", ARCHS[1:])
def test_context_logits_peft_other_families(
    arch, request, make_adapter, lorart_model, adapter_slot, peft64
):
    """All seven projections on MQA / biased / tied models (k/v LoRA of one KV head, etc.)."""
    model_dir = request.getfixturevalue(arch)
    adapter = make_adapter(model_dir, seed=7, std=0.1, **ADAPTERS["all7"])
    model = lorart_model(model_dir)
    slot = adapter_slot(model, adapter.dir)
    ids = prompt(vocab_of(model_dir), 34, seed=6)
    got = context_logits(model, ids, slot=slot, seed=6)
    assert_matches_hf(
        got, hf_logits(adapter.model, ids), hf_logits(peft64(adapter.model), ids), f"{arch} + LoRA"
    )


# ----------------------------------------------------------------------------- chunked prefill


def chunked_logits(model, ids, splits, slot=-1, seed=0) -> np.ndarray:
    """Feed ids in pieces over successive forwards, reusing one block table."""
    table = blocks_for(len(ids), seed)
    bounds = [0, *splits, len(ids)]
    outs = []
    for lo, hi in itertools.pairwise(bounds):
        chunk = SequenceChunk(
            token_ids=ids[lo:hi], context_len=lo, block_table=table, lora_slot=slot, all_logits=True
        )
        [out] = model.forward([chunk])
        assert out.shape == (hi - lo, model.config.vocab_size)
        outs.append(out)
    return np.concatenate(outs)


@pytest.mark.parametrize("arch", ARCHS)
def test_chunked_prefill_equals_single_chunk(arch, request, lorart_model):
    model_dir = request.getfixturevalue(arch)
    model = lorart_model(model_dir)
    ids = prompt(vocab_of(model_dir), 40, seed=11)
    whole = context_logits(model, ids, seed=12)
    # Splits inside blocks, on a block boundary, and single-token (decode-like) steps at the end.
    for splits in ([5, 21], [16, 32], [13], [37, 38, 39]):
        got = chunked_logits(model, ids, splits, seed=13)
        np.testing.assert_allclose(got, whole, rtol=0, atol=1e-5, err_msg=f"{arch} split {splits}")


def test_chunked_prefill_with_adapter(gqa_llama_dir, make_adapter, lorart_model, adapter_slot):
    adapter = peft_adapter(make_adapter, gqa_llama_dir, "rslora")
    model = lorart_model(gqa_llama_dir)
    slot = adapter_slot(model, adapter.dir)
    ids = prompt(160, 35, seed=14)
    whole = context_logits(model, ids, slot=slot, seed=15)
    got = chunked_logits(model, ids, [9, 24], slot=slot, seed=16)
    np.testing.assert_allclose(got, whole, rtol=0, atol=1e-5)
    np.testing.assert_allclose(whole, hf_logits(adapter.model, ids), rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------- greedy generation

NEW_TOKENS = 8


def assert_greedy_equal(got, prompts, refs, what: str) -> None:
    assert len(got) == len(prompts), what
    for i, (toks, (ref, gap)) in enumerate(zip(got, refs, strict=True)):
        assert list(toks) == ref, (
            f"{what}, prompt {i}: lorart {list(toks)} != HF {ref} (min gap {gap:.3g})"
        )


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_greedy_base(arch, request, lorart_model, hf):
    model_dir = request.getfixturevalue(arch)
    model = lorart_model(model_dir)
    vocab = vocab_of(model_dir)
    prompts = [prompt(vocab, n, seed=20 + n) for n in (20, 33, 9)]
    got = model.generate_greedy(prompts, max_new_tokens=NEW_TOKENS)
    refs = [hf_greedy(hf(model_dir), p, NEW_TOKENS) for p in prompts]
    assert_greedy_equal(got, prompts, refs, arch)


def test_generate_greedy_adapters(gqa_llama_dir, make_adapter, lorart_model, adapter_slot, hf):
    """One batched call, each prompt with its own adapter (or none), against PEFT one by one."""
    model = lorart_model(gqa_llama_dir)
    adapters = [peft_adapter(make_adapter, gqa_llama_dir, n) for n in ADAPTERS]
    slots = [adapter_slot(model, a.dir) for a in adapters]
    refs_models = [a.model for a in adapters]
    prompts = [prompt(160, n, seed=30 + n) for n in (20, 17, 26, 31, 12)]
    lora_slots = [slots[0], -1, slots[1], slots[2], slots[3]]
    ref_models = [refs_models[0], hf(gqa_llama_dir), refs_models[1], refs_models[2], refs_models[3]]
    got = model.generate_greedy(prompts, max_new_tokens=NEW_TOKENS, lora_slots=lora_slots)
    refs = [hf_greedy(m, p, NEW_TOKENS) for m, p in zip(ref_models, prompts, strict=True)]
    assert_greedy_equal(got, prompts, refs, "mixed adapters")


@pytest.mark.parametrize("arch", ARCHS[1:])
def test_generate_greedy_adapter_other_families(
    arch, request, make_adapter, lorart_model, adapter_slot, hf
):
    model_dir = request.getfixturevalue(arch)
    adapter = make_adapter(model_dir, seed=7, std=0.1, **ADAPTERS["all7"])
    model = lorart_model(model_dir)
    slot = adapter_slot(model, adapter.dir)
    vocab = vocab_of(model_dir)
    prompts = [prompt(vocab, n, seed=40 + n) for n in (21, 14)]
    got = model.generate_greedy(prompts, max_new_tokens=NEW_TOKENS, lora_slots=[slot, -1])
    refs = [
        hf_greedy(adapter.model, prompts[0], NEW_TOKENS),
        hf_greedy(hf(model_dir), prompts[1], NEW_TOKENS),
    ]
    assert_greedy_equal(got, prompts, refs, f"{arch} + LoRA")

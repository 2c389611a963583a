"""Batch invariance of lorart.model.Model.forward, and its argument errors.

A sequence's logits must not depend, in any bit, on what else is in the batch (other sequences,
other adapters of other ranks, prefill chunks and decode tokens mixed, its place in the batch) nor
on which KV blocks hold its context (test_batch_invariance.py covers batch sizes, thread counts and
chunking). Bad arguments raise ValueError (lorart.LoraError for a foreign adapter) and leave the
model working.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import MODEL_KW
from tiny_models import ALL_PROJECTIONS, bits, hf_logits

import lorart
from lorart.model import SequenceChunk

BLOCK = MODEL_KW["block_size"]
NUM_BLOCKS = MODEL_KW["num_kv_blocks"]
MAX_TOKENS = MODEL_KW["max_num_tokens"]
VOCAB = 160  # gqa_llama_dir
RANKS = (2, 8, 16)


def tokens(n: int, seed: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(0, VOCAB, n)]


PROBE_BLOCKS = 5  # the last few block ids belong to the error tests' probe


class Blocks:
    """Hands out distinct block ids in a scrambled order, so no table is ever contiguous."""

    def __init__(self, seed: int):
        perm = np.random.default_rng(seed).permutation(NUM_BLOCKS - PROBE_BLOCKS)
        self._free = [int(b) for b in perm]

    def take(self, num_tokens: int) -> list[int]:
        n = -(-num_tokens // BLOCK)
        out, self._free = self._free[:n], self._free[n:]
        assert len(out) == n, "test ran out of KV blocks"
        return out


def chunk(ids, ctx, table, slot=-1, all_logits=True) -> SequenceChunk:
    return SequenceChunk(
        token_ids=list(ids),
        context_len=ctx,
        block_table=table,
        lora_slot=slot,
        all_logits=all_logits,
    )


def max_diff(a, b) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b)))


def same_bits(a, b) -> bool:
    assert a.shape == b.shape, (a.shape, b.shape)
    return np.array_equal(bits(a), bits(b))


@pytest.fixture(scope="module")
def model(gqa_llama_dir, lorart_model):
    return lorart_model(gqa_llama_dir)


@pytest.fixture(scope="module")
def ranked(gqa_llama_dir, make_adapter, model, adapter_slot):
    """{r: (slot, PeftModel)} for adapters of rank 2, 8 and 16 on all seven projections."""
    out = {}
    for r in RANKS:
        adapter = make_adapter(
            gqa_llama_dir,
            seed=200 + r,
            std=0.1,
            r=r,
            lora_alpha=2 * r,
            target_modules=ALL_PROJECTIONS,
        )
        out[r] = (adapter_slot(model, adapter.dir), adapter.model)
    return out


# ----------------------------------------------------------------------------- block tables


def test_block_table_permutation(model, ranked):
    """The same sequence in two different sets of blocks, in scrambled order, gives equal logits
    for the prefill and for decode steps that read the cached context."""
    slot = ranked[8][0]
    ids = tokens(37, seed=1)
    tables = [[0, 1, 2, 3], Blocks(seed=2).take(40), Blocks(seed=3).take(40)[::-1]]
    outs = []
    for table in tables:
        prefill = model.forward([chunk(ids[:34], 0, table, slot)])[0]
        decode = [
            model.forward([chunk([t], 34 + i, table, slot)])[0] for i, t in enumerate(ids[34:])
        ]
        outs.append(np.concatenate([prefill, *decode]))
    for table, out in zip(tables[1:], outs[1:], strict=True):
        assert same_bits(out, outs[0]), f"block table {table} vs {tables[0]}"


# ----------------------------------------------------------------------------- mixed batches


def sequences():
    """Five sequences: (history tokens already in the cache, tokens of this step, adapter rank or
    None, all_logits). Prefill from scratch, decode after a long context, a second prefill chunk,
    two sequences sharing one adapter."""
    return [
        (tokens(0, 10), tokens(37, 11), 2, True),  # prefill, crosses 3 blocks
        (tokens(20, 12), tokens(1, 13), 16, True),  # decode
        (tokens(16, 14), tokens(11, 15), None, True),  # second chunk, block-aligned start
        (tokens(33, 16), tokens(1, 17), 8, False),  # decode, last-token logits only
        (tokens(0, 18), tokens(5, 19), 8, False),  # short prefill, same adapter as above
    ]


def run_step(model, ranked, seqs, order, blocks: Blocks, batched: bool):
    """Write each sequence's history (alone), then run this step's chunks together or alone.
    Returns ({index: logits}, {index: block table}) keyed by position in seqs."""
    tables, chunks = {}, {}
    for i in order:
        hist, new, rank, all_logits = seqs[i]
        slot = -1 if rank is None else ranked[rank][0]
        tables[i] = blocks.take(len(hist) + len(new) + 2)
        if hist:
            model.forward([chunk(hist, 0, tables[i], slot)])
        chunks[i] = chunk(new, len(hist), tables[i], slot, all_logits)
    if batched:
        outs = dict(zip(order, model.forward([chunks[i] for i in order]), strict=True))
    else:
        outs = {i: model.forward([chunks[i]])[0] for i in order}
    return outs, tables


def decode_next(model, ranked, seqs, tables, order, next_tok, batched: bool):
    """One decode step for every sequence (reads the KV the previous step wrote)."""
    chunks = {}
    for i in order:
        hist, new, rank, _ = seqs[i]
        slot = -1 if rank is None else ranked[rank][0]
        chunks[i] = chunk([next_tok[i]], len(hist) + len(new), tables[i], slot)
    if batched:
        return dict(zip(order, model.forward([chunks[i] for i in order]), strict=True))
    return {i: model.forward([chunks[i]])[0] for i in order}


@pytest.mark.parametrize("order", [[0, 1, 2, 3, 4], [3, 0, 4, 2, 1], [4, 3, 2, 1, 0]])
def test_mixed_batch_equals_alone(model, ranked, order):
    seqs = sequences()
    blocks = Blocks(4)  # one allocator: the two runs' KV must not overlap
    alone, alone_tables = run_step(model, ranked, seqs, range(len(seqs)), blocks, batched=False)
    batch, batch_tables = run_step(model, ranked, seqs, order, blocks, batched=True)
    for i, (_, new, rank, all_logits) in enumerate(seqs):
        rows = len(new) if all_logits else 1
        assert batch[i].shape == (rows, VOCAB)
        d = max_diff(batch[i], alone[i])
        assert same_bits(batch[i], alone[i]), (
            f"sequence {i} (rank {rank}) at batch position {order.index(i)}: {d:.3g}"
        )
    # The next decode step reads the KV written inside the batch.
    next_tok = {i: int(np.argmax(alone[i][-1])) for i in range(len(seqs))}
    alone2 = decode_next(model, ranked, seqs, alone_tables, range(len(seqs)), next_tok, False)
    batch2 = decode_next(model, ranked, seqs, batch_tables, order, next_tok, True)
    for i in range(len(seqs)):
        d = max_diff(batch2[i], alone2[i])
        assert same_bits(batch2[i], alone2[i]), f"decode after the batch, sequence {i}: {d:.3g}"


def test_mixed_ranks_match_peft(model, ranked, hf):
    """Each rank alone matches PEFT, so the batch comparisons above compare correct results."""
    ids = tokens(29, seed=20)
    blocks = Blocks(6)
    base = model.forward([chunk(ids, 0, blocks.take(29))])[0]
    np.testing.assert_allclose(base, hf_logits(hf, ids), rtol=0, atol=1e-4)
    for r, (slot, peft_model) in ranked.items():
        got = model.forward([chunk(ids, 0, blocks.take(29), slot)])[0]
        ref = hf_logits(peft_model, ids)
        assert max_diff(got, ref) <= 1e-4, f"rank {r}"
        assert max_diff(got, base) > 0.05, f"rank {r} adapter has no effect"


@pytest.fixture(scope="module")
def hf(gqa_llama_dir):
    from tiny_models import load_hf

    return load_hf(gqa_llama_dir)


def test_same_prompt_different_adapters_in_one_batch(model, ranked):
    """One prompt under base and three ranks in one batch: each row equals its own run alone,
    and the four results differ (slots are not mixed up)."""
    ids = tokens(21, seed=21)
    slots = [-1] + [ranked[r][0] for r in RANKS]
    blocks = Blocks(7)
    alone = [model.forward([chunk(ids, 0, blocks.take(21), s)])[0] for s in slots]
    batch = model.forward([chunk(ids, 0, blocks.take(21), s) for s in slots])
    for s, a, b in zip(slots, alone, batch, strict=True):
        assert same_bits(a, b), f"slot {s}"
    for i in range(len(slots)):
        for j in range(i):
            assert max_diff(batch[i], batch[j]) > 0.05


def test_generate_greedy_batch_invariance(model, ranked):
    prompts = [tokens(n, seed=30 + n) for n in (19, 4, 33, 16)]
    slots = [ranked[2][0], -1, ranked[16][0], ranked[8][0]]
    together = model.generate_greedy(prompts, max_new_tokens=6, lora_slots=slots)
    alone = [
        model.generate_greedy([p], max_new_tokens=6, lora_slots=[s])[0]
        for p, s in zip(prompts, slots, strict=True)
    ]
    assert [list(t) for t in together] == [list(t) for t in alone]
    assert all(len(t) == 6 for t in together)
    base = model.generate_greedy(prompts, max_new_tokens=6)
    assert [list(t) for t in base] == [
        list(t) for t in model.generate_greedy(prompts, max_new_tokens=6, lora_slots=[-1] * 4)
    ]


# ----------------------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def probe(model, ranked):
    """A check that the model still works: a decode that reads context cached before the errors,
    and a prefill, against their first results. The probe's KV lives in the last PROBE_BLOCKS
    blocks, which nothing else in this module touches."""
    slot = ranked[16][0]
    ids = tokens(30, seed=40)
    table = [NUM_BLOCKS - 1, NUM_BLOCKS - 3, NUM_BLOCKS - 2]
    first = model.forward([chunk(ids, 0, table, slot)])[0]
    first_decode = model.forward([chunk([7], 30, table, slot)])[0]
    fresh = [NUM_BLOCKS - 4, NUM_BLOCKS - 5]

    def check():
        step = model.forward([chunk([7], 30, table, slot), chunk(ids[:20], 0, fresh, slot)])
        np.testing.assert_array_equal(step[0], first_decode)
        np.testing.assert_array_equal(step[1], first[:20])

    check()
    return check


def bad_batches(slot):
    """name -> (chunks, regex the message must match). Each batch also holds one valid chunk."""
    ok = chunk(tokens(9, 50), 0, [0], slot)
    too_many = MAX_TOKENS + 1
    return {
        "block_table short for prefill": ([ok, chunk(tokens(20, 51), 0, [1])], "block_table"),
        "block_table short for decode": ([ok, chunk([3], 16, [1])], "block_table"),
        "block_table empty": ([chunk([3], 0, [])], "block_table"),
        "block id >= num_kv_blocks": ([ok, chunk([3], 0, [NUM_BLOCKS])], "block"),
        "negative block id": ([ok, chunk([3], 0, [-1])], "block"),
        "token id = vocab": ([ok, chunk([5, VOCAB, 6], 0, [1])], "token"),
        "negative token id": ([ok, chunk([5, -1], 0, [1])], "token"),
        "empty token_ids": ([ok, chunk([], 0, [1], all_logits=False)], "token"),
        "unknown lora slot": ([ok, chunk([5], 0, [1], slot=99)], "slot"),
        "lora slot -2": ([ok, chunk([5], 0, [1], slot=-2)], "slot"),
        "one chunk over max_num_tokens": (
            [chunk(tokens(too_many, 52), 0, list(range(1, 2 + too_many // BLOCK)))],
            "max_num_tokens",
        ),
        "batch over max_num_tokens": (
            [
                chunk(tokens(MAX_TOKENS // 2 + 1, 53), 0, list(range(1, 11))),
                chunk(tokens(MAX_TOKENS // 2, 54), 0, list(range(11, 21))),
            ],
            "max_num_tokens",
        ),
    }


BAD = list(bad_batches(0))


@pytest.mark.parametrize("name", BAD)
def test_bad_forward_raises_and_model_still_works(name, model, ranked, probe):
    chunks, pattern = bad_batches(ranked[2][0])[name]
    with pytest.raises(ValueError, match=pattern):
        model.forward(chunks)
    probe()


def test_adapter_for_another_model(model, llama_other_dir, make_adapter, probe):
    other = make_adapter(llama_other_dir, r=4, lora_alpha=8, target_modules=ALL_PROJECTIONS)
    weights, config = lorart.lora.from_peft(str(other.dir))
    with pytest.raises(lorart.LoraError):
        model.add_adapter(weights, config)
    probe()


def test_adapter_with_layer_out_of_range(model, gqa_llama_dir, probe):
    """A hand-made adapter whose row names layer 3 of a 3-layer model."""
    hidden = json.loads((gqa_llama_dir / "config.json").read_text())["hidden_size"]
    config = lorart.LoraConfig(np.array([[1, 3, 4]], dtype=np.int32))
    weights = lorart.LoraWeights(np.ones((1, 4 * hidden * 2), np.float32))
    with pytest.raises(lorart.LoraError, match="layer"):
        model.add_adapter(weights, config)
    probe()


def test_adapter_rank_over_max_lora_rank(model, gqa_llama_dir, probe):
    """Rank 65 > the default max_lora_rank 64."""
    hidden = json.loads((gqa_llama_dir / "config.json").read_text())["hidden_size"]
    config = lorart.LoraConfig(np.array([[1, 0, 65]], dtype=np.int32))
    weights = lorart.LoraWeights(np.zeros((1, 65 * hidden * 2), np.float32))
    with pytest.raises(lorart.LoraError, match="65"):
        model.add_adapter(weights, config)
    probe()


def test_generate_greedy_errors(model, probe):
    with pytest.raises(ValueError, match="slot"):
        model.generate_greedy([tokens(5, 60)], max_new_tokens=2, lora_slots=[99])
    with pytest.raises(ValueError, match="token"):
        model.generate_greedy([[1, VOCAB]], max_new_tokens=2)
    with pytest.raises(ValueError):
        model.generate_greedy([tokens(5, 60), tokens(6, 61)], max_new_tokens=2, lora_slots=[-1])
    probe()

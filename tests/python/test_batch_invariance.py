"""Batch invariance, bitwise: a token's logits (and the K/V it writes) do not depend on what else
is in its forward, on the thread count, or on whether it runs as a decode token or inside a
prefill chunk of any length (what recompute after preemption does). Through the executor, a
seeded sampling request gives the same tokens and logits preempted as alone.

Every comparison here is exact (bit patterns), not a tolerance: sampling turns any difference in
the last bit into a different token sooner or later.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from tiny_models import ALL_PROJECTIONS, bits

import lorart
from lorart import _core
from lorart.model import Model, SequenceChunk

VOCAB = 160  # gqa_llama_dir
BLOCK = 16
NUM_BLOCKS = 512
THREADS = [1, 2, 3]


def tokens(n: int, seed: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(0, VOCAB, n)]


def assert_same_bits(got: np.ndarray, want: np.ndarray, what: str) -> None:
    assert got.shape == want.shape, (what, got.shape, want.shape)
    if not np.array_equal(bits(got), bits(want)):
        diff = float(np.max(np.abs(got.astype(np.float64) - want)))
        raise AssertionError(f"{what}: not bitwise equal (max |diff| {diff:.3g})")


@pytest.fixture
def threads():
    """Sets the kernels' thread count for one test and restores it afterwards."""
    saved = _core.get_num_threads()
    yield _core.set_num_threads
    _core.set_num_threads(saved)


class Blocks:
    """Hands out distinct KV block ids for one run (a run writes every block before it reads
    it, so runs may reuse each other's blocks)."""

    def __init__(self) -> None:
        self.next = 0

    def take(self, num_tokens: int) -> list[int]:
        n = -(-num_tokens // BLOCK)
        assert self.next + n <= NUM_BLOCKS, "test ran out of KV blocks"
        out = list(range(self.next, self.next + n))
        self.next += n
        return out


@pytest.fixture(scope="module")
def model(gqa_llama_dir) -> Model:
    return Model.from_pretrained(
        gqa_llama_dir, max_num_tokens=512, num_kv_blocks=NUM_BLOCKS, block_size=BLOCK
    )


@pytest.fixture(scope="module")
def slots(model, gqa_llama_dir, make_adapter) -> dict[str, int]:
    """Adapters of ranks 4 and 16 in float32 and the rank-16 one also stored in bfloat16."""
    out = {"base": -1}
    for r in (4, 16):
        a = make_adapter(
            gqa_llama_dir, seed=900 + r, std=0.1, r=r, lora_alpha=r, target_modules=ALL_PROJECTIONS
        )
        out[f"r{r}"] = model.add_adapter(*lorart.lora.from_peft(str(a.dir), model.config))
        if r == 16:
            low = lorart.lora.from_peft(str(a.dir), model.config, dtype="bfloat16")
            out["r16_bf16"] = model.add_adapter(*low)
    return out


def decode_neighbours(model, blocks, slots, count: int, seed: int) -> list[SequenceChunk]:
    """`count` decode chunks over cached histories of different lengths and adapters."""
    rng = np.random.default_rng(seed)
    names = list(slots)
    out = []
    for i in range(count):
        hist = tokens(int(rng.integers(1, 40)), seed * 1000 + i)
        table = blocks.take(len(hist) + 1)
        slot = slots[names[i % len(names)]]
        model.forward([SequenceChunk(hist, 0, table, slot)])
        out.append(SequenceChunk(tokens(1, seed * 1000 + 500 + i), len(hist), table, slot))
    return out


@pytest.mark.parametrize("num_threads", [1, 2])
@pytest.mark.parametrize("adapter", ["base", "r4", "r16_bf16"])
def test_decode_logits_do_not_depend_on_batch_size(model, slots, threads, num_threads, adapter):
    """The issue's case: one decode token alone, then with 1..63 other decode tokens (other
    adapters, other context lengths) around it."""
    threads(num_threads)
    hist, tok, slot = tokens(21, 1), tokens(1, 2), slots[adapter]

    def target(blocks: Blocks) -> SequenceChunk:
        table = blocks.take(len(hist) + 1)
        model.forward([SequenceChunk(hist, 0, table, slot)])
        return SequenceChunk(tok, len(hist), table, slot)

    alone = model.forward([target(Blocks())])[0]
    for size in (2, 7, 8, 9, 16, 17, 24, 33, 64):
        blocks = Blocks()
        others = decode_neighbours(model, blocks, slots, size - 1, seed=size)
        where = size // 2
        batch = [*others[:where], target(blocks), *others[where:]]
        got = model.forward(batch)[where]
        assert_same_bits(got, alone, f"decode token in a batch of {size}")


def run_in_chunks(model, blocks, ids, slot, cuts, neighbours) -> tuple[np.ndarray, list[int]]:
    """Logits of every token of `ids` computed chunk by chunk (chunk boundaries at `cuts`), each
    chunk in a forward with `neighbours(i)` other chunks before it. Returns (logits, table)."""
    table = blocks.take(len(ids) + 8)
    bounds = [0, *cuts, len(ids)]
    rows = []
    for i, (lo, hi) in enumerate(itertools.pairwise(bounds)):
        mine = SequenceChunk(ids[lo:hi], lo, table, slot, all_logits=True)
        others = neighbours(i)
        rows.append(model.forward([*others, mine])[len(others)])
    return np.concatenate(rows), table


def continue_decoding(model, table, ids, slot, steps: int) -> np.ndarray:
    """Greedy decode steps after `ids` (reads the K/V the chunks wrote)."""
    rows, pos, last = [], len(ids), None
    for _ in range(steps):
        tok = [int(np.argmax(last))] if last is not None else [7]
        last = model.forward([SequenceChunk(tok, pos, table, slot)])[0][0]
        rows.append(last)
        pos += 1
    return np.stack(rows)


@pytest.mark.parametrize("adapter", ["base", "r16", "r16_bf16"])
def test_token_logits_and_kv_same_as_decode_or_in_any_prefill_chunk(model, slots, threads, adapter):
    """A sequence computed as one prefill, token by token (decode), and in chunks of 1..40
    tokens next to other chunks, at 1, 2 and 3 threads: every token's logits, and the decode
    steps that read the K/V each way wrote, are bitwise the same."""
    slot = slots[adapter]
    ids = tokens(45, 3)
    blocks = Blocks()

    def none(_i):
        return []

    def mixed(i):
        # A prefill neighbour of a varying length plus a few decode tokens.
        n = 5 + 7 * i
        extra = SequenceChunk(tokens(n, 40 + i), 0, blocks.take(n), slots["r4"], all_logits=True)
        return [extra, *decode_neighbours(model, blocks, slots, i % 3, seed=60 + i)]

    plans = {
        "one prefill": ([], none),
        "decode": (list(range(1, len(ids))), none),
        "chunks 3/17/1/19/5": ([3, 20, 21, 40], mixed),
        "chunks 16/17": ([16, 33], mixed),
    }
    want = None
    for num_threads in THREADS:
        threads(num_threads)
        for name, (cuts, neighbours) in plans.items():
            blocks.next = 0
            logits, table = run_in_chunks(model, blocks, ids, slot, cuts, neighbours)
            after = continue_decoding(model, table, ids, slot, steps=4)
            if want is None:
                want = (logits, after)
                continue
            what = f"{name}, {num_threads} thread(s)"
            assert_same_bits(logits, want[0], f"{what}: chunk logits")
            assert_same_bits(after, want[1], f"{what}: decode after the chunks (reads their K/V)")


def test_logits_do_not_depend_on_which_rows_are_asked_for(model, slots):
    """A chunk's last-token logits are the same whether all rows' logits are computed or one
    (the lm_head's row count changes)."""
    blocks = Blocks()
    ids = tokens(37, 4)
    table = blocks.take(len(ids))
    all_rows = model.forward([SequenceChunk(ids, 0, table, slots["r4"], all_logits=True)])[0]
    last = model.forward([SequenceChunk(ids, 0, table, slots["r4"], all_logits=False)])[0]
    assert_same_bits(last, all_rows[-1:], "last row alone vs among 37")


# ------------------------------------------------------------------------------- executor


SAMPLED = [
    ("top_p", dict(temperature=0.9, top_p=0.8, seed=11)),
    ("temperature", dict(temperature=1.3, seed=12)),
    ("top_k", dict(temperature=0.7, top_k=20, seed=13)),
]
NEW = 24


@pytest.fixture(scope="module")
def executor_adapter(gqa_llama_dir, make_adapter, model):
    a = make_adapter(
        gqa_llama_dir, seed=904, std=0.1, r=4, lora_alpha=4, target_modules=ALL_PROJECTIONS
    )
    return lorart.lora.from_peft(str(a.dir), model.config)


def run_requests(model_dir, adapter, prompts, kv_tokens: int, max_num_tokens: int):
    """Every (prompt, sampling) request at once; returns ([(tokens, generation logits)], stats)."""
    cfg = lorart.ExecutorConfig(
        max_batch_size=8,
        max_num_tokens=max_num_tokens,
        max_seq_len=64,
        max_lora_rank=16,
        kv_cache=lorart.KvCacheConfig(block_size=4, max_tokens=kv_tokens),
    )
    with lorart.Executor(model_dir, cfg) as exe:
        ids = []
        for i, (prompt, (_, sampling)) in enumerate(prompts):
            kw = {}
            if i % 2 == 1:
                kw = dict(lora_task_id=1)
                if i == 1:
                    kw.update(lora_weights=adapter[0], lora_config=adapter[1])
            request = lorart.InferenceRequest(
                prompt,
                max_new_tokens=NEW,
                sampling_config=lorart.SamplingConfig(**sampling),
                return_generation_logits=True,
                **kw,
            )
            ids.append(exe.enqueue_request(request))
        outs = []
        for rid in ids:
            responses = []
            while not (responses and responses[-1].is_final):
                got = exe.await_responses(rid, timeout=60.0)
                assert got, f"request {rid}: no response within 60 s"
                responses.extend(got)
            final = responses[-1]
            assert final.finish_reason == "length", (final.finish_reason, final.error)
            outs.append((list(final.output_token_ids), final.generation_logits))
        return outs, exe.stats()


def test_seeded_sampling_preempted_equals_alone(gqa_llama_dir, executor_adapter):
    """Six seeded sampling requests (top-p, temperature, top-k; base and LoRA) in a KV pool so
    small that they preempt each other, and with chunked prefill, give bitwise the tokens and
    generation logits of a roomy pool: recompute after preemption re-runs the generated tokens as
    prefill chunks, which must reproduce their K/V and logits exactly."""
    prompts = [
        (tokens(9 + 4 * i, 70 + i), SAMPLED[i % len(SAMPLED)]) for i in range(6)
    ]  # 9..29 tokens, growing by NEW
    tight, tight_stats = run_requests(gqa_llama_dir, executor_adapter, prompts, 64, 24)
    roomy, roomy_stats = run_requests(gqa_llama_dir, executor_adapter, prompts, 4096, 512)
    assert tight_stats["preemptions"] > 0, tight_stats
    assert roomy_stats["preemptions"] == 0, roomy_stats
    for i, ((t_tok, t_log), (r_tok, r_log)) in enumerate(zip(tight, roomy, strict=True)):
        name = prompts[i][1][0]
        assert t_tok == r_tok, f"request {i} ({name}): preempted {t_tok} != roomy {r_tok}"
        assert_same_bits(t_log, r_log, f"request {i} ({name}) generation logits")

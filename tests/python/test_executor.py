"""lorart.Executor end to end on a tiny random Llama (GQA, 3 layers, vocab 160) with PEFT adapters.

Greedy outputs are checked three ways: a request inside a mixed batch, the same request alone, and
transformers (+ peft) generating greedily by full recomputation. Everything else (LoRA cache
pressure, threads, cancellation, streaming, bad inputs, stop conditions, seeded sampling,
preemption, logits, shutdown) is checked against those references.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from executor_helpers import TIMEOUT, cancel_midway, collect, final
from tiny_models import ALL_PROJECTIONS, hf_greedy, hf_logits, load_hf

import lorart
import lorart.hf
from lorart.model import SequenceChunk

VOCAB = 160
NEW = 8  # max_new_tokens of the greedy comparisons
NUM_ADAPTERS = 6

# The seed's mixed batch: prompts [A, A, A, B, B, B], adapters [-1, 0, 1, -1, 0, 1].
SEED_BATCH = [("A", None), ("A", 0), ("A", 1), ("B", None), ("B", 0), ("B", 1)]


def make_prompt(length: int, seed: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(0, VOCAB, length)]


PROMPTS = {
    "A": make_prompt(11, 1),
    "B": make_prompt(19, 2),  # crosses a 16-token KV block
    "C": make_prompt(5, 3),
    "D": make_prompt(14, 4),
    "E": make_prompt(23, 5),
    "F": make_prompt(8, 6),
    "G": make_prompt(17, 7),
    "H": make_prompt(3, 8),
}


def greedy() -> lorart.SamplingConfig:
    return lorart.SamplingConfig(top_k=1)


def config(**overrides) -> lorart.ExecutorConfig:
    kw = dict(
        max_batch_size=8,
        max_num_tokens=64,
        max_seq_len=128,
        max_lora_rank=16,
        kv_cache=lorart.KvCacheConfig(block_size=16, max_tokens=4096),
    )
    kw.update(overrides)
    return lorart.ExecutorConfig(**kw)


class Client:
    """An executor plus the adapters it may use: the first request of a task carries
    lora_weights + lora_config, later ones only the lora_task_id."""

    def __init__(self, exe, tensors) -> None:
        self.exe = exe
        self.tensors = tensors
        self.sent: set[int] = set()

    def request(self, ids, task=None, max_new_tokens=NEW, sampling=None, **kw):
        if task is not None:
            kw["lora_task_id"] = task
            if task not in self.sent:
                kw["lora_weights"], kw["lora_config"] = self.tensors[task]
                self.sent.add(task)
        return lorart.InferenceRequest(
            list(ids),
            max_new_tokens=max_new_tokens,
            sampling_config=sampling if sampling is not None else greedy(),
            **kw,
        )

    def submit(self, ids, task=None, **kw) -> int:
        return self.exe.enqueue_request(self.request(ids, task, **kw))

    def run(self, ids, task=None, **kw):
        return final(self.exe, self.submit(ids, task, **kw))

    def tokens(self, ids, task=None, **kw) -> list[int]:
        r = self.run(ids, task, **kw)
        assert r.finish_reason in ("length", "end_id", "stop"), (r.finish_reason, r.error)
        return list(r.output_token_ids)


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def adapters(make_adapter, gqa_llama_dir):
    """Six PEFT adapters (r=8 on all seven projections, random A and B), task ids 0..5."""
    return [
        make_adapter(
            gqa_llama_dir, seed=500 + i, std=0.1, r=8, lora_alpha=16, target_modules=ALL_PROJECTIONS
        )
        for i in range(NUM_ADAPTERS)
    ]


@pytest.fixture(scope="module")
def exe(gqa_llama_dir):
    executor = lorart.Executor(gqa_llama_dir, config())
    yield executor
    executor.shutdown()


@pytest.fixture(scope="module")
def tensors(exe, adapters):
    """task id -> (LoraWeights, LoraConfig) converted for the model."""
    return {i: lorart.lora.from_peft(str(a.dir), exe.model_config) for i, a in enumerate(adapters)}


@pytest.fixture(scope="module")
def client(exe, tensors) -> Client:
    return Client(exe, tensors)


@pytest.fixture(scope="module")
def alone(client):
    """alone(prompt_name, task, n=NEW) -> greedy tokens of that request run by itself."""
    cache: dict = {}

    def get(name: str, task=None, n: int = NEW) -> list[int]:
        key = (name, task, n)
        if key not in cache:
            cache[key] = client.tokens(PROMPTS[name], task, max_new_tokens=n)
        return cache[key]

    return get


@pytest.fixture(scope="module")
def hf_base(gqa_llama_dir):
    return load_hf(gqa_llama_dir)


def adapter_bytes(tensors, model_config) -> int:
    """What adapter 0 costs on the device level (used values only, no row padding)."""
    weights, config = tensors[0]
    return lorart._core.LoraAdapter(weights, config, model_config, 16).nbytes


# ---------------------------------------------------------------------- the seed's mixed batch


def test_seed_mixed_batch_equals_alone_and_transformers(client, alone, adapters, hf_base):
    ids = [client.submit(PROMPTS[name], task) for name, task in SEED_BATCH]
    got = [final(client.exe, rid) for rid in ids]
    for (name, task), r in zip(SEED_BATCH, got, strict=True):
        assert r.finish_reason == "length", (name, task, r.error)
        assert r.error is None
        assert len(r.output_token_ids) == NEW
        ref_model = hf_base if task is None else adapters[task].model
        ref, gap = hf_greedy(ref_model, PROMPTS[name], NEW)
        assert list(r.output_token_ids) == ref, (
            f"prompt {name}, task {task}: executor {list(r.output_token_ids)} != HF {ref} "
            f"(min top-1/top-2 gap {gap:.3g})"
        )
        assert list(r.output_token_ids) == alone(name, task), f"prompt {name}, task {task}"
    # The adapters matter: each prompt gets three different continuations.
    for name in "AB":
        outs = {
            tuple(r.output_token_ids)
            for (n, _), r in zip(SEED_BATCH, got, strict=True)
            if n == name
        }
        assert len(outs) == 3, f"prompt {name}: base and adapters gave {outs}"


def test_first_request_carries_weights_later_ones_only_the_id(gqa_llama_dir, tensors, alone):
    with lorart.Executor(gqa_llama_dir, config()) as exe:
        weights, cfg = tensors[1]
        assert not exe.contains_lora_task(77)
        first = exe.enqueue_request(
            lorart.InferenceRequest(
                PROMPTS["A"],
                max_new_tokens=NEW,
                sampling_config=greedy(),
                lora_task_id=77,
                lora_weights=weights,
                lora_config=cfg,
            )
        )
        r = final(exe, first)
        assert r.finish_reason == "length", r.error
        assert list(r.output_token_ids) == alone("A", 1)
        assert exe.contains_lora_task(77)
        assert exe.lora_task_on_device(77)
        later = [
            exe.enqueue_request(
                lorart.InferenceRequest(
                    PROMPTS[name], max_new_tokens=NEW, sampling_config=greedy(), lora_task_id=77
                )
            )
            for name in "AB"
        ]
        outs = [final(exe, rid) for rid in later]
        assert [list(o.output_token_ids) for o in outs] == [alone("A", 1), alone("B", 1)]
        stats = exe.stats()["lora_cache"]
        assert stats["misses"] == 1 and stats["hits"] >= 1, stats

        missing = final(
            exe,
            exe.enqueue_request(lorart.InferenceRequest(PROMPTS["A"], lora_task_id=12345)),
        )
        assert missing.is_final
        assert missing.finish_reason == "error"
        assert missing.error == (
            "LoRA task 12345 not found in cache; send lora_weights and lora_config with the request"
        )
        assert list(missing.output_token_ids) == []


# -------------------------------------------------------------------- LoRA cache under pressure


@pytest.fixture(scope="module")
def small_cache_exe(gqa_llama_dir, tensors):
    """A device level that holds exactly two adapters."""
    budget = 2 * adapter_bytes(tensors, lorart.hf.load_config(gqa_llama_dir))
    executor = lorart.Executor(
        gqa_llama_dir,
        config(lora_cache=lorart.LoraCacheConfig(device_cache_bytes=budget)),
    )
    yield executor, budget
    executor.shutdown()


def test_two_adapter_device_cache_serves_six_adapters(small_cache_exe, tensors, alone):
    exe, budget = small_cache_exe
    small = Client(exe, tensors)
    names = list(PROMPTS)
    # In turn: one adapter at a time, each evicting an older one.
    for task in range(NUM_ADAPTERS):
        assert small.tokens(PROMPTS["A"], task) == alone("A", task), f"task {task}"
    stats = exe.stats()["lora_cache"]
    assert stats["device_evictions"] >= NUM_ADAPTERS - 2, stats
    assert stats["device_bytes"] <= budget, stats
    assert stats["device_tasks"] <= 2, stats
    # Interleaved: twelve requests over six adapters, all queued at once.
    jobs = [(names[(2 * i + t) % len(names)], t) for i in range(2) for t in range(NUM_ADAPTERS)]
    ids = [small.submit(PROMPTS[name], task) for name, task in jobs]
    for (name, task), rid in zip(jobs, ids, strict=True):
        r = final(exe, rid)
        assert r.finish_reason == "length", (name, task, r.error)
        assert list(r.output_token_ids) == alone(name, task), f"prompt {name}, task {task}"
    stats = exe.stats()["lora_cache"]
    assert stats["device_evictions"] > NUM_ADAPTERS, stats
    assert 0 < stats["device_bytes"] <= budget, stats
    assert stats["device_tasks"] <= 2, stats
    assert stats["host_tasks"] >= NUM_ADAPTERS, stats
    assert stats["misses"] > NUM_ADAPTERS, stats


def test_adapter_larger_than_device_level_is_an_error(gqa_llama_dir, tensors, alone):
    need = adapter_bytes(tensors, lorart.hf.load_config(gqa_llama_dir))
    exe = lorart.Executor(
        gqa_llama_dir, config(lora_cache=lorart.LoraCacheConfig(device_cache_bytes=need - 1))
    )
    try:
        client = Client(exe, tensors)
        r = final(exe, client.submit(PROMPTS["A"], 0))
        assert r.finish_reason == "error"
        assert f"needs {need} bytes on the device level" in r.error, r.error
        assert f"device_cache_bytes = {need - 1}" in r.error, r.error
        assert not exe.contains_lora_task(0)
        # The executor goes on serving.
        assert client.tokens(PROMPTS["B"]) == alone("B", None)
    finally:
        exe.shutdown()


# ------------------------------------------------------------------------------------ threads


def test_concurrent_enqueues_from_threads(client, tensors, alone):
    names = list(PROMPTS)
    jobs = [(names[i], [None, 0, 1][i % 3]) for i in range(8)]
    expected = [alone(name, task) for name, task in jobs]
    barrier = threading.Barrier(len(jobs))
    results: list = [None] * len(jobs)
    errors: list = []

    def worker(i: int) -> None:
        try:
            name, task = jobs[i]
            kw = {}
            if task is not None:  # every thread sends the adapter: concurrent put()s
                kw = dict(
                    lora_task_id=task, lora_weights=tensors[task][0], lora_config=tensors[task][1]
                )
            req = lorart.InferenceRequest(
                PROMPTS[name], max_new_tokens=NEW, sampling_config=greedy(), **kw
            )
            barrier.wait(timeout=TIMEOUT)
            rid = client.exe.enqueue_request(req)
            results[i] = collect(client.exe, rid)
        except Exception as e:  # reported below
            errors.append((i, repr(e)))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=2 * TIMEOUT)
        assert not t.is_alive()
    assert not errors, errors
    ids = {responses[-1].request_id for responses in results}
    assert len(ids) == len(jobs), "request ids must be unique"
    for (name, task), want, responses in zip(jobs, expected, results, strict=True):
        assert len(responses) == 1
        assert responses[-1].finish_reason == "length", responses[-1].error
        assert list(responses[-1].output_token_ids) == want, f"prompt {name}, task {task}"


# ------------------------------------------------------------------------------- cancellation


def test_cancel_long_request_others_unaffected(client, alone):
    exe = client.exe
    others: list[int] = []

    def submit() -> int:
        rid = client.submit(PROMPTS["C"], 0, max_new_tokens=110, streaming=True)
        others.extend([client.submit(PROMPTS["A"], 1), client.submit(PROMPTS["B"])])
        return rid

    long_id, responses, _ = cancel_midway(exe, submit)
    last = responses[-1]
    assert last.finish_reason == "cancelled"
    assert last.error is None
    streamed = [t for r in responses for t in r.output_token_ids]
    assert 1 <= len(streamed) < 110
    # What was generated before the cancel is the greedy output's prefix.
    assert streamed == client.tokens(PROMPTS["C"], 0, max_new_tokens=len(streamed))
    for a, b in zip(others[::2], others[1::2], strict=True):
        assert list(final(exe, a).output_token_ids) == alone("A", 1)
        assert list(final(exe, b).output_token_ids) == alone("B")
    # Cancelling a request that has finished (or never existed) changes nothing.
    exe.cancel_request(long_id)
    exe.cancel_request(10**9)
    assert client.tokens(PROMPTS["F"], 0) == alone("F", 0)


def test_cancel_right_after_enqueue(client, alone):
    exe = client.exe
    rid = client.submit(PROMPTS["D"], 1, max_new_tokens=110)
    exe.cancel_request(rid)
    r = final(exe, rid)
    assert r.finish_reason == "cancelled"
    assert len(r.output_token_ids) < 110
    assert client.tokens(PROMPTS["D"], 1) == alone("D", 1)


def test_stats_are_consistent_when_idle(gqa_llama_dir, tensors):
    with lorart.Executor(gqa_llama_dir, config()) as exe:
        c = Client(exe, tensors)
        done = c.run(PROMPTS["A"], 0)
        assert done.finish_reason == "length"
        _, _, attempts = cancel_midway(
            exe, lambda: c.submit(PROMPTS["B"], 1, max_new_tokens=100, streaming=True)
        )
        bad = c.run([], None)
        assert bad.finish_reason == "error"
        stats = exe.stats()  # booked before the final responses were visible
        assert stats["completed"] == 2 + attempts, stats
        assert stats["running"] == 0, stats
        assert stats["queued"] == 0, stats
        assert stats["free_kv_blocks"] == stats["total_kv_blocks"], stats
        assert stats["generated_tokens"] >= NEW + 1, stats
        assert stats["steps"] > 0 and stats["busy_seconds"] > 0, stats


# ---------------------------------------------------------------------------------- streaming


def test_streaming_one_token_per_step(client, alone):
    rid = client.submit(PROMPTS["B"], 0, streaming=True, return_generation_logits=True)
    responses = collect(client.exe, rid)
    assert responses[-1].is_final
    assert responses[-1].finish_reason == "length"
    for r in responses[:-1]:
        assert r.finish_reason is None
        assert r.error is None
        assert len(r.output_token_ids) == 1, list(r.output_token_ids)
    assert len(responses[-1].output_token_ids) <= 1
    streamed = [t for r in responses for t in r.output_token_ids]
    assert streamed == alone("B", 0)
    assert len(responses) >= NEW
    # Generation logits travel with their tokens.
    for r in responses:
        n = len(r.output_token_ids)
        if n:
            assert r.generation_logits.shape == (n, VOCAB)
            assert list(np.argmax(r.generation_logits, axis=1)) == list(r.output_token_ids)


def test_streaming_with_end_id_and_context_logits(client, alone):
    full = alone("A", 1, 12)
    k = first_new_index(full)
    rid = client.submit(
        PROMPTS["A"],
        1,
        max_new_tokens=12,
        end_id=full[k],
        streaming=True,
        return_context_logits=True,
    )
    responses = collect(client.exe, rid)
    assert responses[-1].finish_reason == "end_id"
    assert [t for r in responses for t in r.output_token_ids] == full[:k]
    assert all(len(r.output_token_ids) == 1 for r in responses[:-1])
    # The prompt's logits arrive exactly once, whole.
    ctx = [r.context_logits for r in responses if r.context_logits is not None]
    assert len(ctx) == 1
    assert ctx[0].shape == (len(PROMPTS["A"]), VOCAB)


# ---------------------------------------------------------------------------------- bad input


def _sampling(**fields) -> lorart.SamplingConfig:
    """A SamplingConfig with fields set after construction (the constructor validates)."""
    s = lorart.SamplingConfig()
    for name, value in fields.items():
        setattr(s, name, value)
    return s


def _bad_layer(t):
    hidden = 64
    return dict(
        lora_task_id=41,
        lora_weights=lorart.LoraWeights(np.ones((1, 4 * hidden * 2), np.float32)),
        lora_config=lorart.LoraConfig(np.array([[1, 3, 4]], dtype=np.int32)),
    )


def _bad_rank(t):
    hidden = 64
    return dict(
        lora_task_id=42,
        lora_weights=lorart.LoraWeights(np.ones((1, 17 * hidden * 2), np.float32)),
        lora_config=lorart.LoraConfig(np.array([[1, 0, 17]], dtype=np.int32)),
    )


def _bad_module(t):
    return dict(
        lora_task_id=43,
        lora_weights=lorart.LoraWeights(np.ones((1, 512), np.float32)),
        lora_config=lorart.LoraConfig(np.array([[99, 0, 2]], dtype=np.int32)),
    )


def _nan_weights(t):
    values = t[0][0].numpy().copy()
    values[3, 5] = np.nan
    return dict(lora_task_id=44, lora_weights=lorart.LoraWeights(values), lora_config=t[0][1])


def _row_mismatch(t):
    values = t[0][0].numpy()[:5].copy()
    return dict(lora_task_id=45, lora_weights=lorart.LoraWeights(values), lora_config=t[0][1])


BAD_INPUTS = {
    "empty_prompt": (lambda t: dict(input_token_ids=[]), "input_token_ids"),
    "token_over_vocab": (lambda t: dict(input_token_ids=[1, VOCAB, 2]), "input_token_ids[1]"),
    "negative_token": (lambda t: dict(input_token_ids=[-1, 2]), "input_token_ids[0]"),
    "over_max_seq_len": (
        lambda t: dict(input_token_ids=list(range(30)), max_new_tokens=99),
        "max_seq_len",
    ),
    "max_new_tokens_0": (lambda t: dict(max_new_tokens=0), "max_new_tokens"),
    "max_new_tokens_negative": (lambda t: dict(max_new_tokens=-3), "max_new_tokens"),
    "temperature_negative": (
        lambda t: dict(sampling_config=_sampling(temperature=-1.0)),
        "temperature",
    ),
    "temperature_nan": (
        lambda t: dict(sampling_config=_sampling(temperature=float("nan"))),
        "temperature",
    ),
    "top_p_zero": (lambda t: dict(sampling_config=_sampling(top_p=0.0)), "top_p"),
    "top_p_over_one": (lambda t: dict(sampling_config=_sampling(top_p=1.5)), "top_p"),
    "top_k_negative": (lambda t: dict(sampling_config=_sampling(top_k=-2)), "top_k"),
    "end_id_over_vocab": (lambda t: dict(end_id=VOCAB), "end_id"),
    "empty_stop_sequence": (lambda t: dict(stop_token_ids=[[3], []]), "stop_token_ids"),
    "weights_without_task_id": (
        lambda t: dict(lora_weights=t[0][0], lora_config=t[0][1]),
        "lora_task_id",
    ),
    "lora_config_missing": (
        lambda t: dict(lora_task_id=46, lora_weights=t[0][0]),
        "lora_config",
    ),
    "lora_weights_missing": (
        lambda t: dict(lora_task_id=47, lora_config=t[0][1]),
        "lora_weights",
    ),
    "layer_out_of_range": (_bad_layer, "layer_idx 3"),
    "rank_over_max_lora_rank": (_bad_rank, "max_lora_rank = 16"),
    "unknown_module": (_bad_module, "module_id 99"),
    "nan_in_weights": (_nan_weights, "finite"),
    "rows_mismatch": (_row_mismatch, "rows"),
    "unknown_task": (lambda t: dict(lora_task_id=4242), "LoRA task 4242 not found in cache"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_an_error_response(case, client, tensors, alone):
    build, needle = BAD_INPUTS[case]
    kw = dict(input_token_ids=PROMPTS["A"], max_new_tokens=NEW, sampling_config=greedy())
    kw.update(build(tensors))
    ids = kw.pop("input_token_ids")
    rid = client.exe.enqueue_request(lorart.InferenceRequest(ids, **kw))
    responses = collect(client.exe, rid)
    assert len(responses) == 1
    r = responses[0]
    assert r.is_final
    assert r.finish_reason == "error", (case, r.finish_reason)
    assert r.error and needle in r.error, f"{case}: {r.error!r} does not name {needle!r}"
    assert list(r.output_token_ids) == []
    task = kw.get("lora_task_id")
    if task is not None and task >= 40:
        assert not client.exe.contains_lora_task(task), f"{case}: an invalid adapter was cached"
    # The next normal request still succeeds.
    assert client.tokens(PROMPTS["F"], 1) == alone("F", 1)


def test_invalid_adapter_is_not_usable_later(client):
    bad = final(
        client.exe,
        client.exe.enqueue_request(lorart.InferenceRequest([1, 2, 3], **_bad_layer(None))),
    )
    assert bad.finish_reason == "error"
    later = final(
        client.exe, client.exe.enqueue_request(lorart.InferenceRequest([1, 2, 3], lora_task_id=41))
    )
    assert later.finish_reason == "error"
    assert "LoRA task 41 not found in cache" in later.error


def test_sampling_config_validates_at_construction():
    with pytest.raises(ValueError, match="top_p"):
        lorart.SamplingConfig(top_p=0)
    with pytest.raises(ValueError, match="top_p"):
        lorart.SamplingConfig(top_p=1.01)
    with pytest.raises(ValueError, match="temperature"):
        lorart.SamplingConfig(temperature=-1)
    with pytest.raises(ValueError, match="top_k"):
        lorart.SamplingConfig(top_k=-1)
    ok = lorart.SamplingConfig(top_k=5, top_p=0.5, temperature=0.0, seed=3)
    assert (ok.top_k, ok.top_p, ok.temperature, ok.seed) == (5, 0.5, 0.0, 3)


def test_await_unknown_request_raises(client):
    with pytest.raises(ValueError, match="unknown request id"):
        client.exe.await_responses(10**9, timeout=0.1)
    rid = client.submit(PROMPTS["H"])
    final(client.exe, rid)
    with pytest.raises(ValueError, match="unknown request id"):
        client.exe.await_responses(rid, timeout=0.1)


# ------------------------------------------------------------------------- stop conditions


def first_new_index(tokens: list[int]) -> int:
    """An index k >= 2 whose token does not occur before it."""
    for k in range(2, len(tokens)):
        if tokens[k] not in tokens[:k]:
            return k
    raise AssertionError(f"no fresh token in {tokens}")


def simulate(full, end_id=None, stops=()) -> tuple[list[int], str]:
    """What the request should return, given the unconstrained greedy output `full`."""
    out: list[int] = []
    for tok in full:
        if tok == end_id:
            return out, "end_id"
        out.append(tok)
        if any(len(out) >= len(s) and out[-len(s) :] == list(s) for s in stops):
            return out, "stop"
    return out, "length"


def test_end_id_stop_tokens_and_length(client, alone):
    full = alone("E", 0, 12)
    k = first_new_index(full)
    cases = [
        dict(end_id=full[k]),
        dict(end_id=full[0]),  # the very first token: empty output
        dict(stop_token_ids=[[full[k]]]),
        dict(stop_token_ids=[[full[k - 1], full[k]]]),
        dict(stop_token_ids=[[(full[k - 1] + 1) % VOCAB, full[k]], [full[k + 1]]]),
        dict(stop_token_ids=[[VOCAB - 1, VOCAB - 1, VOCAB - 1]]),
        dict(end_id=full[k + 1], stop_token_ids=[[full[k]]]),
    ]
    for kw in cases:
        want, reason = simulate(full, kw.get("end_id"), kw.get("stop_token_ids", ()))
        r = client.run(PROMPTS["E"], 0, max_new_tokens=12, **kw)
        assert (list(r.output_token_ids), r.finish_reason) == (want, reason), kw
    assert simulate(full, full[k])[1] == "end_id"
    assert full[k] not in simulate(full, full[k])[0]
    for n in (1, 3):
        r = client.run(PROMPTS["E"], 0, max_new_tokens=n)
        assert r.finish_reason == "length"
        assert list(r.output_token_ids) == full[:n]


# --------------------------------------------------------------------------- seeded sampling


def test_seeded_sampling_is_reproducible_and_batch_independent(client):
    def sampled(seed):
        return lorart.SamplingConfig(temperature=1.0, seed=seed)

    n = 24
    first = client.tokens(PROMPTS["A"], 0, max_new_tokens=n, sampling=sampled(123))
    again = client.tokens(PROMPTS["A"], 0, max_new_tokens=n, sampling=sampled(123))
    assert first == again
    # Inside a batch of other requests (greedy, other seeds, other adapters, longer prompts).
    ids = [
        client.submit(PROMPTS["B"], 1, max_new_tokens=n, sampling=sampled(5)),
        client.submit(PROMPTS["A"], 0, max_new_tokens=n, sampling=sampled(123)),
        client.submit(PROMPTS["E"], None, max_new_tokens=n),
        client.submit(PROMPTS["A"], 0, max_new_tokens=n, sampling=sampled(124)),
        client.submit(PROMPTS["A"], None, max_new_tokens=n, sampling=sampled(123)),
    ]
    outs = [list(final(client.exe, rid).output_token_ids) for rid in ids]
    assert outs[1] == first
    assert outs[3] != first, "a different seed must give different tokens"
    assert outs[4] != first, "the adapter must change the sampled tokens"
    greedy_out = client.tokens(PROMPTS["A"], 0, max_new_tokens=n)
    assert first != greedy_out, "temperature 1 sampling should not reproduce greedy decoding"
    # top_k=1 with a seed is still greedy.
    assert (
        client.tokens(
            PROMPTS["A"], 0, max_new_tokens=n, sampling=lorart.SamplingConfig(top_k=1, seed=9)
        )
        == greedy_out
    )


# -------------------------------------------------------------------------------- preemption


PREEMPT_JOBS = [("C", None), ("F", 0), ("H", 1), ("C", 0), ("F", None)]
PREEMPT_NEW = 20


def _preempt_run(gqa_llama_dir, tensors, kv_tokens: int):
    cfg = config(
        max_batch_size=8,
        max_seq_len=32,
        kv_cache=lorart.KvCacheConfig(block_size=4, max_tokens=kv_tokens),
    )
    with lorart.Executor(gqa_llama_dir, cfg) as exe:
        c = Client(exe, tensors)
        ids = []
        for i, (name, task) in enumerate(PREEMPT_JOBS):
            kw = dict(max_new_tokens=PREEMPT_NEW)
            if i == 1:
                kw.update(return_context_logits=True, return_generation_logits=True)
                kw.update(return_log_probs=True)
            if i == 2:
                kw.update(streaming=True)
            if i == 3:
                kw.update(sampling=lorart.SamplingConfig(temperature=1.0, seed=77))
            ids.append(c.submit(PROMPTS[name], task, **kw))
        outs = [collect(exe, rid) for rid in ids]
        return outs, exe.stats()


def test_preemption_keeps_outputs_exact(gqa_llama_dir, tensors):
    # 32 tokens of KV (8 blocks of 4) for five sequences growing to 23..28 tokens each.
    tight, tight_stats = _preempt_run(gqa_llama_dir, tensors, kv_tokens=32)
    roomy, roomy_stats = _preempt_run(gqa_llama_dir, tensors, kv_tokens=1024)
    assert tight_stats["preemptions"] > 0, tight_stats
    assert roomy_stats["preemptions"] == 0, roomy_stats
    assert tight_stats["free_kv_blocks"] == tight_stats["total_kv_blocks"] == 8
    for i, (a, b) in enumerate(zip(tight, roomy, strict=True)):
        ta = [t for r in a for t in r.output_token_ids]
        tb = [t for r in b for t in r.output_token_ids]
        assert a[-1].finish_reason == b[-1].finish_reason == "length", (i, a[-1].error)
        assert len(ta) == PREEMPT_NEW
        assert ta == tb, f"request {i} ({PREEMPT_JOBS[i]}): preempted {ta} != roomy {tb}"
    a, b = tight[1][-1], roomy[1][-1]
    prompt_len = len(PROMPTS[PREEMPT_JOBS[1][0]])
    assert a.context_logits.shape == (prompt_len, VOCAB)
    assert a.generation_logits.shape == (PREEMPT_NEW, VOCAB)
    assert a.log_probs.shape == (PREEMPT_NEW,)
    np.testing.assert_allclose(a.context_logits, b.context_logits, atol=1e-5, rtol=0)
    np.testing.assert_allclose(a.generation_logits, b.generation_logits, atol=1e-5, rtol=0)
    np.testing.assert_allclose(a.log_probs, b.log_probs, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------ logits


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def test_logits_and_log_probs(client, adapters, lorart_model, adapter_slot, gqa_llama_dir):
    ids = PROMPTS["B"]
    r = client.run(
        ids,
        0,
        return_context_logits=True,
        return_generation_logits=True,
        return_log_probs=True,
    )
    assert r.finish_reason == "length"
    out = list(r.output_token_ids)
    ctx, gen, lp = r.context_logits, r.generation_logits, r.log_probs
    assert ctx.shape == (len(ids), VOCAB) and ctx.dtype == np.float32
    assert gen.shape == (NEW, VOCAB) and gen.dtype == np.float32
    assert lp.shape == (NEW,)
    # Context logits equal the model's own forward with the same adapter ...
    model = lorart_model(gqa_llama_dir)
    slot = adapter_slot(model, adapters[0].dir)
    [ref] = model.forward(
        [SequenceChunk(ids, 0, list(range(-(-len(ids) // 16))), slot, all_logits=True)]
    )
    np.testing.assert_allclose(ctx, ref, atol=1e-5, rtol=0)
    # ... and transformers + peft.
    hf_ctx = hf_logits(adapters[0].model, ids)
    assert np.abs(ctx - hf_ctx).max() <= 1e-4
    # Generation row i is the logits after prompt + out[:i]; the token is its argmax.
    np.testing.assert_allclose(gen[0], ctx[-1], atol=1e-5, rtol=0)
    assert list(np.argmax(gen, axis=1)) == out
    hf_gen = hf_logits(adapters[0].model, ids + out[:-1])[len(ids) - 1 :]
    assert np.abs(gen - hf_gen).max() <= 1e-4
    np.testing.assert_allclose(lp, log_softmax(gen)[np.arange(NEW), out], atol=1e-5)
    assert np.all(lp <= 0)
    # Not asked for: absent.
    plain = client.run(ids, 0)
    assert plain.context_logits is None
    assert plain.generation_logits is None
    assert plain.log_probs is None


def test_sampled_log_probs_are_under_the_unmodified_distribution(client):
    r = client.run(
        PROMPTS["D"],
        1,
        max_new_tokens=10,
        sampling=lorart.SamplingConfig(temperature=0.7, top_k=20, seed=5),
        return_generation_logits=True,
        return_log_probs=True,
    )
    out = list(r.output_token_ids)
    np.testing.assert_allclose(
        r.log_probs, log_softmax(r.generation_logits)[np.arange(len(out)), out], atol=1e-5
    )


@pytest.fixture(scope="module")
def chunk_exe(gqa_llama_dir, tensors):
    """A token budget of 8: long prompts are prefilled in chunks over several steps."""
    executor = lorart.Executor(gqa_llama_dir, config(max_num_tokens=8))
    yield Client(executor, tensors)
    executor.shutdown()


def test_chunked_prefill_matches(chunk_exe, client, alone):
    ids = PROMPTS["B"]  # 19 tokens: chunks of 8, 8, 3
    got = chunk_exe.run(ids, 0, return_context_logits=True)
    ref = client.run(ids, 0, return_context_logits=True)
    assert got.finish_reason == "length", got.error
    assert list(got.output_token_ids) == alone("B", 0)
    np.testing.assert_allclose(got.context_logits, ref.context_logits, atol=1e-5, rtol=0)
    # Several long prompts at once, with adapters.
    jobs = [("E", 1), ("G", None), ("B", 0), ("D", 1)]
    ids_ = [chunk_exe.submit(PROMPTS[n], t) for n, t in jobs]
    for (n, t), rid in zip(jobs, ids_, strict=True):
        assert list(final(chunk_exe.exe, rid).output_token_ids) == alone(n, t), (n, t)


@pytest.mark.parametrize("length", [8, 16])
def test_context_logits_when_the_prompt_fills_the_token_budget(chunk_exe, client, length):
    """A prompt whose last chunk uses the whole budget (8 tokens) and also samples."""
    ids = make_prompt(length, 40 + length)
    got = chunk_exe.run(ids, 0, return_context_logits=True)
    assert got.finish_reason == "length", got.error
    ref = client.run(ids, 0, return_context_logits=True)
    assert list(got.output_token_ids) == list(ref.output_token_ids)
    assert got.context_logits.shape == (length, VOCAB)
    np.testing.assert_allclose(got.context_logits, ref.context_logits, atol=1e-5, rtol=0)


def test_context_logits_request_does_not_fail_its_step_neighbours(chunk_exe, alone):
    """A decoding request and a 7-token prompt with context logits share one 8-token step."""
    exe = chunk_exe.exe
    for _ in range(20):  # until the caller awaits before the busy request is done (loaded CI)
        busy = chunk_exe.submit(PROMPTS["C"], 1, max_new_tokens=60, streaming=True)
        first = exe.await_responses(busy, timeout=TIMEOUT)
        if not first[-1].is_final:
            break
    assert first and not first[-1].is_final
    ids = make_prompt(7, 70)
    ctx = chunk_exe.run(ids, 0, return_context_logits=True)
    rest = collect(exe, busy)
    assert rest[-1].finish_reason == "length", rest[-1].error
    assert ctx.finish_reason == "length", ctx.error
    assert ctx.context_logits.shape == (7, VOCAB)
    streamed = [t for r in first + rest for t in r.output_token_ids]
    assert streamed[:NEW] == alone("C", 1)


# ----------------------------------------------------------------------------------- shutdown


def test_shutdown_cancels_pending_requests(gqa_llama_dir, tensors, alone):
    for _ in range(20):  # again when the streaming request ran to its end before the shutdown
        exe = lorart.Executor(gqa_llama_dir, config(max_batch_size=2))
        c = Client(exe, tensors)
        short = c.submit(PROMPTS["A"], 0)
        streaming = c.submit(PROMPTS["C"], 1, max_new_tokens=110, streaming=True)
        longs = [c.submit(PROMPTS[n], None, max_new_tokens=100) for n in "DEF"]  # queued
        first = exe.await_responses(streaming, timeout=TIMEOUT)
        deadline = time.monotonic() + TIMEOUT
        while exe.stats()["completed"] < 1 and time.monotonic() < deadline:
            time.sleep(0.005)
        exe.shutdown()
        exe.shutdown()  # idempotent
        rest = collect(exe, streaming) if not first[-1].is_final else first
        if rest[-1].finish_reason == "cancelled":
            break
    # The finished request's response waits for its caller.
    done = final(exe, short)
    assert done.finish_reason == "length"
    assert list(done.output_token_ids) == alone("A", 0)
    assert rest[-1].finish_reason == "cancelled"
    assert len([t for r in first + rest for t in r.output_token_ids]) < 110
    for rid in longs:
        r = final(exe, rid)
        assert r.finish_reason == "cancelled", (rid, r.finish_reason, r.error)
        assert len(r.output_token_ids) < 100
    # After shutdown: a new request is cancelled at once; collected ids are gone.
    late = c.submit(PROMPTS["B"])
    r = final(exe, late)
    assert r.finish_reason == "cancelled"
    assert list(r.output_token_ids) == []
    with pytest.raises(ValueError, match="unknown request id"):
        exe.await_responses(short, timeout=0.1)
    assert exe.stats()["completed"] == 1 + 1 + len(longs) + 1

"""The executor's LoRA cache seen from requests: idle adapters leave a full host level, weights
re-sent under a task id replace the cached adapter (or are refused while requests use it), and a
request whose adapter drives the logits to NaN/Inf fails alone."""

from __future__ import annotations

import numpy as np
import pytest
from executor_helpers import collect, final, random_adapter

import lorart

PROMPT = [5, 17, 33, 2, 91, 64, 7]
OTHER = [44, 3, 150, 12, 9]


def cfg(**overrides) -> lorart.ExecutorConfig:
    kw = dict(max_batch_size=8, max_num_tokens=64, max_seq_len=128, max_lora_rank=16)
    kw.update(overrides)
    return lorart.ExecutorConfig(**kw)


def request(ids, task=None, adapter=None, max_new_tokens=8, **kw) -> lorart.InferenceRequest:
    if adapter is not None:
        kw["lora_weights"], kw["lora_config"] = adapter
    return lorart.InferenceRequest(
        list(ids),
        max_new_tokens=max_new_tokens,
        sampling_config=lorart.SamplingConfig(top_k=1),
        lora_task_id=task,
        **kw,
    )


def tokens(exe, req) -> list[int]:
    r = final(exe, exe.enqueue_request(req))
    assert r.finish_reason == "length", (r.finish_reason, r.error)
    return list(r.output_token_ids)


@pytest.fixture(scope="module")
def mc(gqa_llama_dir):
    return lorart.hf.load_config(str(gqa_llama_dir))


@pytest.fixture(scope="module")
def pair(mc):
    """Two different adapters of one size."""
    return random_adapter(mc, seed=1), random_adapter(mc, seed=2)


@pytest.fixture(scope="module")
def reference(gqa_llama_dir, pair):
    """Greedy outputs of PROMPT with each adapter (and without), each under a fresh task id."""
    with lorart.Executor(gqa_llama_dir, cfg()) as exe:
        out = {None: tokens(exe, request(PROMPT))}
        for i, adapter in enumerate(pair):
            out[i] = tokens(exe, request(PROMPT, 100 + i, adapter))
    assert len({tuple(v) for v in out.values()}) == 3, out
    return out


def test_host_level_of_one_adapter_serves_task_after_task(gqa_llama_dir, pair, reference):
    """Host level sized for one adapter: after task 1 finishes (and stays on the device level),
    task 2 evicts it; task 1 comes back the same way."""
    one = pair[0][0].nbytes
    config = cfg(lora_cache=lorart.LoraCacheConfig(host_cache_bytes=one))
    with lorart.Executor(gqa_llama_dir, config) as exe:
        assert tokens(exe, request(PROMPT, 1, pair[0])) == reference[0]
        assert exe.lora_task_on_device(1)
        assert tokens(exe, request(PROMPT, 2, pair[1])) == reference[1]
        assert not exe.contains_lora_task(1)
        assert not exe.lora_task_on_device(1)  # the host level is the cache of record
        assert exe.contains_lora_task(2) and exe.lora_task_on_device(2)
        stats = exe.stats()["lora_cache"]
        assert stats["host_evictions"] == 1 and stats["device_evictions"] == 1, stats
        assert stats["host_tasks"] == 1 and stats["device_tasks"] == 1, stats
        assert stats["host_bytes"] == one, stats
        device_one = lorart._core.LoraAdapter(*pair[1], exe.model_config, 16).nbytes
        assert stats["device_bytes"] == device_one, stats
        # The evicted task is gone: an id-only request names it in vain ...
        missing = final(exe, exe.enqueue_request(request(PROMPT, 1)))
        assert missing.finish_reason == "error"
        assert "LoRA task 1 not found in cache" in missing.error
        # ... and re-sending its weights brings it back, evicting task 2.
        assert tokens(exe, request(PROMPT, 1, pair[0])) == reference[0]
        stats = exe.stats()["lora_cache"]
        assert stats["host_evictions"] == 2 and stats["host_tasks"] == 1, stats
        assert stats["referenced_tasks"] == 0 and stats["pinned_tasks"] == 0, stats


def queue_behind(exe, req, ahead: int = 200) -> tuple[list[int], int]:
    """Enqueue `ahead` long base-model requests, then `req`: on an executor of batch size 1 it
    stays queued (its LoRA task referenced) for as long as they run, ~100 steps each."""
    ids = [exe.enqueue_request(request(OTHER, max_new_tokens=100)) for _ in range(ahead)]
    return ids, exe.enqueue_request(req)


def cancel_all(exe, ids) -> None:
    for rid in ids:
        exe.cancel_request(rid)
    for rid in ids:
        final(exe, rid)


def test_host_level_still_refuses_when_every_adapter_is_in_use(gqa_llama_dir, pair):
    one = pair[0][0].nbytes
    config = cfg(max_batch_size=1, lora_cache=lorart.LoraCacheConfig(host_cache_bytes=one))
    with lorart.Executor(gqa_llama_dir, config) as exe:
        ahead, queued = queue_behind(exe, request(PROMPT, 1, pair[0]))
        refused = final(exe, exe.enqueue_request(request(PROMPT, 2, pair[1])))
        assert refused.finish_reason == "error"
        assert "full of adapters that queued or running requests use" in refused.error
        assert exe.stats()["lora_cache"]["referenced_tasks"] == 1
        cancel_all(exe, [*ahead, queued])
        assert final(exe, exe.enqueue_request(request(PROMPT, 2, pair[1]))).error is None


def test_resent_weights_replace_an_idle_task_on_both_levels(gqa_llama_dir, pair, reference):
    with lorart.Executor(gqa_llama_dir, cfg()) as exe:
        assert tokens(exe, request(PROMPT, 7, pair[0])) == reference[0]
        assert exe.lora_task_on_device(7)
        # New weights under the same id, nothing in flight: they replace the old adapter.
        assert tokens(exe, request(PROMPT, 7, pair[1])) == reference[1]
        assert tokens(exe, request(PROMPT, 7)) == reference[1]  # id only: the new adapter
        stats = exe.stats()["lora_cache"]
        assert stats["replacements"] == 1, stats
        assert stats["host_tasks"] == 1 and stats["device_tasks"] == 1, stats
        assert stats["host_bytes"] == pair[1][0].nbytes, stats
        # Identical weights are the same adapter: nothing is replaced or reloaded.
        misses = stats["misses"]
        assert tokens(exe, request(PROMPT, 7, pair[1])) == reference[1]
        stats = exe.stats()["lora_cache"]
        assert stats["replacements"] == 1 and stats["misses"] == misses, stats


def test_resent_weights_while_the_task_is_in_use(gqa_llama_dir, pair, reference):
    with lorart.Executor(gqa_llama_dir, cfg(max_batch_size=1)) as exe:
        ahead, queued = queue_behind(exe, request(PROMPT, 7, pair[0]))
        # The same weights (a copy): accepted as the same adapter.
        same = (lorart.LoraWeights(pair[0][0].numpy().copy()), pair[0][1])
        again = exe.enqueue_request(request(PROMPT, 7, same))
        # Different weights, or the same values in another dtype: refused on that request.
        for other in (pair[1], (pair[0][0].to("bfloat16"), pair[0][1])):
            r = final(exe, exe.enqueue_request(request(PROMPT, 7, other)))
            assert r.finish_reason == "error"
            assert r.error.startswith("LoRA task 7 is in use by 2 queued or running request")
            assert "different weights" in r.error, r.error
        cancel_all(exe, ahead)
        assert list(final(exe, queued).output_token_ids) == reference[0]
        assert list(final(exe, again).output_token_ids) == reference[0]
        # Once idle, the new weights replace the old ones.
        assert tokens(exe, request(PROMPT, 7, pair[1])) == reference[1]


def test_non_finite_logits_fail_only_their_request(gqa_llama_dir, mc, pair, reference):
    """3e38 passes validation (finite) but overflows float32 in the forward."""
    huge = random_adapter(mc, seed=3, value=3e38)
    assert np.isfinite(huge[0].numpy()).all()
    with lorart.Executor(gqa_llama_dir, cfg()) as exe:
        for streaming in (False, True):
            ids = [
                exe.enqueue_request(request(PROMPT)),
                exe.enqueue_request(request(PROMPT, 1, pair[0])),
                exe.enqueue_request(request(PROMPT, 9, huge, streaming=streaming)),
                exe.enqueue_request(request(PROMPT, 2, pair[1])),
            ]
            outs = [collect(exe, rid) for rid in ids]
            blown = outs[2][-1]
            assert blown.finish_reason == "error"
            assert "not finite" in blown.error, blown.error
            assert "LoRA task 9" in blown.error, blown.error
            assert [t for r in outs[2] for t in r.output_token_ids] == []
            for i, key in ((0, None), (1, 0), (3, 1)):
                assert outs[i][-1].finish_reason == "length", outs[i][-1].error
                assert list(outs[i][-1].output_token_ids) == reference[key]
        stats = exe.stats()
        assert stats["free_kv_blocks"] == stats["total_kv_blocks"], stats
        assert tokens(exe, request(PROMPT, 1)) == reference[0]

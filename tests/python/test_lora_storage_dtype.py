"""Adapters in float16 / bfloat16 stay in that dtype on every level (half the bytes of float32)
and compute bitwise what the same values in float32 compute: the kernels widen as they read."""

from __future__ import annotations

import numpy as np
import pytest
from tiny_models import ALL_PROJECTIONS

import lorart
from lorart.model import SequenceChunk

DTYPES = ["float16", "bfloat16"]


def rounded_pair(weights, config, model_config, dtype: str):
    """(the adapter rounded to `dtype`, the same rounded values in float32)."""
    rows = lorart.lora.unpack(weights, config, model_config)
    low = lorart.lora.pack(rows, dtype)
    widened = lorart.lora.pack(lorart.lora.unpack(*low, model_config), "float32")
    return low, widened


@pytest.fixture(scope="module")
def gqa_config(gqa_llama_dir, lorart_model):
    return lorart_model(gqa_llama_dir).config


@pytest.fixture(scope="module")
def adapter(gqa_llama_dir, gqa_config, make_adapter):
    # The rank-8 adapter test_model_batching builds too (make_adapter caches it).
    a = make_adapter(
        gqa_llama_dir, seed=208, std=0.1, r=8, lora_alpha=16, target_modules=ALL_PROJECTIONS
    )
    return lorart.lora.from_peft(str(a.dir), gqa_config)


@pytest.mark.parametrize("dtype", DTYPES)
def test_model_logits_bitwise_equal_to_float32_copy(gqa_llama_dir, lorart_model, adapter, dtype):
    model = lorart_model(gqa_llama_dir)
    low, widened = rounded_pair(*adapter, model.config, dtype)
    low_adapter = lorart._core.LoraAdapter(*low, model.config, 64)
    wide_adapter = lorart._core.LoraAdapter(*widened, model.config, 64)
    assert low_adapter.dtype == dtype and wide_adapter.dtype == "float32"
    assert 2 * low_adapter.nbytes == wide_adapter.nbytes
    slots = {"low": model.add_adapter(*low), "wide": model.add_adapter(*widened)}
    rng = np.random.default_rng(5)
    prompt = [int(t) for t in rng.integers(0, model.config.vocab_size, 30)]
    history = [int(t) for t in rng.integers(0, model.config.vocab_size, 9)]

    def run(which: str) -> list[np.ndarray]:
        slot = slots[which]
        # Sequence 1's context first, then one step: a 30-token prefill (a long segment, weights
        # widened once per call) next to a decode token (widened in registers).
        model.forward([SequenceChunk(history, 0, [10, 11], slot, False)])
        return model.forward(
            [
                SequenceChunk(prompt, 0, [0, 1, 2], slot, True),
                SequenceChunk([3], len(history), [10, 11], slot, True),
            ]
        )

    got, want = run("low"), run("wide")
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("dtype", DTYPES)
def test_executor_keeps_dtype_and_matches_float32_copy(gqa_llama_dir, gqa_config, adapter, dtype):
    model_config = gqa_config
    low, widened = rounded_pair(*adapter, model_config, dtype)
    exe = lorart.Executor(gqa_llama_dir, lorart.ExecutorConfig(max_batch_size=4))
    try:
        outs = []
        for task, (weights, config) in ((1, low), (2, widened)):
            request = lorart.InferenceRequest(
                [1, 5, 9, 13],
                max_new_tokens=6,
                # Seeded sampling: equal tokens need equal logits all the way.
                sampling_config=lorart.SamplingConfig(temperature=1.0, seed=123),
                lora_task_id=task,
                lora_weights=weights,
                lora_config=config,
                return_generation_logits=True,
            )
            rid = exe.enqueue_request(request)
            final = exe.await_responses(rid, timeout=60)[-1]
            assert final.is_final and final.error is None, final.error
            outs.append((list(final.output_token_ids), np.asarray(final.generation_logits)))
        assert outs[0][0] == outs[1][0]
        np.testing.assert_array_equal(outs[0][1], outs[1][1])
        stats = exe.stats()["lora_cache"]
        assert stats["host_bytes"] == low[0].nbytes + widened[0].nbytes
        device = [lorart._core.LoraAdapter(*t, model_config, 64).nbytes for t in (low, widened)]
        assert stats["device_bytes"] == sum(device) and device[1] == 2 * device[0]
    finally:
        exe.shutdown()

"""The executor's API under concurrency and bad arguments: shutdown from several threads, config
limits, concurrent waiters, timeouts, stats that are booked before a response is visible, Ctrl-C
during a wait, thread counts, and reprs."""

from __future__ import annotations

import _thread
import gc
import math
import threading
import time

import pytest
from executor_helpers import TIMEOUT, collect, final

import lorart
from lorart import _core

PROMPT = [5, 17, 33, 2, 91, 64, 7]


def cfg(**overrides) -> lorart.ExecutorConfig:
    kw = dict(max_batch_size=8, max_num_tokens=64, max_seq_len=128, max_lora_rank=16)
    kw.update(overrides)
    return lorart.ExecutorConfig(**kw)


def request(ids=PROMPT, max_new_tokens=8, **kw) -> lorart.InferenceRequest:
    return lorart.InferenceRequest(
        list(ids),
        max_new_tokens=max_new_tokens,
        sampling_config=lorart.SamplingConfig(top_k=1),
        **kw,
    )


@pytest.fixture(scope="module")
def exe(gqa_llama_dir):
    executor = lorart.Executor(gqa_llama_dir, cfg())
    yield executor
    executor.shutdown()


def run_threads(targets, timeout: float = 20.0) -> None:
    threads = [threading.Thread(target=t, daemon=True) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    assert not any(t.is_alive() for t in threads), "a thread is still blocked"


# ----------------------------------------------------------------------------------- shutdown


def test_concurrent_shutdowns_all_return(gqa_llama_dir):
    for _ in range(8):
        exe = lorart.Executor(gqa_llama_dir, cfg(max_batch_size=1))
        ids = [exe.enqueue_request(request(max_new_tokens=100)) for _ in range(100)]
        assert exe.await_responses(ids[0], timeout=TIMEOUT)  # the loop is busy with the rest
        barrier = threading.Barrier(3)
        errors: list[str] = []

        def stop(exe=exe, barrier=barrier, errors=errors) -> None:
            barrier.wait(timeout=TIMEOUT)
            try:
                exe.shutdown()
            except Exception as e:  # reported below
                errors.append(repr(e))

        run_threads([stop] * 3)
        assert not errors, errors
        assert final(exe, ids[-1]).finish_reason == "cancelled"
        exe.shutdown()
        del exe  # the destructor after shutdown
        gc.collect()


# ------------------------------------------------------------------------------ config limits


def test_max_seq_len_defaults_to_the_models_positions(gqa_llama_dir):
    assert lorart.ExecutorConfig().max_seq_len == 0  # auto
    with lorart.Executor(gqa_llama_dir, lorart.ExecutorConfig(max_num_tokens=64)) as exe:
        assert exe.model_config.max_position_embeddings == 256
        assert exe.config.max_seq_len == 256
        r = final(exe, exe.enqueue_request(request(max_new_tokens=256 - len(PROMPT) + 1)))
        assert r.finish_reason == "error"
        assert "exceeds max_seq_len = 256" in r.error
        assert final(exe, exe.enqueue_request(request(max_new_tokens=2))).error is None
    # Auto never asks for more than the KV pool holds.
    small_kv = lorart.ExecutorConfig(kv_cache=lorart.KvCacheConfig(block_size=16, max_tokens=100))
    with lorart.Executor(gqa_llama_dir, small_kv) as exe:
        assert exe.config.max_seq_len == 100


def test_max_seq_len_past_the_models_positions_is_refused(gqa_llama_dir):
    with pytest.raises(ValueError) as err:
        lorart.Executor(gqa_llama_dir, cfg(max_seq_len=257))
    assert str(err.value) == (
        "ExecutorConfig.max_seq_len (257) exceeds the model's max_position_embeddings (256); "
        "lower it, or leave it 0 for the model's limit"
    )
    with lorart.Executor(gqa_llama_dir, cfg(max_seq_len=256)) as exe:
        assert exe.config.max_seq_len == 256


BAD_CONFIGS = {
    "max_batch_size": (
        dict(max_batch_size=2**40),
        "ExecutorConfig.max_batch_size must be in [1, 65536], got 1099511627776",
    ),
    "max_num_tokens": (
        dict(max_num_tokens=2**31),
        "ExecutorConfig.max_num_tokens must be in [1, 2147483647], got 2147483648",
    ),
    "max_seq_len": (
        dict(max_seq_len=-1),
        "ExecutorConfig.max_seq_len must be 0 (the model's max_position_embeddings) or in "
        "[1, 2147483647], got -1",
    ),
    "max_lora_rank": (
        dict(max_lora_rank=2**17),
        "ExecutorConfig.max_lora_rank must be in [1, 65536], got 131072",
    ),
    "num_threads": (
        dict(num_threads=-2),
        "ExecutorConfig.num_threads must be 0 (auto) or in [1, 1024], got -2",
    ),
    "block_size": (
        dict(kv_cache=lorart.KvCacheConfig(block_size=2**20, max_tokens=2**20)),
        "ExecutorConfig.kv_cache.block_size must be in [1, 1024], got 1048576",
    ),
    "kv_blocks": (
        dict(max_seq_len=16, kv_cache=lorart.KvCacheConfig(block_size=1, max_tokens=2**40)),
        "ExecutorConfig.kv_cache.max_tokens (1099511627776) needs 1099511627776 blocks of 1 "
        "tokens, more than the 2147483647 block ids",
    ),
    "kv_near_int64": (
        dict(max_seq_len=16, kv_cache=lorart.KvCacheConfig(block_size=16, max_tokens=2**63 - 1)),
        "ExecutorConfig.kv_cache.max_tokens (9223372036854775807) needs 576460752303423488 blocks",
    ),
    "free_gpu_memory_fraction": (
        dict(kv_cache=lorart.KvCacheConfig(free_gpu_memory_fraction=0.0)),
        "ExecutorConfig.kv_cache.free_gpu_memory_fraction must be in (0, 1], got 0",
    ),
    "free_gpu_memory_fraction_above_one": (
        dict(kv_cache=lorart.KvCacheConfig(free_gpu_memory_fraction=1.5)),
        "ExecutorConfig.kv_cache.free_gpu_memory_fraction must be in (0, 1], got 1.5",
    ),
    "host_cache_bytes": (
        dict(lora_cache=lorart.LoraCacheConfig(host_cache_bytes=0)),
        "ExecutorConfig.lora_cache.host_cache_bytes must be > 0, got 0",
    ),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_sizes_name_the_field_and_the_limit(case):
    fields, message = BAD_CONFIGS[case]
    with pytest.raises(ValueError) as err:
        cfg(**fields)
    assert message in str(err.value)


def test_fields_changed_after_construction_are_checked_by_the_executor(gqa_llama_dir):
    config = cfg()
    config.max_batch_size = 0
    with pytest.raises(ValueError, match=r"ExecutorConfig.max_batch_size must be in \[1, 65536\]"):
        lorart.Executor(gqa_llama_dir, config)


def test_sizes_past_the_machines_memory_are_refused_before_allocating(gqa_llama_dir):
    # 2^30 tokens x 768 bytes (3 layers x K,V x 2 heads x 16 x 4 bytes) = 824 GB of KV cache.
    kv = lorart.KvCacheConfig(block_size=16, max_tokens=2**30)
    with pytest.raises(ValueError) as err:
        lorart.Executor(gqa_llama_dir, cfg(kv_cache=kv))
    msg = str(err.value)
    assert msg.startswith(
        "ExecutorConfig.kv_cache.max_tokens (1073741824) needs 824633720832 bytes of KV cache "
        "(768 bytes per token), more than this machine's memory ("
    ), msg
    # [max_num_tokens, vocab] float32 logits: 2^28 x 160 x 4 = 172 GB.
    many = cfg(max_num_tokens=2**28, kv_cache=lorart.KvCacheConfig(max_tokens=4096))
    with pytest.raises(ValueError) as err:
        lorart.Executor(gqa_llama_dir, many)
    assert str(err.value).startswith(
        "ExecutorConfig.max_num_tokens (268435456) needs 171798691840 bytes of logits "
        "([max_num_tokens, vocab_size 160] float32), more than this machine's memory ("
    ), err.value


# ----------------------------------------------------------------------------- await_responses


def test_two_waiters_on_one_request(gqa_llama_dir):
    exe = lorart.Executor(gqa_llama_dir, cfg(max_batch_size=1))
    ahead = [exe.enqueue_request(request(max_new_tokens=100)) for _ in range(100)]
    rid = exe.enqueue_request(request(max_new_tokens=100))  # both wait long before it finishes
    got: list = []
    errors: list[str] = []
    barrier = threading.Barrier(2)

    def wait() -> None:
        barrier.wait(timeout=TIMEOUT)
        try:
            got.extend(exe.await_responses(rid, timeout=TIMEOUT))
        except ValueError as e:
            errors.append(str(e))

    run_threads([wait, wait])
    exe.shutdown()
    assert final(exe, ahead[-1]).finish_reason == "length"
    assert len(got) == 1 and got[0].is_final and got[0].finish_reason == "length", got
    assert len(errors) == 1, errors
    assert f"request id {rid}" in errors[0] and "another await_responses call" in errors[0]


def test_several_waiters_share_a_stream(exe):
    solo = list(final(exe, exe.enqueue_request(request(max_new_tokens=60))).output_token_ids)
    rid = exe.enqueue_request(request(max_new_tokens=60, streaming=True))
    seen: list = []
    lock = threading.Lock()

    def wait() -> None:
        while True:
            try:
                got = exe.await_responses(rid, timeout=TIMEOUT)
            except ValueError as e:
                assert "another await_responses call" in str(e) or "unknown request id" in str(e)
                return
            assert got
            with lock:
                seen.extend(got)
            if got[-1].is_final:
                return

    run_threads([wait] * 3)
    assert sum(r.is_final for r in seen) == 1
    assert sorted(t for r in seen for t in r.output_token_ids) == sorted(solo)
    assert sum(len(r.output_token_ids) for r in seen) == len(solo)


@pytest.mark.parametrize("timeout", [1e10, math.inf, 1e300, None])
def test_long_timeouts_wait(exe, timeout):
    rid = exe.enqueue_request(request(max_new_tokens=100))
    got = exe.await_responses(rid, timeout=timeout)
    assert len(got) == 1 and got[0].is_final and got[0].finish_reason == "length"


@pytest.mark.parametrize("timeout", [math.nan, -1.0, -math.inf])
def test_bad_timeouts_are_value_errors(exe, timeout):
    rid = exe.enqueue_request(request())
    with pytest.raises(ValueError, match="timeout must be None or a number of seconds >= 0"):
        exe.await_responses(rid, timeout=timeout)
    assert final(exe, rid).finish_reason == "length"


def test_zero_timeout_polls(exe):
    rid = exe.enqueue_request(request(max_new_tokens=100))
    start = time.monotonic()
    first = exe.await_responses(rid, timeout=0)
    assert time.monotonic() - start < 1.0
    assert first == [] or first[-1].is_final
    if not first:
        assert collect(exe, rid)[-1].finish_reason == "length"


def test_ctrl_c_interrupts_a_wait(gqa_llama_dir):
    """SIGINT while the main thread waits: KeyboardInterrupt within a second, long before the
    awaited request (the last of 2000 at batch size 1) finishes."""
    with lorart.Executor(gqa_llama_dir, cfg(max_batch_size=1)) as exe:
        ids = [exe.enqueue_request(request(max_new_tokens=120)) for _ in range(2000)]
        timer = threading.Timer(0.3, _thread.interrupt_main)
        start = time.monotonic()
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            exe.await_responses(ids[-1])
        elapsed = time.monotonic() - start
        completed = exe.stats()["completed"]
        timer.join()
    assert completed < len(ids), "the wait only ended when its request finished"
    assert elapsed < 1.5, elapsed


# ---------------------------------------------------------------------------------- statistics


def test_stats_are_booked_before_the_final_response(exe):
    before = exe.stats()
    total = before["total_kv_blocks"]
    for i in range(1, 101):
        streaming = i % 2 == 0
        r = collect(exe, exe.enqueue_request(request(max_new_tokens=3, streaming=streaming)))[-1]
        assert r.finish_reason == "length"
        s = exe.stats()
        assert s["completed"] == before["completed"] + i, (i, s)
        assert s["generated_tokens"] == before["generated_tokens"] + 3 * i, (i, s)
        assert (s["running"], s["queued"], s["free_kv_blocks"]) == (0, 0, total), (i, s)
    bad = final(exe, exe.enqueue_request(request(ids=[])))
    assert bad.finish_reason == "error"
    assert exe.stats()["completed"] == before["completed"] + 101


# ------------------------------------------------------------------------------------ threads


def test_num_threads_applies_on_the_loop_thread(gqa_llama_dir):
    outputs = {}
    previous = _core.num_threads()
    _core.set_num_threads(1)  # the calling thread's setting; the loop thread has its own
    try:
        for n in (1, 2, 0):
            with lorart.Executor(gqa_llama_dir, cfg(num_threads=n)) as exe:
                got = exe.stats()["num_threads"]
                assert got == (n or _core.available_cpus()), (n, got)
                rid = exe.enqueue_request(request(max_new_tokens=20))
                outputs[n] = list(final(exe, rid).output_token_ids)
        assert _core.num_threads() == 1
    finally:
        _core.set_num_threads(previous)
    assert outputs[1] == outputs[2] == outputs[0]
    assert cfg(num_threads=None).num_threads == 0


def test_available_cpus_counts_the_affinity_mask():
    import os

    assert 1 <= _core.available_cpus() <= len(os.sched_getaffinity(0))


# -------------------------------------------------------------------------------------- reprs


def test_reprs_are_short_and_constructor_like(exe):
    s = lorart.SamplingConfig(top_k=1, top_p=0.9, seed=3)
    assert repr(s) == "SamplingConfig(top_k=1, top_p=0.9, temperature=1.0, seed=3)"
    assert repr(lorart.SamplingConfig()) == (
        "SamplingConfig(top_k=0, top_p=1.0, temperature=1.0, seed=None)"
    )
    req = lorart.InferenceRequest(list(range(20)), max_new_tokens=4, sampling_config=s, end_id=2)
    assert repr(req) == (
        "InferenceRequest(input_token_ids=[0, 1, 2, 3, 4, 5, ..., 18, 19] (20 tokens), "
        "max_new_tokens=4, sampling_config=SamplingConfig(top_k=1, top_p=0.9, temperature=1.0, "
        "seed=3), end_id=2)"
    )
    assert repr(lorart.InferenceRequest([1, 2])) == (
        "InferenceRequest(input_token_ids=[1, 2], max_new_tokens=16)"
    )
    r = final(exe, exe.enqueue_request(request(max_new_tokens=3)))
    out = list(r.output_token_ids)
    assert repr(r) == (
        f"Response(request_id={r.request_id}, output_token_ids={out}, finish_reason='length', "
        "is_final=True)"
    )
    bad = final(exe, exe.enqueue_request(request(ids=[])))
    assert repr(bad) == (
        f"Response(request_id={bad.request_id}, output_token_ids=[], finish_reason='error', "
        "error='input_token_ids is empty; a request needs at least one prompt token', "
        "error_kind='invalid_request', is_final=True)"
    )
    assert repr(lorart.KvCacheConfig()) == (
        "KvCacheConfig(block_size=16, max_tokens=16384, dtype='float32', "
        "free_gpu_memory_fraction=0.9)"
    )
    assert repr(lorart.LoraCacheConfig(host_cache_bytes=1024, device_cache_bytes=512)) == (
        "LoraCacheConfig(host_cache_bytes=1024, device_cache_bytes=512)"
    )
    assert repr(lorart.ExecutorConfig(max_batch_size=4)) == (
        "ExecutorConfig(device='cpu', dtype='auto', precision='float32', max_batch_size=4, "
        "max_num_tokens=2048, "
        "max_seq_len=0, max_lora_rank=64, num_threads=0, "
        "lora_cache=LoraCacheConfig(host_cache_bytes=1073741824, device_cache_bytes=268435456), "
        "kv_cache=KvCacheConfig(block_size=16, max_tokens=16384, dtype='float32', "
        "free_gpu_memory_fraction=0.9))"
    )


def test_model_config_reprs():
    rope = lorart.RopeScaling()
    assert repr(rope) == "RopeScaling(rope_type='default')"
    rope.rope_type, rope.factor = "linear", 2.5
    assert repr(rope) == "RopeScaling(rope_type='linear', factor=2.5)"
    rope.rope_type = "llama3"
    rope.original_max_position_embeddings = 8192
    assert repr(rope) == (
        "RopeScaling(rope_type='llama3', factor=2.5, low_freq_factor=1.0, high_freq_factor=4.0, "
        "original_max_position_embeddings=8192)"
    )
    mc = lorart.ModelConfig()
    mc.vocab_size, mc.hidden_size, mc.intermediate_size, mc.num_layers = 32000, 2048, 5632, 22
    mc.num_attention_heads, mc.num_kv_heads, mc.head_dim = 32, 4, 64
    assert repr(mc) == (
        "ModelConfig(architecture='LlamaForCausalLM', vocab_size=32000, hidden_size=2048, "
        "intermediate_size=5632, num_layers=22, num_attention_heads=32, num_kv_heads=4, "
        "head_dim=64, max_position_embeddings=2048, rms_norm_eps=1e-06, rope_theta=10000.0, "
        "dtype='float32')"
    )
    mc.rope_scaling = rope
    mc.tie_word_embeddings = True
    mc.sliding_window = 4096
    assert repr(mc).endswith(
        "rope_theta=10000.0, rope_scaling=RopeScaling(rope_type='llama3', factor=2.5, "
        "low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192), "
        "tie_word_embeddings=True, sliding_window=4096, dtype='float32')"
    )


def test_llm_and_cli_take_a_thread_count(capsys):
    from lorart import cli, demo
    from lorart.llm import LLM

    with LLM(demo.DEMO / "model", num_threads=1, max_num_tokens=256) as llm:
        assert llm.executor.stats()["num_threads"] == 1
        assert llm.executor.config.num_threads == 1
    assert cli.main(["demo", "--threads", "2", "--max_output_len", "4"]) == 0
    assert "Output [Text 5 Beam 0]" in capsys.readouterr().out
    assert cli.main(["demo", "--threads", "-1"]) == 2
    err = capsys.readouterr().err
    assert "--threads -1 is out of range [0, 1024]" in err


def test_openmp_spins_briefly_unless_the_user_chose():
    import os
    import subprocess
    import sys

    show = "import os, lorart; print(os.environ.get('GOMP_SPINCOUNT'))"
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}

    def spin(**extra) -> str:
        cmd = [sys.executable, "-c", show]
        out = subprocess.run(cmd, env={**env, **extra}, capture_output=True, text=True, check=True)
        return out.stdout.strip()

    assert spin() == "10000"
    assert spin(OMP_WAIT_POLICY="ACTIVE") == "None"
    assert spin(GOMP_SPINCOUNT="INFINITE") == "INFINITE"


def test_errors_say_whose_fault_they_are(exe):
    bad = final(exe, exe.enqueue_request(request(ids=[10**6])))  # past the vocabulary
    assert bad.finish_reason == "error"
    assert bad.error_kind == "invalid_request"
    assert "input_token_ids[0] = 1000000 is out of the vocabulary" in bad.error
    assert "error_kind='invalid_request'" in repr(bad)
    ok = final(exe, exe.enqueue_request(request()))
    assert ok.error is None and ok.error_kind is None


def test_released_requests_are_forgotten_unread(exe):
    done = exe.enqueue_request(request(max_new_tokens=2))
    final(exe, exe.enqueue_request(request(max_new_tokens=4)))  # `done` has ended by now
    running = [exe.enqueue_request(request(max_new_tokens=60, streaming=True)) for _ in range(3)]
    for rid in [done, *running]:
        exe.release_request(rid)
    exe.release_request(done)  # twice, and unknown ids: ignored
    exe.release_request(10**9)
    with pytest.raises(ValueError, match="released"):
        exe.await_responses(running[0], timeout=0.0)
    deadline = time.monotonic() + TIMEOUT
    while exe.stats()["uncollected"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert exe.stats()["uncollected"] == 0


def test_shared_requests_come_back_through_await_any(exe):
    solo = final(exe, exe.enqueue_request(request(max_new_tokens=6))).output_token_ids
    ids = [exe.enqueue_shared(request(max_new_tokens=6, streaming=i % 2 == 0)) for i in range(4)]
    tokens: dict[int, list[int]] = {i: [] for i in ids}
    finals = set()
    deadline = time.monotonic() + TIMEOUT
    while len(finals) < len(ids) and time.monotonic() < deadline:
        for r in exe.await_any(timeout=1.0):
            tokens[r.request_id] += r.output_token_ids
            if r.is_final:
                assert r.request_id not in finals
                finals.add(r.request_id)
    assert finals == set(ids)
    assert all(t == solo for t in tokens.values())
    assert exe.await_any(timeout=0.0) == []
    with pytest.raises(ValueError, match="await_any: timeout must be None or a number"):
        exe.await_any(timeout=-1.0)

"""Cost of an adapter's own embed_tokens / lm_head / vocabulary, and of DoRA, at decode batch 8.

A random bf16 checkpoint of the 1.1B shape (hidden 2048, intermediate 5632, 22 layers, 32/4
heads, vocab 32000, untied lm_head; ``big_model.py``'s writer) is written to a temporary
directory, and loaded once per dtype mode: bf16 weights used as stored (``dtype="auto"``, exact)
and the float32 path (``dtype="float32"``), adapters stored in the same dtype. Eight rank-16
adapters on all seven projections are drawn in memory; three sets of them are timed at decode
batch 8 (prompts of 64, each sequence its own adapter) through ``lorart.model.Model``, one decode
step of each in turn (round-robin, so a busy neighbour slows all alike), the median of
``--steps`` steps:

- ``plain``: the 8 plain LoRA adapters (the baseline);
- ``lm_head``: the same, but sequence 0's adapter also brings its own embed_tokens and lm_head
  over a vocabulary of 32000 + ``--extra-vocab`` (1000) tokens, as chinese-llama-2's resized
  vocabulary does (PEFT ``modules_to_save``: full replacement tables); its prompt holds ids past
  the base vocabulary;
- ``dora``: the 8 adapters as DoRA rows (the same A and B, plus a magnitude per output row near
  the base rows' norms, as PEFT initialises it).
- ``plain_shared`` / ``lm_head_shared``: a diagnostic pair, the same with sequences 1-7 all on
  adapter 1 (one run of rows for the base lm_head), without and with the extended adapter on
  sequence 0; its ratio is the lm_head table's own cost, where ``lm_head`` / ``plain`` also
  counts how the forward splits the other sequences' lm_head by slot.

Each set runs in its own ``Model`` over the same loaded weights, so a set's batch holds only its
own adapters. Reported: step time and its ratio to ``plain`` (targets: ``lm_head`` <= 1.3x), the
bytes one step reads (weights, the batch's adapters' A and B, DoRA's per-row scales, the KV cache
at the median step's context, and the extra lm_head table) as a fraction of the streaming-read
bandwidth
measured in the same process (``cpu_forward.py``'s reader); the seconds ``Model.add_adapter``
takes per adapter, plain and DoRA (the difference is computing DoRA's row norms against the base
weights, the function the executor's LoRA cache runs when a DoRA adapter enters it).

Checked first, through the executor (``lorart._core.Executor`` on the same loaded weights, greedy,
``--check-tokens`` tokens, generation logits returned): batch A = the 8 plain adapters plus a base
request, batch B = the same with adapter 0 replaced by the extended one; the base and plain rows
of B are bitwise equal to those of A (tokens and logits), and every request of B (and A's
adapter 0) alone gives the tokens it gets in its batch. Measured there as well: the extended
adapter's bytes on the LoRA cache's host and device levels (the stats' change when it enters) and
the process RSS change (after ``malloc_trim``). During timing, the plain rows of ``lm_head`` are
checked bitwise equal to those of ``plain`` at every step.

Prints a table and appends JSON lines to benchmarks/results/adapter_extras.jsonl. ``--quick``
runs a tiny model in seconds.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import ml_dtypes
import numpy as np
from bench_util import SHAPES, append_records, device_name
from big_model import ONE_BF16, config_json, model_tensors, random_bf16, write_safetensors
from cpu_forward import decode_bytes, measure_read_bandwidth, prompts_for

import lorart
from lorart import _core, lora
from lorart.model import Model, SequenceChunk, load_core_model

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# (set without, set with the lm_head adapter): their plain rows must be bitwise equal.
SAME_ROWS = (("plain", "lm_head"), ("plain_shared", "lm_head_shared"))
RESULTS = Path(__file__).parent / "results" / "adapter_extras.jsonl"
BLOCK = 16
BATCH = 8
RANK = 16
MIN_EXP = -9  # random bf16 magnitudes in [2**-9, 2**-5), as big_model.py's weights
MODES = {"bf16": ("auto", "bfloat16"), "float32": ("float32", "float32")}  # (dtype, adapters)
FULL = dict(shape=SHAPES["1.1b"], prompt_len=64, steps=32)
QUICK = dict(
    shape=dict(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
        tie_word_embeddings=False,
        max_position_embeddings=512,
    ),
    prompt_len=16,
    steps=4,
)


# ----------------------------------------------------------------------------- setup


def write_model(model_dir: Path, shape: dict, seed: int) -> int:
    """A random bf16 checkpoint (one safetensors file) in model_dir; returns its bytes."""
    model_dir.mkdir(parents=True)
    (model_dir / "config.json").write_text(json.dumps(config_json(shape), indent=2))
    gen = np.random.SFC64(seed)

    def fill(name: str, start: int, count: int) -> np.ndarray:
        if name.endswith("norm.weight"):
            return np.full(count, ONE_BF16, dtype=np.uint16)
        return random_bf16(gen, count, MIN_EXP)

    return write_safetensors(model_dir / "model.safetensors", model_tensors(shape), fill)


def bf16_array(gen: np.random.SFC64, shape: tuple[int, ...]) -> np.ndarray:
    return random_bf16(gen, int(np.prod(shape)), MIN_EXP).view(ml_dtypes.bfloat16).reshape(shape)


def draw_adapters(config, gen: np.random.SFC64) -> tuple[list[list[lora.LoraRow]], list[list]]:
    """BATCH adapters: rows (A [r, in], B [out, r] with scaling 2 folded in, bf16-exact float32)
    on all 7 projections of every layer, and for each row a DoRA magnitude [out]: the norm a
    base row of this checkpoint has (sqrt(in * E[w^2]) of its random weights) times 1 + 5% noise,
    as PEFT starts it from the weights' norms."""
    mean_sq = float(np.mean(np.square(bf16_array(gen, (1 << 20,)).astype(np.float64))))
    rng = np.random.default_rng(3)
    adapters, magnitudes = [], []
    for _ in range(BATCH):
        rows, mags = [], []
        for layer in range(config.num_layers):
            for proj in PROJECTIONS:
                module = lora.module_id(proj)
                hi, ho = config.lora_module_dims(module)
                a = bf16_array(gen, (RANK, hi)).astype(np.float32)
                b = bf16_array(gen, (ho, RANK)).astype(np.float32) * 2
                rows.append(lora.LoraRow(module, layer, a, b))
                mag = np.sqrt(hi * mean_sq) * (1 + 0.05 * rng.standard_normal(ho))
                mags.append(mag.astype(ml_dtypes.bfloat16).astype(np.float32))
        adapters.append(rows)
        magnitudes.append(mags)
    return adapters, magnitudes


def pack(rows: list[lora.LoraRow], dtype: str, mags: list | None = None):
    """TensorRT-LLM's pair: plain rows A ++ B ([rows, 3] config), or DoRA rows A ++ B ++
    magnitude ([rows, 4] config with is_dora = 1)."""
    lengths = [r.A.size + r.B.size + (0 if mags is None else m.size) for r, m in _with(rows, mags)]
    values = np.zeros((len(rows), max(lengths)), dtype=np.float32)
    table = np.zeros((len(rows), 3 if mags is None else 4), dtype=np.int32)
    for i, (row, mag) in enumerate(_with(rows, mags)):
        parts = [row.A.ravel(), row.B.ravel()] + ([] if mag is None else [mag])
        values[i, : lengths[i]] = np.concatenate(parts)
        table[i, :3] = (row.module_id, row.layer_idx, row.A.shape[0])
        if mags is not None:
            table[i, 3] = 1
    np_dtype = np.float32 if dtype == "float32" else ml_dtypes.bfloat16
    return values.astype(np_dtype), table


def _with(rows, mags):
    return zip(rows, mags if mags is not None else [None] * len(rows), strict=True)


def lora_pair(values: np.ndarray, table: np.ndarray, embeddings=None):
    return lorart.LoraWeights(values, embeddings=embeddings), lorart.LoraConfig(table)


def rss_bytes() -> int:
    """Resident bytes after freed heap pages go back to the OS (tests' soak test does the same)."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):
        pass
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ----------------------------------------------------------------------------- the check


def run_requests(exe, requests) -> list[tuple[list[int], np.ndarray]]:
    """Enqueue all, then collect each final response: (tokens, generation logits)."""
    ids = [exe.enqueue_request(r) for r in requests]
    out = []
    for rid in ids:
        final = None
        while final is None:
            for resp in exe.await_responses(rid, 600.0):
                if resp.is_final:
                    final = resp
        if final.error is not None:
            raise SystemExit(f"check failed: request error: {final.error}")
        out.append((list(final.output_token_ids), np.asarray(final.generation_logits)))
    return out


def check_and_measure_memory(core, args, mode_dtype, adapters, ext, prompts, ext_prompt) -> dict:
    """The executor checks (module docstring); returns the extended adapter's memory figures."""
    n = args.check_tokens
    kv_tokens = 2 * (BATCH + 1) * (len(ext_prompt) + n + BLOCK)
    cfg = lorart.ExecutorConfig(
        dtype=mode_dtype,
        max_batch_size=BATCH + 1,
        max_num_tokens=core.max_num_tokens,
        max_seq_len=len(ext_prompt) + n + 1,
        max_lora_rank=RANK,
        num_threads=args.threads,
        lora_cache=lorart.LoraCacheConfig(host_cache_bytes=8 << 30, device_cache_bytes=4 << 30),
        kv_cache=lorart.KvCacheConfig(block_size=BLOCK, max_tokens=kv_tokens),
    )
    exe = _core.Executor(core, cfg.resolve(core.config))
    sent: set[int] = set()

    def request(prompt, task: int | None, weights=None):
        req = lorart.InferenceRequest(
            prompt,
            max_new_tokens=n,
            sampling_config=lorart.SamplingConfig(top_k=1),
            lora_task_id=task,
            return_generation_logits=True,
        )
        if task is not None and task not in sent:
            req.lora_weights, req.lora_config = weights
            sent.add(task)
        return req

    try:
        ext_task = BATCH
        base_prompt = prompts[BATCH]
        batch_a = [request(prompts[i], i, adapters[i]) for i in range(BATCH)]
        batch_a.append(request(base_prompt, None))
        got_a = run_requests(exe, batch_a)
        stats0, rss0 = exe.stats()["lora_cache"], rss_bytes()
        batch_b = [request(ext_prompt, ext_task, ext)]
        batch_b += [request(prompts[i], i) for i in range(1, BATCH)]
        batch_b.append(request(base_prompt, None))
        got_b = run_requests(exe, batch_b)
        stats1, rss1 = exe.stats()["lora_cache"], rss_bytes()
        if stats1["host_evictions"] or stats1["device_evictions"]:
            raise SystemExit(f"check setup: the LoRA cache evicted adapters: {stats1}")
        for i in range(1, BATCH + 1):
            (ta, la), (tb, lb) = got_a[i], got_b[i]
            if (
                ta != tb
                or la.shape != lb.shape
                or not np.array_equal(la.view(np.uint32), lb.view(np.uint32))
            ):
                what = "base" if i == BATCH else f"plain adapter {i}"
                raise SystemExit(
                    f"check failed: {what} differs with the extended adapter in the batch "
                    f"(tokens {ta} vs {tb})"
                )
        ext_tokens, ext_logits = got_b[0]
        if ext_logits.shape[-1] != ext[0].embeddings.vocab_size:
            raise SystemExit(f"check failed: extended adapter's logits are {ext_logits.shape}")
        solo_reqs = [request(ext_prompt, ext_task), request(prompts[0], 0)]
        solo_reqs += [request(prompts[i], i) for i in range(1, BATCH)]
        solo_reqs.append(request(base_prompt, None))
        batched = [got_b[0], got_a[0], *got_b[1:]]
        bitwise = True
        for req, (tokens, logits) in zip(solo_reqs, batched, strict=True):
            [(solo_tokens, solo_logits)] = run_requests(exe, [req])
            if solo_tokens != tokens:
                raise SystemExit(
                    f"check failed: task {req.lora_task_id} alone gives {solo_tokens}, in its "
                    f"batch {tokens}"
                )
            bitwise = bitwise and np.array_equal(
                solo_logits.view(np.uint32), logits.view(np.uint32)
            )
        past = sum(t >= core.config.vocab_size for t in ext_tokens)
        print(
            f"  check: base + 7 plain rows bitwise equal with / without the extended adapter in "
            f"the batch; all {BATCH + 2} requests alone give their batch's {n} greedy tokens "
            f"(logits {'bitwise equal' if bitwise else 'NOT bitwise equal'}); the extended "
            f"adapter's prompt has {sum(t >= core.config.vocab_size for t in ext_prompt)} ids "
            f"past the base vocabulary, its output {past} of {n}"
        )
    finally:
        exe.shutdown()
    return dict(
        weights_nbytes=ext[0].nbytes,
        tables_nbytes=ext[0].embeddings.nbytes,
        host=stats1["host_bytes"] - stats0["host_bytes"],
        device=stats1["device_bytes"] - stats0["device_bytes"],
        rss=rss1 - rss0,
        bitwise_solo=bitwise,
    )


# ----------------------------------------------------------------------------- timing


class Batch:
    """One decode batch on its own Model (its adapters only) and KV pool; sequence i on slot i."""

    def __init__(self, model: Model, slots: list[int], per_seq: int):
        self.model, self.slots = model, slots
        self.tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(len(slots))]

    def _step(self, token_lists, context_lens) -> list[np.ndarray]:
        chunks = [
            SequenceChunk(ids, ctx, self.tables[i], self.slots[i])
            for i, (ids, ctx) in enumerate(zip(token_lists, context_lens, strict=True))
        ]
        return [logits[0] for logits in self.model.forward(chunks)]

    def prefill(self, prompts) -> list[np.ndarray]:
        self.ctx = [len(p) for p in prompts]
        return self._step(prompts, [0] * len(prompts))

    def decode(self, tokens) -> list[np.ndarray]:
        out = self._step([[t] for t in tokens], self.ctx)
        self.ctx = [c + 1 for c in self.ctx]
        return out


def time_steps(batches: dict, prompts: dict, steps: int) -> dict[str, list[float]]:
    """Step times of each batch, one step of each in turn; the plain rows (1..) of each set with
    the lm_head adapter checked bitwise against the set without it at every step."""
    logits = {k: b.prefill(prompts[k]) for k, b in batches.items()}
    if any(np.array_equal(a, b) for a, b in zip(logits["dora"], logits["plain"], strict=True)):
        raise SystemExit("check failed: a DoRA row gives the logits of its plain LoRA row")
    times: dict[str, list[float]] = {k: [] for k in batches}
    for step in range(steps + 1):  # step 0 warms up
        for key, batch in batches.items():
            tokens = [int(np.argmax(row)) for row in logits[key]]
            t0 = time.perf_counter()
            logits[key] = batch.decode(tokens)
            if step:
                times[key].append(time.perf_counter() - t0)
        for without, with_ext in SAME_ROWS:
            for i in range(1, BATCH):
                a, b = logits[without][i], logits[with_ext][i]
                if not np.array_equal(a.view(np.uint32), b.view(np.uint32)):
                    raise SystemExit(
                        f"check failed: {without} row {i} differs beside the lm_head adapter"
                    )
        for key in batches:
            if not all(np.isfinite(row).all() for row in logits[key]):
                raise SystemExit(f"check failed: {key}: non-finite logits at step {step}")
    return times


def run_mode(mode: str, model_dir: Path, args, cfg, adapters, mags, vocab_ext) -> dict:
    dtype, adapter_dtype = MODES[mode]
    shape = cfg["shape"]
    length, steps = cfg["prompt_len"], args.steps or cfg["steps"]
    per_seq = -(-(length + steps + 2) // BLOCK)
    t0 = time.perf_counter()
    core = load_core_model(
        model_dir, max(1024, (BATCH + 1) * length), RANK, progress=False, dtype=dtype
    )
    config = core.config
    load_s = time.perf_counter() - t0
    plain = [lora_pair(*pack(rows, adapter_dtype)) for rows in adapters]
    dora = [
        lora_pair(*pack(rows, adapter_dtype, m)) for rows, m in zip(adapters, mags, strict=True)
    ]
    gen = np.random.SFC64(11)
    h = config.hidden_size
    tables = [bf16_array(gen, (vocab_ext, h)) for _ in range(2)]
    if adapter_dtype == "float32":
        tables = [t.astype(np.float32) for t in tables]
    embeddings = lorart.LoraEmbeddings(embed_tokens=tables[0], lm_head=tables[1])
    ext = lora_pair(*pack(adapters[0], adapter_dtype), embeddings=embeddings)
    vocab = config.vocab_size
    prompts = prompts_for(BATCH + 1, length, vocab, 5)
    ext_prompt = prompts_for(1, length, vocab_ext, 6)[0]
    ext_prompt[::8] = [vocab + (7 * j) % (vocab_ext - vocab) for j in range(len(ext_prompt[::8]))]
    print(f"\n[{mode}] weights {core.weight_dtype}, adapters {adapter_dtype}; load {load_s:.1f} s")

    memory = check_and_measure_memory(core, args, dtype, plain, ext, prompts, ext_prompt)
    gc.collect()

    distinct, shared = list(range(BATCH)), [0] + [1] * (BATCH - 1)
    sets = {  # key -> (adapters in its Model, each sequence's slot)
        "plain": (plain, distinct),
        "lm_head": ([ext, *plain[1:]], distinct),
        "dora": (dora, distinct),
        "plain_shared": (plain[:2], shared),
        "lm_head_shared": ([ext, plain[1]], shared),
    }
    batches, add_s = {}, {"plain": [], "dora": []}
    for key, (pairs, slots) in sets.items():
        model = Model(core, BATCH * per_seq + 1, BLOCK)
        for pair in pairs:
            t = time.perf_counter()
            model.add_adapter(*pair)
            if key in add_s:
                add_s[key].append(time.perf_counter() - t)
        batches[key] = Batch(model, slots, per_seq)
    batch_prompts = {k: prompts[:BATCH] for k in batches}
    for key in ("lm_head", "lm_head_shared"):
        batch_prompts[key] = [ext_prompt, *prompts[1:BATCH]]

    load = os.getloadavg()
    bandwidth = measure_read_bandwidth(args.threads)
    times = time_steps(batches, batch_prompts, steps)
    bandwidth = max(bandwidth, measure_read_bandwidth(args.threads))
    load_after = os.getloadavg()
    print(
        f"  load average {load[0]:.2f} before timing, {load_after[0]:.2f} after; streaming-read "
        f"bandwidth {bandwidth / 1e9:.2f} GB/s ({args.threads} threads)"
    )
    del batches
    gc.collect()

    w_item = 2 if core.weight_dtype == "bfloat16" else 4
    a_item = 2 if adapter_dtype == "bfloat16" else 4
    ctx = length + 1 + steps / 2  # the median step's context
    weights = decode_bytes(config, w_item, 0, 0, 0) + (BATCH - 1) * h * w_item  # 8 embed rows
    dims = [config.lora_module_dims(lora.module_id(p)) for p in PROJECTIONS]
    one_adapter = config.num_layers * RANK * sum(a + b for a, b in dims) * a_item
    kv = config.num_layers * 2 * config.num_kv_heads * config.head_dim * 4 * ctx
    head = vocab_ext * h * a_item  # its own lm_head; its embed row replaces a base row
    extra = {
        "plain": 0,
        "lm_head": head,
        "dora": BATCH * config.num_layers * sum(o for _, o in dims) * 4,  # float32 row scales
        "plain_shared": 0,
        "lm_head_shared": head,
    }
    distinct_adapters = {k: len(set(slots)) for k, (_, slots) in sets.items()}
    step_bytes = {
        k: weights + distinct_adapters[k] * one_adapter + BATCH * kv + e for k, e in extra.items()
    }
    return dict(
        mode=mode,
        weight_dtype=core.weight_dtype,
        adapter_dtype=adapter_dtype,
        times={k: statistics.median(v) for k, v in times.items()},
        spread={k: (min(v), max(v)) for k, v in times.items()},
        step_bytes=step_bytes,
        extra=extra,
        bandwidth=bandwidth,
        memory=memory,
        add_s={k: statistics.median(v) for k, v in add_s.items()},
        load=(load[0], load_after[0]),
        ctx=ctx,
        shape=shape,
    )


# ----------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, a few seconds")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON lines file (appended)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--steps", type=int, default=None, help="timed decode steps (32)")
    parser.add_argument("--check-tokens", type=int, default=4, help="greedy tokens checked")
    parser.add_argument("--extra-vocab", type=int, default=1000, help="tokens past the base vocab")
    args = parser.parse_args()
    for name in ("threads", "steps", "check_tokens", "extra_vocab"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    _core.set_num_threads(args.threads)
    cfg = QUICK if args.quick else FULL
    bench = "adapter_extras_quick" if args.quick else "adapter_extras_1.1b"
    device = device_name(args.threads)
    vocab_ext = cfg["shape"]["vocab_size"] + args.extra_vocab
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        file_bytes = write_model(Path(tmp) / "model", cfg["shape"], seed=0)
        config = lorart.hf.load_config(Path(tmp) / "model")
        adapters, mags = draw_adapters(config, np.random.SFC64(1))
        print(
            f"model: {'quick' if args.quick else '1.1b'} bf16 checkpoint "
            f"{file_bytes / 1e9:.2f} GB, "
            f"{BATCH} adapters of rank {RANK} on {len(PROJECTIONS)} projections, extended "
            f"vocabulary {vocab_ext}; setup {time.perf_counter() - t0:.1f} s"
        )
        print(f"device: {device}")
        for mode in args.modes:
            results.append(
                run_mode(mode, Path(tmp) / "model", args, cfg, adapters, mags, vocab_ext)
            )
    report(results, bench, device, vocab_ext, args.out)


def report(results: list[dict], bench: str, device: str, vocab_ext: int, out: Path) -> None:
    records, base = [], dict(bench=bench, device=device)
    print(
        f"\n{'decode batch 8, 8 adapters r16':<38} {'mode':<8} {'step ms':>8} {'min-max ms':>13} "
        f"{'/ plain':>8} {'GB/step':>8} {'roofline':>9}"
    )
    for res in results:
        for key, label, ref in (
            ("plain", "plain LoRA (baseline)", "plain"),
            ("lm_head", f"1 of 8 with own embed+lm_head V{vocab_ext}", "plain"),
            ("dora", "DoRA on all 7 projections", "plain"),
            ("plain_shared", "2 adapters: 1 + 7 sequences on one", "plain_shared"),
            ("lm_head_shared", "the 1 with own embed+lm_head", "plain_shared"),
        ):
            t, plain = res["times"][key], res["times"][ref]
            lo, hi = res["spread"][key]
            roof = res["step_bytes"][key] / t / res["bandwidth"]
            print(
                f"{label:<38} {res['mode']:<8} {t * 1e3:>8.1f} {lo * 1e3:>6.1f}-{hi * 1e3:<6.1f} "
                f"{t / plain:>8.3f} {res['step_bytes'][key] / 1e9:>8.3f} {roof:>9.2f}"
            )
            records.append(
                dict(
                    base,
                    case=f"decode b8 ctx{res['ctx']:.0f} {label}, {res['mode']}",
                    metric="decode_step_time",
                    value=round(t, 6),
                    unit="s",
                    baseline=f"{ref} set, {res['mode']} (same run)",
                    baseline_value=round(plain, 6),
                    ratio=round(t / plain, 4),
                    roofline_fraction=round(roof, 4),
                )
            )
    print()
    for res in results:
        mem, mode = res["memory"], res["mode"]
        mib = 2**20
        print(
            f"[{mode}] extended adapter: extra read per step "
            f"{res['extra']['lm_head'] / mib:.1f} MiB "
            f"(its lm_head, {res['extra']['lm_head'] / res['step_bytes']['plain']:.1%} of the "
            f"plain step's {res['step_bytes']['plain'] / mib:.0f} MiB); LoraWeights "
            f"{mem['weights_nbytes'] / mib:.1f} MiB (tables {mem['tables_nbytes'] / mib:.1f}); "
            f"LoRA cache host level +{mem['host'] / mib:.1f} MiB, device level "
            f"+{mem['device'] / mib:.1f} MiB; process RSS +{mem['rss'] / mib:.1f} MiB"
        )
        dora_s, plain_s = res["add_s"]["dora"], res["add_s"]["plain"]
        print(
            f"[{mode}] add_adapter per adapter: plain {plain_s:.3f} s, DoRA {dora_s:.3f} s "
            f"(DoRA scales {dora_s - plain_s:.3f} s per adapter)"
        )
        for metric, value, unit in (
            ("extra_bytes_per_step", res["extra"]["lm_head"], "bytes"),
            ("lora_cache_host_bytes", mem["host"], "bytes"),
            ("lora_cache_device_bytes", mem["device"], "bytes"),
            ("rss_delta", mem["rss"], "bytes"),
        ):
            records.append(
                dict(
                    base,
                    case=f"adapter with own embed_tokens+lm_head V{vocab_ext}, {mode}",
                    metric=metric,
                    value=int(value),
                    unit=unit,
                    baseline="its LoraWeights.nbytes",
                    baseline_value=int(mem["weights_nbytes"]),
                    ratio=round(value / mem["weights_nbytes"], 4),
                )
            )
        records.append(
            dict(
                base,
                case=f"DoRA adapter r16 on 7 projections, Model.add_adapter, {mode}",
                metric="add_adapter_seconds",
                value=round(dora_s, 4),
                unit="s",
                baseline="the same adapter as plain LoRA",
                baseline_value=round(plain_s, 4),
                ratio=round(dora_s / plain_s, 4),
            )
        )
    print(
        "(step: median of the round-robin steps; GB/step: weights + the batch's distinct "
        "adapters' A and B + KV at the median step's context + the variant's extra reads; "
        "roofline: GB/step / step time "
        "over the measured bandwidth; the shared pair: sequences 1-7 on one adapter, so the "
        "base lm_head runs once for them)"
    )
    append_records(out, records)


if __name__ == "__main__":
    main()

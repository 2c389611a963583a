#!/usr/bin/env python3
"""Kernel-op timings on a 7B-class Llama's shapes through lorart._core.ops: the linear (bf16
weights, both precisions), paged attention (bf16 KV; decode over contexts 512..8192 and batches
1..64, and prefill) with 8 (GQA) and 32 KV heads, and lora_gemm (decode tokens each with its own
adapter, ranks 8..64 mixed, and a prefill shape) beside the base linear of the same module.

Every case is first checked: on CUDA against the CPU op on the same inputs (a subset of rows or
sequences where the CPU would be slow: both kernels are batch invariant, so a row's result does
not depend on the others), on the CPU against a float64 torch reference. A failed check is
reported and not timed, and makes the exit status 1. An op whose CUDA kernel has not landed
("no CUDA kernel in this build yet") is reported as not available and the run goes on.

Timing: warm-up calls, then each call between CUDA events (host clock on the CPU), the median
of --reps; then, on CUDA, the calls captured into a CUDA graph and its replays timed, which is
the time reported (without the binding's launch overhead; the per-call time stays in the record
as events_us, and is reported instead where a capture fails). Inputs rotate among copies whose
total exceeds the L2 cache where one copy would fit in it. The table shows time, achieved GB/s
and TFLOP/s, and the roofline fraction: the time the larger of bytes / HBM bandwidth and FLOPs /
peak rate would take over the measured time, with
the H200's datasheet ceilings (4.8 TB/s, 989 dense bf16 TFLOP/s, 67 fp32 TFLOP/s); the copy
bandwidth and bf16 matmul rate measured through torch in the same run are printed beside them.
Records (benchmarks/README.md's format, one JSON object a line) go to --json, or
$OUT/ops_bench.jsonl when $OUT is set, else benchmarks/results/ops_bench.jsonl.

    python benchmarks/gpu/ops_bench.py                  # CUDA, the full shapes (~1-2 min)
    python benchmarks/gpu/ops_bench.py --device cpu --quick   # smoke test (tests/python)
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

import lorart
from lorart._core import ops

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_util import append_records, device_name

H200 = {"bandwidth": 4.8e12, "bf16": 989e12, "fp32": 67e12}
L2_BYTES = 60 << 20  # the H200's L2: inputs smaller than a few of these are rotated
NO_KERNEL = "no CUDA kernel in this build yet"


class NotAvailable(Exception):
    pass


def shapes(quick: bool) -> dict:
    if quick:
        return {"hidden": 256, "inter": 512, "heads": 4, "kv_heads": (2, 4), "head_dim": 64}
    return {"hidden": 4096, "inter": 11008, "heads": 32, "kv_heads": (8, 32), "head_dim": 128}


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().cpu().double(), want.detach().cpu().double()
    if not torch.isfinite(got).all():
        return math.inf
    return float((got - want).norm() / max(float(want.norm()), 1e-30))


def copies_for(nbytes: int, device: str) -> int:
    """Input copies to rotate among so that repeated calls read memory, not the L2 cache."""
    if device == "cpu":
        return 1
    return max(1, min(8, math.ceil(4 * L2_BYTES / max(nbytes, 1))))


class Bench:
    def __init__(self, args):
        self.device = args.device
        self.dev = torch.device(args.device)
        self.reps, self.warmup = args.reps, args.warmup
        self.records: list[dict] = []
        self.failed = 0
        self.deadline = time.monotonic() + args.budget_s if args.budget_s else math.inf
        self.name = (
            torch.cuda.get_device_name(self.dev) if self.device == "cuda" else device_name(1)
        )

    def out_of_time(self, op: str, case: str) -> bool:
        """Past --budget-s: the case is recorded as skipped instead of run."""
        if time.monotonic() < self.deadline:
            return False
        rec = {"bench": "ops_bench", "op": op, "case": case, "device": self.name}
        rec.update(status="skipped", reason="--budget-s reached")
        self.records.append(rec)
        print(row(rec), flush=True)
        return True

    def sync(self):
        if self.device == "cuda":
            torch.cuda.synchronize()

    def call(self, fn, *args, **kwargs):
        try:
            out = fn(*args, **kwargs)
            self.sync()
        except lorart.DeviceError as e:
            if NO_KERNEL in str(e):
                raise NotAvailable(str(e)) from None
            raise
        return out

    def time(self, fn, graph: bool = True) -> tuple[float, dict]:
        """Median seconds of one fn(i, stream) (i = the call's index, for rotating inputs), and
        how it was timed. On CUDA each call runs between two events; then, with `graph`, calls
        are captured into a CUDA graph (enough of them for ~2 ms) and its replays timed, which
        takes the binding's launch overhead out of short kernels. A capture that fails (an op
        that synchronizes or allocates) leaves the per-call time."""
        for i in range(self.warmup):
            fn(i, 0)
        self.sync()
        if self.device != "cuda":
            times = []
            for i in range(self.reps):
                t0 = time.perf_counter()
                fn(i, 0)
                times.append(time.perf_counter() - t0)
            return statistics.median(times), {"timing": "host clock"}
        events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            for _ in range(self.reps)
        ]
        for i, (a, b) in enumerate(events):
            a.record()
            fn(i, 0)
            b.record()
        torch.cuda.synchronize()
        per_call = statistics.median(a.elapsed_time(b) * 1e-3 for a, b in events)
        info = {"timing": "events per call", "events_us": per_call * 1e6}
        if not graph:
            return per_call, info
        n = max(1, min(64, math.ceil(2e-3 / per_call)))
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fn(0, side.cuda_stream)  # the side stream's first use outside the capture
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                stream = torch.cuda.current_stream().cuda_stream
                for i in range(n):
                    fn(i, stream)
            g.replay()
            torch.cuda.synchronize()
            reps = max(3, self.reps // 4)
            events = [
                (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                for _ in range(reps)
            ]
            for a, b in events:
                a.record()
                g.replay()
                b.record()
            torch.cuda.synchronize()
            t = statistics.median(a.elapsed_time(b) * 1e-3 for a, b in events) / n
            info.update(timing=f"CUDA graph of {n} calls", graph_calls=n)
            return t, info
        except Exception as e:  # keep the per-call time, and say why
            torch.cuda.synchronize()
            info["graph_error"] = f"{type(e).__name__}: {e}"[:300]
            return per_call, info

    def run(self, op, case, check, timed, nbytes, flops, peak, tol, baseline=None):
        """check() -> rel error; timed(i) is one call; baseline = (name, seconds) from this run."""
        rec = {"bench": "ops_bench", "op": op, "case": case, "device": self.name}
        try:
            err = check()
            rec.update(check_rel_err=err, check_tol=tol)
            if not err <= tol:
                rec["status"] = "FAILED CHECK"
                self.failed += 1
            else:
                t, how = self.time(timed)
                floor = max(nbytes / H200["bandwidth"], flops / peak)
                rec.update(how)
                rec.update(
                    status="ok",
                    metric="time",
                    value=t * 1e6,
                    unit="us",
                    gb_per_s=nbytes / t / 1e9,
                    tflop_per_s=flops / t / 1e12,
                    roofline_fraction=floor / t,
                    bound="memory" if nbytes / H200["bandwidth"] >= flops / peak else "compute",
                )
                if baseline is not None:
                    rec.update(
                        baseline=baseline[0],
                        baseline_value=baseline[1] * 1e6,
                        ratio=t / baseline[1],
                    )
        except NotAvailable as e:
            rec.update(status="not available", reason=str(e))
        self.records.append(rec)
        print(row(rec), flush=True)
        return rec


def row(rec: dict) -> str:
    head = f"{rec['op']:<10} {rec['case']:<44}"
    if rec["status"] != "ok":
        extra = rec.get("reason") or f"rel err {rec.get('check_rel_err', 0):.2e}"
        return f"{head} {rec['status']}: {extra}"
    s = (
        f"{head} {rec['value']:>10.1f} us {rec['gb_per_s']:>8.0f} GB/s "
        f"{rec['tflop_per_s']:>7.1f} TF/s  roof {rec['roofline_fraction']:>5.1%}"
    )
    if rec.get("timing", "").startswith("events"):
        s += "  (per call: no graph)"
    if "ratio" in rec:
        s += f"  x{rec['ratio']:.2f} of {rec['baseline']}"
    return s


# ------------------------------------------------------------------------------ linear


def linear_modules(sh: dict) -> dict[str, tuple[int, int]]:
    h, i, hd = sh["hidden"], sh["inter"], sh["head_dim"]
    mods = {f"qkv_kv{kv}": (sh["heads"] * hd + 2 * kv * hd, h) for kv in sh["kv_heads"]}
    mods.update({"o": (h, h), "gate_up": (2 * i, h), "down": (h, i)})
    return mods


def check_rows(m: int) -> list[int]:
    return sorted({r for r in (0, 1, 2, 3, m - 4, m - 3, m - 2, m - 1) if 0 <= r < m})


def time_linear(b: Bench, n, k, m, precision, label):
    """Times y = x @ w^T (bf16 w) and returns its record."""
    if b.out_of_time("linear", label):
        return b.records[-1]
    copies = copies_for(n * k * 2, b.device)
    ws = [torch.randn(n, k, device=b.dev).to(torch.bfloat16) for _ in range(copies)]
    x = torch.randn(m, k, device=b.dev)
    y = torch.full((m, n), float("nan"), device=b.dev)

    def check():
        b.call(ops.linear, x, ws[0], y, 0.0, precision)
        rows = check_rows(m)
        xs, w0 = x[rows].cpu(), ws[0].cpu()
        if b.device == "cuda":
            want = torch.full((len(rows), n), float("nan"))
            ops.linear(xs, w0, want, 0.0, precision)
            return rel_err(y[rows], want)
        xr = xs.bfloat16() if precision == "bfloat16" else xs
        return rel_err(y[rows], xr.double() @ w0.double().T)

    tol = 1e-5 if precision == "float32" else 5e-3
    nbytes = n * k * 2 + m * k * 4 + m * n * 4
    peak = H200["bf16"] if precision == "bfloat16" else H200["fp32"]
    return b.run(
        "linear",
        label,
        check,
        lambda i, stream: ops.linear(x, ws[i % copies], y, 0.0, precision, stream),
        nbytes,
        2 * m * n * k,
        peak,
        tol,
    )


def bench_linear(b: Bench, sh: dict, quick: bool):
    ms = (1, 5) if quick else (1, 8, 32, 64, 512, 2048)
    for name, (n, k) in linear_modules(sh).items():
        for m in ms:
            for precision in ("bfloat16", "float32"):
                time_linear(b, n, k, m, precision, f"{name} {n}x{k} M={m} {precision}")


# ------------------------------------------------------------------------------ attention


def make_step(seqs, heads, kv_heads, hd, block_size, dtype, device, copies):
    """Random step over shuffled blocks; each sequence's context is already in the caches."""
    width = max(math.ceil((c + n) / block_size) for c, n in seqs)
    need = sum(math.ceil((c + n) / block_size) for c, n in seqs)
    num_blocks = need + 1
    pool = torch.randperm(num_blocks).tolist()
    tables, starts, lens = [], [0], []
    for c, n in seqs:
        used = math.ceil((c + n) / block_size)
        tables.append([pool.pop() if j < used else -1 for j in range(width)])
        starts.append(starts[-1] + n)
        lens.append(c)
    t = starts[-1]
    shape = (num_blocks, block_size, kv_heads, hd)
    caches = [
        (
            torch.randn(shape, device=device, dtype=dtype),
            torch.randn(shape, device=device, dtype=dtype),
        )
        for _ in range(copies)
    ]
    return {
        "q": torch.randn(t, heads * hd, device=device),
        "k": torch.randn(t, kv_heads * hd, device=device),
        "v": torch.randn(t, kv_heads * hd, device=device),
        "caches": caches,
        "seq_starts": torch.tensor(starts, dtype=torch.int32, device=device),
        "context_lens": torch.tensor(lens, dtype=torch.int32, device=device),
        "block_tables": torch.tensor(tables, dtype=torch.int32, device=device),
        "seqs": seqs,
    }


def sub_step(step, picks, block_size):
    """Sequences `picks` of a step as a CPU step over a compact copy of their cache blocks, taken
    before the device op writes the chunk."""
    tables = step["block_tables"].cpu()
    starts = step["seq_starts"].cpu().tolist()
    blocks = sorted({int(x) for p in picks for x in tables[p].tolist() if x >= 0})
    remap = {blk: j for j, blk in enumerate(blocks)}
    idx = torch.tensor(blocks, device=step["q"].device)
    kc, vc = step["caches"][0]
    rows = [r for p in picks for r in range(starts[p], starts[p + 1])]
    new_starts = [0]
    for p in picks:
        new_starts.append(new_starts[-1] + starts[p + 1] - starts[p])
    return {
        "q": step["q"][rows].cpu(),
        "k": step["k"][rows].cpu(),
        "v": step["v"][rows].cpu(),
        "k_cache": kc.index_select(0, idx).cpu(),
        "v_cache": vc.index_select(0, idx).cpu(),
        "seq_starts": torch.tensor(new_starts, dtype=torch.int32),
        "context_lens": step["context_lens"].cpu()[picks].clone(),
        "block_tables": torch.tensor(
            [[remap.get(int(x), -1) for x in tables[p].tolist()] for p in picks], dtype=torch.int32
        ),
        "seqs": [step["seqs"][p] for p in picks],
        "rows": rows,
    }


def attention_ref(s, heads, kv_heads, hd, scale):
    """float64 torch paged attention of a CPU step: the chunk written into (copies of) the
    caches rounded to their dtype, then causal attention over each sequence's keys."""
    kc, vc = s["k_cache"].clone(), s["v_cache"].clone()
    bs, group = kc.shape[1], heads // kv_heads
    out = torch.empty(s["q"].shape, dtype=torch.float64)
    starts = s["seq_starts"].tolist()
    for i, (c, n) in enumerate(s["seqs"]):
        table = s["block_tables"][i].tolist()
        for j in range(n):
            pos, t = c + j, starts[i] + j
            kc[table[pos // bs], pos % bs] = s["k"][t].view(kv_heads, hd).to(kc.dtype)
            vc[table[pos // bs], pos % bs] = s["v"][t].view(kv_heads, hd).to(vc.dtype)
        used = torch.tensor(table[: math.ceil((c + n) / bs)])
        keys = kc[used].reshape(-1, kv_heads, hd)[: c + n].double()
        vals = vc[used].reshape(-1, kv_heads, hd)[: c + n].double()
        q = s["q"][starts[i] : starts[i] + n].view(n, heads, hd).double()
        keys, vals = keys.repeat_interleave(group, 1), vals.repeat_interleave(group, 1)
        scores = torch.einsum("qhd,khd->hqk", q, keys) * scale
        causal = torch.arange(c + n)[None, :] > (c + torch.arange(n))[:, None]
        scores = scores.masked_fill(causal[None], -math.inf)
        o = torch.einsum("hqk,khd->qhd", scores.softmax(-1), vals)
        out[starts[i] : starts[i] + n] = o.reshape(n, heads * hd)
    return out


def attention_case(b: Bench, label, seqs, heads, kv_heads, hd, dtype=torch.bfloat16, bs=16):
    if b.out_of_time("attention", label):
        return
    dbytes = torch.finfo(dtype).bits // 8
    kv_tokens = sum(c + n for c, n in seqs)
    cache_bytes = 2 * kv_tokens * kv_heads * hd * dbytes
    copies = copies_for(cache_bytes, b.device)
    step = make_step(seqs, heads, kv_heads, hd, bs, dtype, b.dev, copies)
    max_q, max_kv = max(n for _, n in seqs), max(c + n for c, n in seqs)
    nbytes_ws = ops.paged_attention_workspace_bytes(
        b.device, len(seqs), max_kv, heads, kv_heads, hd
    )
    workspace = torch.empty(max(1, -(-nbytes_ws // 4)), dtype=torch.int32, device=b.dev)
    out = torch.full(step["q"].shape, float("nan"), device=b.dev)
    scale = hd**-0.5
    shape = {"num_heads": heads, "num_kv_heads": kv_heads, "head_dim": hd, "scale": scale}
    arrays = {k: step[k] for k in ("q", "k", "v", "seq_starts", "context_lens", "block_tables")}

    def call(i, stream=0):
        kc, vc = step["caches"][i % copies]
        ops.paged_attention(
            **arrays,
            k_cache=kc,
            v_cache=vc,
            out=out,
            **shape,
            max_query_len=max_q,
            max_kv_len=max_kv,
            workspace=workspace,
            stream=stream,
        )

    def check():
        picks = sorted({0, 1, 2, len(seqs) - 1} & set(range(len(seqs))))
        sub = sub_step(step, picks, bs)  # before the op writes the chunk into the cache
        b.call(call, 0)
        got = out[sub["rows"]]
        if b.device == "cuda":
            want = torch.full(sub["q"].shape, float("nan"))
            cpu = {k: sub[k] for k in arrays}
            ops.paged_attention(
                **cpu, k_cache=sub["k_cache"], v_cache=sub["v_cache"], out=want, **shape
            )
            return rel_err(got, want)
        return rel_err(got, attention_ref(sub, heads, kv_heads, hd, scale))

    tokens = sum(n for _, n in seqs)
    # Bytes: the cached keys and values read once, the chunk's written; q, k, v, out float32.
    nbytes = cache_bytes + tokens * (2 * heads * hd + 2 * kv_heads * hd) * 4
    # FLOPs: q.k and p.v over each query's causal keys.
    flops = 4 * heads * hd * sum(n * c + n * (n + 1) // 2 for c, n in seqs)
    # A 16-bit cache's prefill runs on tensor cores with q and the probabilities rounded to the
    # cache dtype (bf16: u = 2^-8); decode (and the CPU) compute in float32.
    prefill = any(n > 1 for _, n in seqs)
    tol = 1.6e-2 if prefill and b.device == "cuda" and dtype == torch.bfloat16 else 1e-4
    b.run("attention", label, check, call, nbytes, flops, H200["bf16"], tol)


def bench_attention(b: Bench, sh: dict, quick: bool):
    heads, hd = sh["heads"], sh["head_dim"]
    contexts, batches = ((40,), (1, 3)) if quick else ((512, 2048, 8192), (1, 8, 32, 64))
    prefills = (
        {"prefill 1x40": [(0, 40)], "chunked 100+16": [(100, 16)]}
        if quick
        else {
            "prefill 1x2048": [(0, 2048)],
            "prefill 4x512": [(0, 512)] * 4,
            "chunked 4096+512": [(4096, 512)],
        }
    )
    for kv in sh["kv_heads"]:
        for ctx in contexts:
            for batch in batches:
                label = f"decode kv{kv} ctx={ctx} B={batch} bf16"
                attention_case(b, label, [(ctx, 1)] * batch, heads, kv, hd)
        for name, seqs in prefills.items():
            attention_case(b, f"{name} kv{kv} bf16", seqs, heads, kv, hd)


# ------------------------------------------------------------------------------ LoRA


def lora_case(b: Bench, label, in_f, out_f, runs, ranks, dtype=torch.bfloat16):
    """lora_gemm of `runs` (token counts, one adapter each, ranks cycling) beside the base
    linear of the same module (bf16 weights, bfloat16 precision)."""
    if b.out_of_time("lora_gemm", label):
        return
    t = sum(runs)
    slot_ranks = [ranks[i % len(ranks)] for i in range(len(runs))]
    adapter_bytes = sum(r * (in_f + out_f) * 2 for r in slot_ranks)
    copies = copies_for(adapter_bytes, b.device)
    run_list, pos = [], 0
    for i, n in enumerate(runs):
        run_list.append((pos, pos + n, i))
        pos += n
    sets = []
    for _ in range(copies):
        slots = [
            (
                (torch.randn(r, in_f, device=b.dev) * 0.05).to(dtype),
                (torch.randn(r, out_f, device=b.dev) * 0.05).to(dtype),
            )
            for r in slot_ranks
        ]
        sets.append((slots, ops.LoraTable(run_list, slots, in_f, out_f)))
    x = torch.randn(t, in_f, device=b.dev)
    y0 = torch.randn(t, out_f, device=b.dev)
    y = y0.clone()
    scratch = torch.empty(max(1, sets[0][1].scratch_floats), device=b.dev)
    base = time_linear(b, out_f, in_f, t, "bfloat16", f"base of {label}")
    base_t = base.get("value", 0) * 1e-6 if base["status"] == "ok" else None

    def check():
        b.call(ops.lora_gemm, x, y, out_f, sets[0][1], scratch)
        delta = y - y0
        slots = [(a.cpu(), bt.cpu()) for a, bt in sets[0][0]]
        xs = x.cpu()
        if b.device == "cuda":
            want = y0.cpu().clone()
            table = ops.LoraTable(run_list, slots, in_f, out_f)
            ops.lora_gemm(xs, want, out_f, table, torch.empty(max(1, table.scratch_floats)))
            return rel_err(delta, want - y0.cpu())
        want = torch.zeros(t, out_f, dtype=torch.float64)
        for (s, e, _), (a, bt) in zip(run_list, slots, strict=True):
            want[s:e] = xs[s:e].double() @ a.double().T @ bt.double()
        return rel_err(delta, want)

    def call(i, stream=0):
        ops.lora_gemm(x, y, out_f, sets[i % copies][1], scratch, stream)

    flops = sum(2 * n * r * (in_f + out_f) for n, r in zip(runs, slot_ranks, strict=True))
    nbytes = adapter_bytes + t * in_f * 4 + 2 * t * out_f * 4
    baseline = (base["case"], base_t) if base_t else None
    # bf16 adapters: a CUDA kernel may round x and x @ A^T to bf16 for the tensor cores.
    tol = 1e-2 if b.device == "cuda" else 1e-4
    b.run("lora_gemm", label, check, call, nbytes, flops, H200["bf16"], tol, baseline)


def bench_lora(b: Bench, sh: dict, quick: bool):
    h, i = sh["hidden"], sh["inter"]
    ranks = [8, 16, 32, 64]
    modules = {"q": (h, h), "up": (h, i), "down": (i, h)}
    if quick:
        modules.pop("up")
    batches = (3,) if quick else (1, 8, 32, 64)
    prefill = [24, 9] if quick else [512] * 4
    for name, (in_f, out_f) in modules.items():
        for batch in batches:
            label = f"{name} {in_f}->{out_f} decode B={batch} r8-64"
            lora_case(b, label, in_f, out_f, [1] * batch, ranks)
        label = f"{name} {in_f}->{out_f} prefill {len(prefill)}x{prefill[0]} r8-64"
        lora_case(b, label, in_f, out_f, prefill, ranks)


# ------------------------------------------------------------------------------ ceilings


def measured_ceilings(b: Bench) -> dict:
    """The copy bandwidth and bf16 matmul rate through torch on this device (random data)."""
    if b.device != "cuda":
        return {}
    src = torch.randn(1 << 29, device=b.dev).to(torch.bfloat16)  # 1 GiB
    dst = torch.empty_like(src)
    t, _ = b.time(lambda i, stream: dst.copy_(src), graph=False)
    a = torch.randn(8192, 8192, device=b.dev, dtype=torch.bfloat16)
    c = torch.randn(8192, 8192, device=b.dev, dtype=torch.bfloat16)
    tm, _ = b.time(lambda i, stream: a @ c, graph=False)
    return {
        "copy_gb_per_s": 2 * src.numel() * 2 / t / 1e9,
        "bf16_mm_tflop_per_s": 2 * 8192**3 / tm / 1e12,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--quick", action="store_true", help="small shapes (a smoke test)")
    ap.add_argument("--only", default="linear,attention,lora", help="comma-separated op groups")
    ap.add_argument("--reps", type=int, default=None, help="timed calls per case")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None, help="JSON-lines output path")
    ap.add_argument("--budget-s", type=float, default=0, help="start no case after this (0: none)")
    args = ap.parse_args(argv)
    if args.reps is None:
        args.reps = 3 if args.quick or args.device == "cpu" else 30
    if args.warmup is None:
        args.warmup = 1 if args.quick or args.device == "cpu" else 5
    if args.device == "cuda" and not (lorart.build_info()["cuda"] and torch.cuda.is_available()):
        print(
            "ops_bench: needs a CUDA build of lorart and a torch that sees a GPU", file=sys.stderr
        )
        return 2
    torch.manual_seed(0)
    b = Bench(args)
    sh = shapes(args.quick)
    ceilings = measured_ceilings(b)
    print(f"ops_bench on {b.name}: shapes {sh}, {args.reps} reps (median)")
    print(f"ceilings (datasheet) {H200}; measured here {ceilings or 'n/a'}")
    groups = {"linear": bench_linear, "attention": bench_attention, "lora": bench_lora}
    for name in args.only.split(","):
        groups[name](b, sh, args.quick)
    if ceilings:
        b.records.append({"bench": "ops_bench", "op": "ceilings", "device": b.name, **ceilings})
    out = args.json
    if out is None:
        env = os.environ.get("OUT")
        root = Path(env) if env else Path(__file__).resolve().parents[1] / "results"
        out = root / "ops_bench.jsonl"
    append_records(out, b.records)
    na = sum(r.get("status") == "not available" for r in b.records)
    skipped = sum(r.get("status") == "skipped" for r in b.records)
    print(
        f"ops_bench: {len(b.records)} records, {b.failed} failed checks, {na} not available, "
        f"{skipped} skipped for time"
    )
    return 1 if b.failed else 0


if __name__ == "__main__":
    sys.exit(main())

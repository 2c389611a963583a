"""Load on ``lorart serve`` over loopback: many concurrent streaming clients over many adapters.

For each model (the embedded demo model, and a larger random one: ``--model 110m``) and each
client count (default 64 and 256), every client sends ``--requests`` streaming greedy completions
one after another (token-id prompts, ``ignore_eos`` so every request generates ``--max-tokens``
tokens; request j uses adapter j mod (A + 1), the last slot being the base model). Checked first
and after: no response lost or duplicated (exactly one final chunk and one ``[DONE]`` per
request), and every output equal, token for token, to the same request run alone through the
offline executor. Measured: tokens/s through HTTP over tokens/s of the offline executor running
the same workload in one process (all requests enqueued at once, same batch size and threads),
and client-side time to first token and time per output token (p50 / p99). Bounded: every HTTP
call has a timeout, the whole load ``--time-limit`` seconds, and the server process is killed on
the way out. Prints a table and appends JSON lines to benchmarks/results/serve_load.jsonl.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from bench_util import SHAPES, append_records, device_name

RESULTS = Path(__file__).parent / "results" / "serve_load.jsonl"
DEMO = Path(__file__).resolve().parents[1] / "python" / "lorart" / "assets" / "demo"


def prepare(kind: str, root: Path, num_adapters: int, rank: int) -> tuple[Path, list[Path]]:
    """A model directory (with a tokenizer.json) and `num_adapters` random PEFT adapters."""
    from cpu_forward import build_adapters, build_model

    model_dir = root / "model"
    if kind == "demo":
        shutil.copytree(DEMO / "model", model_dir)
    else:
        build_model(model_dir, SHAPES[kind])
        shutil.copy(DEMO / "model" / "tokenizer.json", model_dir)  # prompts are token ids
    _, dirs = build_adapters(model_dir, root / "adapters", num_adapters, rank)
    return model_dir, dirs


def workload(n: int, num_adapters: int, prompt_len: int, vocab: int) -> list[tuple[list, int]]:
    """(prompt ids, adapter index or -1) of request j; 8 distinct prompts."""
    import numpy as np

    rng = np.random.default_rng(0)
    prompts = [[int(t) for t in rng.integers(3, vocab, prompt_len)] for _ in range(8)]
    return [(prompts[j % 8], j % (num_adapters + 1) - 1) for j in range(n)]


def offline(model_dir: Path, adapters: list[Path], work, max_tokens: int, batch: int, threads):
    """Outputs of each distinct request run alone, and the tokens/s of the whole workload
    enqueued at once, through the executor the server uses."""
    from lorart import lora
    from lorart._core import InferenceRequest, SamplingConfig
    from lorart.llm import LLM

    llm = LLM(
        model_dir,
        num_threads=threads,
        max_batch_size=batch,
        max_seq_len=len(work[0][0]) + max_tokens,
    )
    config = llm.executor.model_config
    pairs = [lora.from_peft(d, config) for d in adapters]

    def request(ids, a):
        r = InferenceRequest(
            ids, max_new_tokens=max_tokens, sampling_config=SamplingConfig(top_k=1), streaming=False
        )
        if a >= 0:
            r.lora_task_id, (r.lora_weights, r.lora_config) = a + 1, pairs[a]
        return r

    def run(requests) -> list[list[int]]:
        ids = [llm.executor.enqueue_request(r) for r in requests]
        out = []
        for rid in ids:
            got = []
            while not got or not got[-1].is_final:
                got += llm.executor.await_responses(rid, timeout=600)
            assert got[-1].error is None, got[-1].error
            out.append(list(got[-1].output_token_ids))
        return out

    try:
        solo = {}
        for ids, a in work:
            key = (tuple(ids), a)
            if key not in solo:
                [solo[key]] = run([request(ids, a)])
        run([request(ids, a) for ids, a in work[: min(len(work), batch)]])  # warm-up
        start = time.perf_counter()
        outs = run([request(ids, a) for ids, a in work])
        seconds = time.perf_counter() - start
    finally:
        llm.shutdown()
    return solo, sum(len(o) for o in outs) / seconds


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    model_dir, adapters, batch, queue, threads, seq_len
) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "lorart",
        "serve",
        "--model_dir",
        str(model_dir),
        "--port",
        str(port),
        "--served-model-name",
        "base",
        "--max-batch-size",
        str(batch),
        "--max-queue",
        str(queue),
        "--max-seq-len",
        str(seq_len),
        "-q",
    ]
    if threads:
        cmd += ["--threads", str(threads)]
    if adapters:
        cmd += ["--lora-modules", *(f"a{i}={d}" for i, d in enumerate(adapters))]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"server did not start: {proc.stderr.read()}")
        time.sleep(0.2)


async def one(client: httpx.AsyncClient, body: dict) -> dict:
    """One streaming request: its token ids, finish chunks, [DONE]s and token times."""
    rec = {"ids": [], "finals": 0, "done": 0, "times": [], "error": None}
    start = time.perf_counter()
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            rec["error"] = f"{r.status_code} {(await r.aread())[:200]!r}"
            return rec
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                rec["done"] += 1
                continue
            event = json.loads(line[6:])
            if "error" in event:
                rec["error"] = event["error"]["message"]
                continue
            for choice in event["choices"]:
                if choice.get("token_ids"):
                    rec["ids"] += choice["token_ids"]
                    rec["times"].append(time.perf_counter() - start)
                if choice["finish_reason"] is not None:
                    rec["finals"] += 1
    return rec


async def load(url: str, work, clients: int, max_tokens: int, time_limit: float):
    per_client = [work[c::clients] for c in range(clients)]
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def run_client(mine):
            out = []
            for ids, a in mine:
                body = {
                    "model": "base" if a < 0 else f"a{a}",
                    "prompt": ids,
                    "max_tokens": max_tokens,
                    "temperature": 0,
                    "ignore_eos": True,
                    "stream": True,
                    "return_token_ids": True,
                }
                out.append(((tuple(ids), a), await one(client, body)))
            return out

        start = time.perf_counter()
        results = await asyncio.wait_for(
            asyncio.gather(*(run_client(m) for m in per_client)), time_limit
        )
        seconds = time.perf_counter() - start
    return [r for rs in results for r in rs], seconds


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))] if values else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", nargs="+", default=["demo", "110m"], choices=["demo", "110m"])
    parser.add_argument("--clients", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--requests", type=int, default=2, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--time-limit", type=float, default=600.0, help="seconds per load run")
    parser.add_argument("--quick", action="store_true", help="demo model, 8 clients, seconds")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.quick:
        args.model, args.clients, args.adapters = ["demo"], [8], 4
    threads = args.threads or len(os.sched_getaffinity(0))
    device = device_name(threads)
    records = []
    print(f"{device}; load average {os.getloadavg()[0]:.2f}")
    header = (
        f"{'model':<6} {'clients':>7} {'requests':>8} {'HTTP tok/s':>10} {'offline':>8} "
        f"{'ratio':>6} {'TTFT p50/p99 ms':>16} {'TPOT p50/p99 ms':>16} {'client CPU':>10}"
    )
    rows = []
    for kind in args.model:
        with tempfile.TemporaryDirectory() as tmp:
            model_dir, adapters = prepare(kind, Path(tmp), args.adapters, args.rank)
            vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
            seq_len = args.prompt_len + args.max_tokens
            for clients in args.clients:
                work = workload(clients * args.requests, args.adapters, args.prompt_len, vocab)
                solo, offline_tps = offline(
                    model_dir, adapters, work, args.max_tokens, args.max_batch_size, threads
                )
                proc, url = start_server(
                    model_dir, adapters, args.max_batch_size, len(work) + 8, threads, seq_len
                )
                cpu0 = time.process_time()
                try:
                    results, seconds = asyncio.run(
                        load(url, work, clients, args.max_tokens, args.time_limit)
                    )
                    client_cpu = (time.process_time() - cpu0) / seconds
                finally:
                    proc.terminate()
                    try:
                        proc.wait(60)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                errors = [r["error"] for _, r in results if r["error"]]
                lost = sum(r["finals"] == 0 or r["done"] != 1 for _, r in results)
                duplicated = sum(r["finals"] > 1 or r["done"] > 1 for _, r in results)
                wrong = sum(r["ids"] != solo[key] for key, r in results)
                if errors or lost or duplicated or wrong or len(results) != len(work):
                    raise SystemExit(
                        f"check failed ({kind}, {clients} clients): {len(errors)} errors "
                        f"{errors[:2]}, {lost} lost, {duplicated} duplicated, {wrong} outputs "
                        "unlike their solo run"
                    )
                tokens = sum(len(r["ids"]) for _, r in results)
                tps = tokens / seconds
                ttft = [r["times"][0] * 1e3 for _, r in results]
                tpot = [
                    (r["times"][-1] - r["times"][0]) / (len(r["ids"]) - 1) * 1e3
                    for _, r in results
                    if len(r["ids"]) > 1
                ]
                row = dict(
                    model=kind,
                    clients=clients,
                    requests=len(work),
                    tps=tps,
                    offline=offline_tps,
                    ratio=tps / offline_tps,
                    ttft=(statistics.median(ttft), percentile(ttft, 0.99)),
                    tpot=(statistics.median(tpot), percentile(tpot, 0.99)),
                    client_cpu=client_cpu,
                )
                rows.append(row)
                print(
                    f"  checked {kind} x {clients} clients: {len(work)} requests, 0 lost, "
                    f"0 duplicated, every output equal to its solo run"
                )
                base = dict(bench=f"serve_load_{kind}", device=device)
                case = f"{clients} streaming clients, {args.adapters} adapters + base"
                records += [
                    dict(
                        base,
                        case=case,
                        metric="http_throughput",
                        value=round(tps, 2),
                        unit="tokens/s",
                        baseline="offline executor, same workload",
                        baseline_value=round(offline_tps, 2),
                        ratio=round(tps / offline_tps, 4),
                    ),
                    dict(
                        base,
                        case=case,
                        metric="ttft_p50_ms",
                        value=round(row["ttft"][0], 2),
                        unit="ms",
                    ),
                    dict(
                        base,
                        case=case,
                        metric="ttft_p99_ms",
                        value=round(row["ttft"][1], 2),
                        unit="ms",
                    ),
                    dict(
                        base,
                        case=case,
                        metric="tpot_p50_ms",
                        value=round(row["tpot"][0], 2),
                        unit="ms",
                    ),
                    dict(
                        base,
                        case=case,
                        metric="tpot_p99_ms",
                        value=round(row["tpot"][1], 2),
                        unit="ms",
                    ),
                ]
    print()
    print(header)
    for r in rows:
        print(
            f"{r['model']:<6} {r['clients']:>7} {r['requests']:>8} {r['tps']:>10.1f} "
            f"{r['offline']:>8.1f} {r['ratio']:>6.2f} "
            f"{r['ttft'][0]:>7.1f} / {r['ttft'][1]:>6.1f} "
            f"{r['tpot'][0]:>7.1f} / {r['tpot'][1]:>6.1f} {r['client_cpu']:>10.2f}"
        )
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    print("(client CPU: cores the load generator itself used, on the same machine as the server)")
    append_records(args.out, records)


if __name__ == "__main__":
    main()

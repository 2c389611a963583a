"""Decode on a shared machine: the executor's thread settings with and without busy neighbours.

OpenMP threads that spin while they wait for each other collapse when other processes use the
cores: a thread that the OS has descheduled holds up every barrier of the step. This script
measures decode tokens/s of one request through ``lorart.Executor`` (batch 1, greedy; the step
time the decode tokens add, from ``stats()["busy_seconds"]``) on a random
Llama-shaped checkpoint, for each OpenMP wait policy (each in its own process: libgomp reads it
once, at start-up) and thread count, first alone and then beside ``--neighbours`` processes that
spin on the CPU (default: one per available CPU, like a parallel build next door):

- wait ``spin``: libgomp's own default (GOMP_SPINCOUNT=300000: spin ~0.1-1 ms, then sleep);
- wait ``passive``: OMP_WAIT_POLICY=PASSIVE (sleep at once);
- wait ``short``: GOMP_SPINCOUNT=10000 (a short spin, then sleep): what ``import lorart`` sets
  when the user set neither variable;
- threads ``auto`` (ExecutorConfig.num_threads=0: the CPUs available to the process), 1, 2.

Before timing, every case's greedy tokens are checked against ``lorart.model.Model.
generate_greedy`` on the same weights. Prints a table and appends JSON lines to
benchmarks/results/shared_machine.jsonl (ratio = tokens/s against libgomp's default spin with the
same threads and neighbours; for the spin cases beside neighbours, against the same case alone).
Cases run round-robin (the median of ``--repeats`` rounds), so that whatever else the machine
runs slows them alike. ``--model 1.1b`` is the issue's shape (hidden 2048, intermediate 5632, 22
layers, 32/4 heads, vocab 32000; 4.4 GB in float32 per policy's process, about 5 minutes on 2
cores); the default ``small`` (156M parameters) takes 2-3 minutes; ``--quick`` seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results" / "shared_machine.jsonl"
SHAPES = {
    "1.1b": dict(hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4, vocab=32000),
    "small": dict(hidden=1024, intermediate=2816, layers=8, heads=16, kv_heads=4, vocab=32000),
    "tiny": dict(hidden=128, intermediate=256, layers=2, heads=4, kv_heads=2, vocab=1000),
}
POLICIES = {
    "spin": {"GOMP_SPINCOUNT": "300000"},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "short": {"GOMP_SPINCOUNT": "10000"},
}
PROMPT = [1, 415, 293, 906, 285, 114, 287, 13]  # within every shape's vocabulary


def write_checkpoint(out: Path, shape: dict, seed: int = 0) -> int:
    """A random Llama checkpoint in bfloat16 (config.json + model.safetensors), written tensor by
    tensor so that no more than one tensor is in memory. Returns the parameter count."""
    import ml_dtypes

    h, inter, v = shape["hidden"], shape["intermediate"], shape["vocab"]
    head_dim = h // shape["heads"]
    kv = shape["kv_heads"] * head_dim
    tensors = [("model.embed_tokens.weight", (v, h)), ("model.norm.weight", (h,))]
    for i in range(shape["layers"]):
        p = f"model.layers.{i}."
        tensors += [
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "mlp.gate_proj.weight", (inter, h)),
            (p + "mlp.up_proj.weight", (inter, h)),
            (p + "mlp.down_proj.weight", (h, inter)),
        ]
    tensors.append(("lm_head.weight", (v, h)))
    header, offset = {}, 0
    for name, dims in tensors:
        size = int(np.prod(dims)) * 2
        header[name] = {
            "dtype": "BF16",
            "shape": list(dims),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, dims in tensors:
            if name.endswith("norm.weight"):
                values = np.ones(dims, np.float32)
            else:
                values = rng.standard_normal(dims, dtype=np.float32) * 0.02
            f.write(values.astype(ml_dtypes.bfloat16).tobytes())
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": h,
        "intermediate_size": inter,
        "num_hidden_layers": shape["layers"],
        "num_attention_heads": shape["heads"],
        "num_key_value_heads": shape["kv_heads"],
        "vocab_size": v,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "torch_dtype": "bfloat16",
        "tie_word_embeddings": False,
    }
    (out / "config.json").write_text(json.dumps(config))
    return sum(int(np.prod(d)) for _, d in tensors)


def start_neighbours(count: int) -> list[subprocess.Popen]:
    """`count` processes that spin on the CPU at the benchmark's own priority."""
    spin = "import time\nwhile True:\n    pass\n"
    procs = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(count)]
    time.sleep(0.5)  # let the scheduler spread them
    return procs


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()


def run_request(exe, new_tokens: int) -> tuple[float, list[int]]:
    """Seconds the executor's steps took for one greedy request (stats()["busy_seconds"]: the
    forwards and sampling, without the caller's wake-ups), and its tokens."""
    from lorart import InferenceRequest, SamplingConfig

    busy = exe.stats()["busy_seconds"]
    rid = exe.enqueue_request(
        InferenceRequest(PROMPT, max_new_tokens=new_tokens, sampling_config=SamplingConfig(top_k=1))
    )
    final = exe.await_responses(rid, timeout=600)[-1]
    assert final.finish_reason == "length", final.error
    return exe.stats()["busy_seconds"] - busy, list(final.output_token_ids)


def decode_rate(exe, tokens: int) -> tuple[float, list[int]]:
    """Decode tokens/s: `tokens` more generated tokens over the step time they add to a request
    (one of 1 + tokens new tokens against one of 1 new token: the prefill step alone)."""
    prefill, _ = run_request(exe, 1)
    full, out = run_request(exe, tokens + 1)
    return tokens / max(full - prefill, 1e-9), out


def worker(args) -> None:
    """One wait policy (set in this process's environment). Loads the model, checks every thread
    count's greedy tokens against Model.generate_greedy, prints "ready", then answers each stdin
    line "THREADS" with one JSON measurement (the parent runs the neighbours)."""
    from lorart import _core
    from lorart.model import Model, load_core_model

    core = load_core_model(args.model_dir, max_num_tokens=64, max_lora_rank=8, progress=False)
    blocks = (len(PROMPT) + args.tokens + 1) // 16 + 2
    reference = Model(core, num_kv_blocks=blocks, block_size=16).generate_greedy(
        [PROMPT], max_new_tokens=args.tokens + 1
    )[0]
    executors = {}  # one per thread count; idle while another runs (one forward at a time)
    for threads in args.threads:
        config = _core.ExecutorConfig(
            max_batch_size=1,
            max_num_tokens=64,
            max_lora_rank=8,
            num_threads=threads,
            kv_cache=_core.KvCacheConfig(block_size=16, max_tokens=16 * blocks),
        )
        executors[threads] = exe = _core.Executor(core, config)
        _, tokens = run_request(exe, args.tokens + 1)
        assert tokens == list(reference), (threads, tokens, reference)
    print("ready", flush=True)
    for line in sys.stdin:
        exe = executors[int(line)]
        rate, tokens = decode_rate(exe, args.tokens)
        assert tokens == list(reference), (tokens, reference)
        print(json.dumps(dict(tok_s=rate, used_threads=exe.stats()["num_threads"])), flush=True)
    for exe in executors.values():
        exe.shutdown()


def start_worker(policy: str, args) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(POLICIES[policy])
    env.pop("OMP_NUM_THREADS", None)
    cmd = [sys.executable, __file__, "--worker", "--model-dir", str(args.model_dir)]
    cmd += ["--tokens", str(args.tokens), "--threads", *map(str, args.threads)]
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    if proc.stdout.readline().strip() != "ready":
        sys.exit(f"the {policy} worker failed (its error is above)")
    return proc


def measure(proc: subprocess.Popen, threads: int) -> dict:
    proc.stdin.write(f"{threads}\n")
    proc.stdin.flush()
    return json.loads(proc.stdout.readline())


def run_cases(args, policies: list[str]) -> list[dict]:
    """Every (policy, threads, neighbours) case, round-robin over `repeats` rounds so that
    whatever else the machine runs slows every case alike; the median of each."""
    cases = [(p, t, n) for p in policies for t in args.threads for n in (0, args.neighbours)]
    rates: dict = {case: [] for case in cases}
    used: dict = {}
    workers = {p: start_worker(p, args) for p in policies}
    try:
        for r in range(args.repeats):
            shift = r % len(cases)
            for policy, threads, neighbours in cases[shift:] + cases[:shift]:
                procs = start_neighbours(neighbours)
                try:
                    got = measure(workers[policy], threads)
                finally:
                    stop(procs)
                rates[(policy, threads, neighbours)].append(got["tok_s"])
                used[(policy, threads)] = got["used_threads"]
    finally:
        for proc in workers.values():
            proc.stdin.close()
            proc.wait()
    return [
        dict(
            policy=p,
            threads=t,
            neighbours=n,
            tok_s=statistics.median(rates[(p, t, n)]),
            used_threads=used[(p, t)],
        )
        for p, t, n in cases
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(SHAPES), default="small")
    parser.add_argument("--model-dir", type=Path, default=None, help="reuse this checkpoint")
    parser.add_argument("--tokens", type=int, default=None, help="decode tokens per timing")
    parser.add_argument("--repeats", type=int, default=5, help="rounds over all cases (median)")
    parser.add_argument("--neighbours", type=int, default=None, help="default: available CPUs")
    parser.add_argument("--threads", type=int, nargs="+", default=None, help="0 = auto")
    parser.add_argument("--policies", nargs="+", choices=sorted(POLICIES), default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    import lorart

    cpus = lorart._core.available_cpus()
    if args.quick:
        args.model, args.repeats = "tiny", 2
    args.tokens = args.tokens or (64 if args.quick else 16)
    args.neighbours = cpus if args.neighbours is None else args.neighbours
    args.threads = args.threads or sorted({0, 1, 2} - ({cpus} if cpus <= 2 else set()))
    policies = args.policies or list(POLICIES)
    with tempfile.TemporaryDirectory() as tmp:
        if args.model_dir is None:
            args.model_dir = Path(tmp)
            start = time.perf_counter()
            params = write_checkpoint(args.model_dir, SHAPES[args.model])
            print(
                f"{args.model}: {params / 1e6:.0f}M parameters written in "
                f"{time.perf_counter() - start:.0f} s",
                flush=True,
            )
        rows = run_cases(args, policies)
    print(
        f"\n{args.model} model, {cpus} CPUs available, {args.neighbours} spinning neighbours, "
        f"median of {args.repeats} rounds, load average {os.getloadavg()[0]:.1f} at the end"
    )
    print(
        f"{'wait':<9}{'threads':>8}{'alone tok/s':>13}{'vs spin':>9}{'busy tok/s':>12}"
        f"{'vs spin':>9}{'busy/alone':>12}"
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    device = f"cpu ({platform.machine()}, {cpus} CPUs)"

    def row(policy: str, threads: int, neighbours: int) -> dict:
        return next(
            r
            for r in rows
            if (r["policy"], r["threads"], r["neighbours"]) == (policy, threads, neighbours)
        )

    with open(RESULTS, "a", encoding="utf-8") as out:
        for policy in policies:
            for threads in args.threads:
                alone, busy = row(policy, threads, 0), row(policy, threads, args.neighbours)
                label = f"auto={alone['used_threads']}" if threads == 0 else str(threads)
                line = f"{policy:<9}{label:>8}"
                for r in (alone, busy):
                    spin = row("spin", threads, r["neighbours"]) if "spin" in policies else None
                    versus = f"{r['tok_s'] / spin['tok_s']:.2f}x" if spin else "-"
                    line += f"{r['tok_s']:>{13 if r is alone else 12}.2f}{versus:>9}"
                    record = dict(
                        bench="shared_machine",
                        case=f"{args.model}/wait-{policy}/threads-{label}/neighbours-{r['neighbours']}",
                        device=device,
                        metric="decode_tokens_per_s",
                        value=r["tok_s"],
                        unit="tok/s",
                    )
                    if spin is not None and policy != "spin":
                        record.update(
                            baseline="wait-spin, same threads and neighbours",
                            baseline_value=spin["tok_s"],
                            ratio=r["tok_s"] / spin["tok_s"],
                        )
                    elif r is busy:
                        record.update(
                            baseline="same case without neighbours",
                            baseline_value=alone["tok_s"],
                            ratio=busy["tok_s"] / alone["tok_s"],
                        )
                    out.write(json.dumps(record) + "\n")
                print(line + f"{busy['tok_s'] / alone['tok_s']:>12.2f}")
    print(f"appended to {RESULTS}")


if __name__ == "__main__":
    main()

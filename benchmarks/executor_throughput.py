"""Executor throughput with many adapters: requests/s and generated tokens/s.

For 1, 8, 64 and 512 distinct LoRA adapters (uniform and skewed popularity) behind a device
cache that holds 8 of them, a fixed set of requests (each picks an adapter) runs through
``lorart.Executor``; throughput is compared with the 8-adapter run of the same distribution
(target on CPU: 512 adapters >= 0.8x the 8-adapter throughput). Cases run round-robin and the
best of ``--repeats`` runs is kept. Models: the embedded demo model
and a ~100M-parameter Llama-shaped random model. Before timing, greedy outputs of a few requests
are checked against ``lorart.model.Model.generate_greedy`` with the same adapter (a separate code
path without the scheduler, cache or sampler). Prints a table and appends JSON lines to
benchmarks/results/executor_throughput.jsonl. ``--quick`` is a seconds-long smoke run.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

import lorart
import lorart.demo
from lorart import lora
from lorart.model import Model

RESULTS = Path(__file__).parent / "results" / "executor_throughput.jsonl"
DEMO_MODEL = lorart.demo.DEMO / "model"


def random_adapters(config: lorart.ModelConfig, count: int, rank: int, seed: int):
    """`count` adapters of rank `rank` on q and v of every layer (scaled small, like trained B)."""
    rng = np.random.default_rng(seed)
    adapters = []
    for _ in range(count):
        rows = []
        for layer in range(config.num_layers):
            for module in (1, 3):
                hi, ho = config.lora_module_dims(module)
                a = rng.standard_normal((rank, hi), dtype=np.float32) / np.sqrt(hi)
                b = rng.standard_normal((ho, rank), dtype=np.float32) * 0.02
                rows.append(lora.LoraRow(module, layer, a, b))
        adapters.append(lora.pack(rows))
    return adapters


def choose(num_adapters: int, num_requests: int, skewed: bool, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    if not skewed:
        return rng.integers(0, num_adapters, num_requests).tolist()
    weights = 1.0 / np.arange(1, num_adapters + 1) ** 1.1  # Zipf-like: a few hot adapters
    return rng.choice(num_adapters, num_requests, p=weights / weights.sum()).tolist()


def run_workload(exe: lorart.Executor, adapters, picks, prompts, max_new_tokens: int):
    """Enqueue everything, wait for everything; returns (seconds, generated tokens, outputs)."""
    start = time.perf_counter()
    ids = []
    for prompt, pick in zip(prompts, picks, strict=True):
        request = lorart.InferenceRequest(
            prompt,
            max_new_tokens=max_new_tokens,
            sampling_config=lorart.SamplingConfig(top_k=1),
            lora_task_id=pick,
        )
        if not exe.contains_lora_task(pick):  # first use (or evicted from the host level)
            request.lora_weights, request.lora_config = adapters[pick]
        ids.append(exe.enqueue_request(request))
    outputs = []
    for rid in ids:
        final = exe.await_responses(rid)[-1]
        if final.error is not None:
            raise RuntimeError(final.error)
        outputs.append(list(final.output_token_ids))
    seconds = time.perf_counter() - start
    return seconds, sum(len(o) for o in outputs), outputs


def bench_model(name: str, model_dir: Path, args) -> list[dict]:
    config = lorart.hf.load_config(model_dir)
    counts = [1, 8] if args.quick else [1, 8, 64, 512]
    adapters = random_adapters(config, max(counts), args.rank, seed=0)
    adapter_bytes = adapters[0][0].nbytes
    rng = np.random.default_rng(1)
    prompts = [
        rng.integers(3, config.vocab_size, args.prompt_len).tolist() for _ in range(args.requests)
    ]
    cfg = lorart.ExecutorConfig(
        max_batch_size=args.batch,
        max_num_tokens=1024,
        max_seq_len=min(512, config.max_position_embeddings),
        max_lora_rank=args.rank,
        lora_cache=lorart.LoraCacheConfig(
            host_cache_bytes=(max(counts) + 1) * adapter_bytes * 2,
            device_cache_bytes=8 * adapter_bytes,
        ),
        kv_cache=lorart.KvCacheConfig(block_size=16, max_tokens=args.batch * 2 * 512),
    )
    rows = []
    with lorart.Executor(model_dir, cfg) as exe:
        # Check before timing: executor outputs equal the plain model's greedy outputs.
        picks = choose(8, 4, False, seed=2)
        _, _, got = run_workload(exe, adapters, picks, prompts[:4], args.new_tokens)
        reference = Model.from_pretrained(
            model_dir,
            max_num_tokens=1024,
            num_kv_blocks=128,
            max_lora_rank=args.rank,
            progress=False,
        )
        slots = {p: reference.add_adapter(*adapters[p]) for p in set(picks)}
        want = [
            reference.generate_greedy([prompts[i]], args.new_tokens, [slots[p]])[0]
            for i, p in enumerate(picks)
        ]
        if got != want:
            raise SystemExit(f"{name}: executor output differs from Model.generate_greedy")
        del reference
        for skewed in (False, True):
            # Cases run round-robin, best of `repeats`: a shared machine drifts over minutes,
            # and a fixed order would charge the drift to the later (larger) adapter counts.
            best: dict[int, tuple[float, int]] = {}
            for _ in range(args.repeats):
                for count in counts:
                    picks = choose(count, args.requests, skewed, seed=count)
                    seconds, tokens, _ = run_workload(
                        exe, adapters, picks, prompts, args.new_tokens
                    )
                    if count not in best or seconds < best[count][0]:
                        best[count] = (seconds, tokens)
            base_tps = best[8][1] / best[8][0] if 8 in best else None
            for count in counts:
                seconds, tokens = best[count]
                rows.append(
                    dict(
                        model=name,
                        adapters=count,
                        popularity="skewed" if skewed else "uniform",
                        rps=args.requests / seconds,
                        tps=tokens / seconds,
                        ratio_vs_8=tokens / seconds / base_tps if base_tps else None,
                        baseline_tps=base_tps,
                    )
                )
        stats = exe.stats()
    print(f"[{name}] lora cache after the runs: {stats['lora_cache']}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    parser.add_argument("--requests", type=int, default=None)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--skip-big", action="store_true", help="only the demo model")
    parser.add_argument("--repeats", type=int, default=2, help="runs per case (best is kept)")
    args = parser.parse_args()
    args.requests = args.requests or (16 if args.quick else 256)
    models = [("demo", DEMO_MODEL)]
    with tempfile.TemporaryDirectory() as tmp:
        if not (args.quick or args.skip_big):
            from cpu_forward import FULL, build_model  # torch only when the big model runs

            build_model(Path(tmp), {**FULL["model"], "tie_word_embeddings": False})
            models.append(("llama-100m", Path(tmp)))
        rows = [row for name, path in models for row in bench_model(name, path, args)]
    print(
        f"\n{'model':<11}{'adapters':>9} {'popularity':<9}{'req/s':>9}{'tok/s':>10}"
        f"{'vs 8 adapters':>15}"
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS, "a", encoding="utf-8") as out:
        for r in rows:
            ratio = f"{r['ratio_vs_8']:.2f}x" if r["ratio_vs_8"] is not None else "-"
            print(
                f"{r['model']:<11}{r['adapters']:>9} {r['popularity']:<9}{r['rps']:>9.2f}"
                f"{r['tps']:>10.1f}{ratio:>15}"
            )
            case = f"{r['model']}/{r['adapters']}-adapters/{r['popularity']}"
            for metric, value, unit in (
                ("requests_per_s", r["rps"], "req/s"),
                ("tokens_per_s", r["tps"], "tok/s"),
            ):
                record = dict(
                    bench="executor_throughput",
                    case=case,
                    device=f"cpu ({platform.machine()})",
                    metric=metric,
                    value=value,
                    unit=unit,
                )
                if r["ratio_vs_8"] is not None and metric == "tokens_per_s":
                    record.update(
                        baseline="8 adapters, same popularity",
                        baseline_value=r["baseline_tps"],
                        ratio=r["ratio_vs_8"],
                    )
                out.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()

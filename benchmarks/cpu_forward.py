"""CPU forward throughput of lorart.model.Model against transformers (+ peft), float32.

A ~110M-parameter Llama-shaped random model (hidden 768, intermediate 2048, 12 layers, 12 heads,
vocab 32000, tied embeddings) is saved to a temporary directory; eight rank-16 PEFT adapters on
all seven projections are drawn for it. Measured, for lorart and for transformers on the same
weights with the same thread count:

- prefill tokens/s: 8 prompts x 128 tokens in one forward (last-token logits only on both sides);
- decode tokens/s at batch 1 and 8, one token per sequence per step over a cached context
  (lorart: paged KV cache; transformers: its DynamicCache);

each with LoRA off and with LoRA on (every sequence its own adapter; transformers+peft runs the
mixed batch through ``adapter_names``). Prefill is the best of 5 runs, decode the median step of
32, so that a busy neighbour on a shared machine skews the numbers less. Before timing,
last-token logits of the prefill and of two decode steps are checked against transformers.
Prints a table and appends JSON lines to benchmarks/results/cpu_forward.jsonl (ratio = lorart /
transformers, and LoRA overhead rows with ratio = LoRA on / LoRA off). ``--quick`` runs a tiny
configuration in seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import lorart
from lorart.model import Model, SequenceChunk

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BLOCK = 16
RESULTS = Path(__file__).parent / "results" / "cpu_forward.jsonl"

FULL = dict(
    model=dict(
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=12,
        vocab_size=32000,
        tie_word_embeddings=True,
        max_position_embeddings=2048,
    ),
    num_prompts=8,
    prompt_len=128,
    decode_batches=(1, 8),
    decode_steps=32,
    num_adapters=8,
    rank=16,
    repeats=5,
)
QUICK = dict(
    model=dict(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
        tie_word_embeddings=True,
        max_position_embeddings=512,
    ),
    num_prompts=4,
    prompt_len=32,
    decode_batches=(1, 4),
    decode_steps=4,
    num_adapters=4,
    rank=16,
    repeats=1,
)


# ----------------------------------------------------------------------------- setup


def build_model(out_dir: Path, model_kw: dict) -> int:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(bos_token_id=None, eos_token_id=None, **model_kw))
    model.save_pretrained(out_dir)
    return sum(p.numel() for p in model.parameters())


def build_adapters(model_dir: Path, out_dir: Path, num: int, rank: int):
    """A PeftModel holding adapters a0..a{num-1} (random A and B), each also saved to out_dir/ai.
    Returns (peft_model, [adapter dirs])."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=PROJECTIONS)
    peft_model = get_peft_model(base, config, adapter_name="a0")
    for i in range(1, num):
        peft_model.add_adapter(f"a{i}", config)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in sorted(peft_model.named_parameters()):
            if "lora_" in name:
                param.normal_(0.0, 0.05, generator=gen)
    dirs = []
    for i in range(num):
        peft_model.save_pretrained(str(out_dir), selected_adapters=[f"a{i}"])
        found = [p.parent for p in out_dir.rglob("adapter_config.json") if f"a{i}" in p.parts]
        assert len(found) == 1, found
        dirs.append(found[0])
    return peft_model.eval(), dirs


def prompts_for(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(0, vocab, length)] for _ in range(n)]


# ----------------------------------------------------------------------------- the two runners


class Lorart:
    name = "lorart"

    def __init__(self, model: Model, slots: list[int], max_len: int):
        self.model, self.slots = model, slots
        per_seq = -(-max_len // BLOCK)
        self.tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(len(slots))]

    def prefill(self, prompts, lora: bool) -> np.ndarray:
        self.ctx = [len(p) for p in prompts]
        self.lora = lora
        chunks = [
            SequenceChunk(
                token_ids=p,
                context_len=0,
                block_table=self.tables[i],
                lora_slot=self.slots[i] if lora else -1,
                all_logits=False,
            )
            for i, p in enumerate(prompts)
        ]
        return np.concatenate(self.model.forward(chunks))

    def decode(self, next_tokens) -> np.ndarray:
        chunks = [
            SequenceChunk(
                token_ids=[int(t)],
                context_len=self.ctx[i],
                block_table=self.tables[i],
                lora_slot=self.slots[i] if self.lora else -1,
                all_logits=False,
            )
            for i, t in enumerate(next_tokens)
        ]
        out = np.concatenate(self.model.forward(chunks))
        self.ctx = [c + 1 for c in self.ctx]
        return out


class Transformers:
    name = "transformers"

    def __init__(self, base, peft_model, adapter_names: list[str]):
        self.base, self.peft_model, self.names = base, peft_model, adapter_names

    @torch.inference_mode()
    def prefill(self, prompts, lora: bool) -> np.ndarray:
        self.model = self.peft_model if lora else self.base
        self.kw = {"adapter_names": self.names[: len(prompts)]} if lora else {}
        ids = torch.tensor(prompts, dtype=torch.long)
        out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1, **self.kw)
        self.cache = out.past_key_values
        return out.logits[:, -1].numpy()

    @torch.inference_mode()
    def decode(self, next_tokens) -> np.ndarray:
        ids = torch.tensor([[int(t)] for t in next_tokens], dtype=torch.long)
        out = self.model(input_ids=ids, past_key_values=self.cache, use_cache=True, **self.kw)
        self.cache = out.past_key_values
        return out.logits[:, -1].numpy()


# ----------------------------------------------------------------------------- check, then time


def check(runners, prompts, lora: bool, what: str) -> None:
    """Last-token logits of the prefill and of two decode steps agree with transformers."""
    ours, ref = runners
    tol = 1e-3
    a, b = ours.prefill(prompts, lora), ref.prefill(prompts, lora)
    errs = [float(np.max(np.abs(a - b)))]
    for _ in range(2):
        tokens = np.argmax(b, axis=-1)
        a, b = ours.decode(tokens), ref.decode(tokens)
        errs.append(float(np.max(np.abs(a - b))))
    scale = max(1.0, float(np.max(np.abs(b))))
    if max(errs) > tol * scale:
        raise SystemExit(f"check failed ({what}): max |lorart - transformers| per step = {errs}")
    print(
        f"  check {what}: max |lorart - transformers| = {max(errs):.2e} (logits up to {scale:.2f})"
    )


def time_prefill(runner, prompts, lora: bool, repeats: int) -> float:
    """Tokens/s of the fastest of `repeats` runs (after a warm-up)."""
    runner.prefill(prompts, lora)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        runner.prefill(prompts, lora)
        times.append(time.perf_counter() - t0)
    return sum(len(p) for p in prompts) / min(times)


def time_decode(runner, prompts, lora: bool, steps: int) -> float:
    """Tokens/s from the median step time (robust to a stray busy neighbour on a shared CPU)."""
    logits = runner.prefill(prompts, lora)
    logits = runner.decode(np.argmax(logits, axis=-1))  # warm-up step
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        logits = runner.decode(np.argmax(logits, axis=-1))
        times.append(time.perf_counter() - t0)
    return len(prompts) / statistics.median(times)


# ----------------------------------------------------------------------------- main


def device_name() -> str:
    model = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu ({model}, {os.cpu_count()} threads)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, a few seconds")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON lines file (appended)")
    args = parser.parse_args()
    cfg = QUICK if args.quick else FULL
    bench = "cpu_forward_quick" if args.quick else "cpu_forward"
    torch.set_num_threads(os.cpu_count() or 1)
    device = device_name()
    import peft
    import transformers

    baseline = (
        f"transformers {transformers.__version__} + peft {peft.__version__} "
        f"(torch {torch.__version__}, {torch.get_num_threads()} threads)"
    )
    n, length, steps = cfg["num_prompts"], cfg["prompt_len"], cfg["decode_steps"]
    max_len = length + steps + 2

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        num_params = build_model(tmp / "model", cfg["model"])
        peft_model, adapter_dirs = build_adapters(
            tmp / "model", tmp / "adapters", cfg["num_adapters"], cfg["rank"]
        )
        from transformers import AutoModelForCausalLM

        hf_base = AutoModelForCausalLM.from_pretrained(str(tmp / "model"), dtype=torch.float32)
        hf_base.eval()
        model = Model.from_pretrained(
            str(tmp / "model"),
            max_num_tokens=max(n * length, 256),
            num_kv_blocks=n * -(-max_len // BLOCK) + 1,
            block_size=BLOCK,
        )
        slots = []
        for d in adapter_dirs:
            weights, config = lorart.lora.from_peft(str(d), model.config)
            slots.append(model.add_adapter(weights, config))
        # Sequence i uses adapter i (mod the number of adapters) on both sides.
        seq_slots = [slots[i % len(slots)] for i in range(n)]
        names = [f"a{i % len(slots)}" for i in range(n)]
        setup_s = time.perf_counter() - t0
        print(
            f"model: {num_params / 1e6:.1f}M parameters, {cfg['num_adapters']} adapters of rank "
            f"{cfg['rank']} on {len(PROJECTIONS)} projections; setup {setup_s:.1f}s"
        )
        print(f"device: {device}; baseline: {baseline}")
        load = os.getloadavg()[0]
        if load > 0.5:
            print(f"warning: load average {load:.2f} before timing; other work may skew results")

        runners = (Lorart(model, seq_slots, max_len), Transformers(hf_base, peft_model, names))
        vocab = cfg["model"]["vocab_size"]
        prompts = prompts_for(n, length, vocab)
        for lora in (False, True):
            check(runners, prompts, lora, "LoRA" if lora else "base")

        rows = []  # (case, metric, unit, {runner: value})
        for lora in (False, True):
            tag = f"{len(set(names))} adapters r{cfg['rank']}" if lora else "base"
            vals = {r.name: time_prefill(r, prompts, lora, cfg["repeats"]) for r in runners}
            rows.append((f"prefill {n}x{length} {tag}", "prefill_throughput", "tokens/s", vals))
            for batch in cfg["decode_batches"]:
                decode_prompts = prompts_for(batch, length, vocab, seed=batch)
                vals = {r.name: time_decode(r, decode_prompts, lora, steps) for r in runners}
                tag_b = f"{batch} adapters r{cfg['rank']}" if lora and batch > 1 else tag
                if lora and batch == 1:
                    tag_b = f"1 adapter r{cfg['rank']}"
                rows.append(
                    (f"decode b{batch} ctx{length} {tag_b}", "decode_throughput", "tokens/s", vals)
                )

    report(rows, bench, device, baseline, args.out)


def report(rows, bench: str, device: str, baseline: str, out: Path) -> None:
    records = []
    print(f"\n{'case':<40} {'lorart':>12} {'transformers':>13} {'ratio':>7}")
    for case, metric, unit, vals in rows:
        ours, ref = vals["lorart"], vals["transformers"]
        print(f"{case:<40} {ours:>12.1f} {ref:>13.1f} {ours / ref:>7.2f}   {unit}")
        records.append(
            dict(
                bench=bench,
                case=case,
                device=device,
                metric=metric,
                value=round(ours, 3),
                unit=unit,
                baseline=baseline,
                baseline_value=round(ref, 3),
                ratio=round(ours / ref, 4),
            )
        )
    # LoRA overhead: each LoRA row against the base row of the same shape.
    half = len(rows) // 2
    print(f"\n{'LoRA on / LoRA off (throughput)':<40} {'lorart':>12} {'transformers':>13}")
    for (case_b, metric, unit, base), (case_l, _, _, with_lora) in zip(
        rows[:half], rows[half:], strict=True
    ):
        ours = with_lora["lorart"] / base["lorart"]
        ref = with_lora["transformers"] / base["transformers"]
        print(f"{case_l:<40} {ours:>12.2f} {ref:>13.2f}")
        records.append(
            dict(
                bench=bench,
                case=f"{case_l} vs base",
                device=device,
                metric=f"lora_overhead_{metric}",
                value=round(with_lora["lorart"], 3),
                unit=unit,
                baseline=f"lorart {case_b}",
                baseline_value=round(base["lorart"], 3),
                ratio=round(ours, 4),
            )
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    print(f"\nwrote {len(records)} records to {out}")


if __name__ == "__main__":
    main()

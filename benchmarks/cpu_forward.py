"""CPU forward throughput of lorart.model.Model against transformers (+ peft), float32.

A ~110M-parameter Llama-shaped random model (hidden 768, intermediate 2048, 12 layers, 12 heads,
vocab 32000, tied embeddings) is saved to a temporary directory; eight rank-16 PEFT adapters on
all seven projections are drawn for it. Measured, for lorart and for transformers on the same
weights with the same thread count:

- prefill tokens/s: 8 prompts x 128 tokens in one forward (last-token logits only on both sides);
- decode tokens/s at batch 1 and 8, one token per sequence per step over a cached context
  (lorart: paged KV cache; transformers: its DynamicCache);

each with LoRA off and with LoRA on (every sequence its own adapter; transformers+peft runs the
mixed batch through ``adapter_names``). lorart runs the adapters twice: stored in float32, and
stored in bfloat16 as TensorRT-LLM-style LoraWeights usually arrive (the adapters' values are
drawn bf16-exact with scaling 2, so both runs, and peft's float32 run, compute with the same
values; lorart widens bf16 to float32 in its kernels).

All variants of a case are timed round-robin (one prefill, or one decode step, of each in turn),
so a busy neighbour on a shared machine slows them alike; prefill keeps the best of 5 rounds,
decode the median of 32 steps. Before timing, last-token logits of the prefill and of two decode
steps are checked against transformers. Prints a table and appends JSON lines to
benchmarks/results/cpu_forward.jsonl (ratio = lorart / transformers, and LoRA overhead rows with
ratio = LoRA on / LoRA off). ``--quick`` runs a tiny configuration in seconds.
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
                param.copy_(param.to(torch.bfloat16).float())  # bf16-exact; scaling 2 keeps it
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
    """lorart with LoRA off (slots None) or each sequence on its slot; owns KV blocks
    [first_block, first_block + num_seqs * per_seq) so variants can interleave."""

    name = "lorart"

    def __init__(self, model: Model, num_seqs: int, slots, first_block: int, per_seq: int):
        self.model = model
        self.slots = slots if slots is not None else [-1] * num_seqs
        self.tables = [
            list(range(first_block + i * per_seq, first_block + (i + 1) * per_seq))
            for i in range(num_seqs)
        ]

    def _forward(self, token_lists, context_lens) -> np.ndarray:
        chunks = [
            SequenceChunk(ids, ctx, self.tables[i], self.slots[i], all_logits=False)
            for i, (ids, ctx) in enumerate(zip(token_lists, context_lens, strict=True))
        ]
        return np.concatenate(self.model.forward(chunks))

    def prefill(self, prompts) -> np.ndarray:
        self.ctx = [len(p) for p in prompts]
        return self._forward(prompts, [0] * len(prompts))

    def decode(self, next_tokens) -> np.ndarray:
        out = self._forward([[int(t)] for t in next_tokens], self.ctx)
        self.ctx = [c + 1 for c in self.ctx]
        return out


class Transformers:
    """transformers with LoRA off (model = the base) or peft with one adapter per sequence."""

    name = "transformers"

    def __init__(self, model, adapter_names: list[str] | None):
        self.model, self.names = model, adapter_names

    @torch.inference_mode()
    def prefill(self, prompts) -> np.ndarray:
        self.kw = {"adapter_names": self.names[: len(prompts)]} if self.names else {}
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


def check(ours, ref, prompts, what: str) -> None:
    """Last-token logits of the prefill and of two decode steps agree with transformers."""
    tol = 1e-3
    a, b = ours.prefill(prompts), ref.prefill(prompts)
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


def time_prefill(variants: dict, prompts, repeats: int) -> dict[str, float]:
    """Tokens/s of each variant's fastest of `repeats` round-robin runs (after a warm-up)."""
    for runner in variants.values():
        runner.prefill(prompts)
    times: dict[str, list[float]] = {key: [] for key in variants}
    for _ in range(repeats):
        for key, runner in variants.items():
            t0 = time.perf_counter()
            runner.prefill(prompts)
            times[key].append(time.perf_counter() - t0)
    tokens = sum(len(p) for p in prompts)
    return {key: tokens / min(t) for key, t in times.items()}


def time_decode(variants: dict, prompts, steps: int) -> dict[str, float]:
    """Tokens/s of each variant from its median step time, the steps taken round-robin."""
    logits = {}
    for key, runner in variants.items():
        first = runner.prefill(prompts)
        logits[key] = runner.decode(np.argmax(first, axis=-1))  # warm-up step
    times: dict[str, list[float]] = {key: [] for key in variants}
    for _ in range(steps):
        for key, runner in variants.items():
            t0 = time.perf_counter()
            logits[key] = runner.decode(np.argmax(logits[key], axis=-1))
            times[key].append(time.perf_counter() - t0)
    return {key: len(prompts) / statistics.median(t) for key, t in times.items()}


# ----------------------------------------------------------------------------- main


def device_name(threads: int) -> str:
    model = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu ({model}, {threads} of {os.cpu_count()} threads)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, a few seconds")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON lines file (appended)")
    parser.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="threads for lorart and torch alike (default: every core; 1 is steadier on a "
        "machine that others use)",
    )
    args = parser.parse_args()
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    cfg = QUICK if args.quick else FULL
    bench = "cpu_forward_quick" if args.quick else "cpu_forward"
    torch.set_num_threads(args.threads)
    device = device_name(args.threads)
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
        per_seq = -(-max_len // BLOCK)
        lorart_variants = ("base", "lora", "lora_bf16")
        model = Model.from_pretrained(
            str(tmp / "model"),
            max_num_tokens=max(n * length, 256),
            num_kv_blocks=len(lorart_variants) * n * per_seq + 1,
            block_size=BLOCK,
            threads=args.threads,
        )
        slots: dict[str, list[int]] = {"lora": [], "lora_bf16": []}
        for d in adapter_dirs:
            for key, dtype in (("lora", "float32"), ("lora_bf16", "bfloat16")):
                weights, config = lorart.lora.from_peft(str(d), model.config, dtype=dtype)
                slots[key].append(model.add_adapter(weights, config))
        # Sequence i uses adapter i (mod the number of adapters) on both sides.
        names = [f"a{i % len(adapter_dirs)}" for i in range(n)]
        setup_s = time.perf_counter() - t0
        print(
            f"model: {num_params / 1e6:.1f}M parameters, {cfg['num_adapters']} adapters of rank "
            f"{cfg['rank']} on {len(PROJECTIONS)} projections; setup {setup_s:.1f}s"
        )
        print(f"device: {device}; baseline: {baseline}")
        load = os.getloadavg()[0]
        if load > 0.5:
            print(f"warning: load average {load:.2f} before timing; other work may skew results")

        def variants() -> dict:
            """Fresh runners, one per variant, each on its own KV blocks / cache."""
            out = {}
            for j, key in enumerate(lorart_variants):
                seq_slots = None
                if key != "base":
                    seq_slots = [slots[key][i % len(adapter_dirs)] for i in range(n)]
                out[("lorart", key)] = Lorart(model, n, seq_slots, j * n * per_seq, per_seq)
            out[("transformers", "base")] = Transformers(hf_base, None)
            out[("transformers", "lora")] = Transformers(peft_model, names)
            return out

        vocab = cfg["model"]["vocab_size"]
        prompts = prompts_for(n, length, vocab)
        v = variants()
        for key, what in (("base", "base"), ("lora", "LoRA fp32"), ("lora_bf16", "LoRA bf16")):
            ref = v[("transformers", "lora" if key != "base" else "base")]
            check(v[("lorart", key)], ref, prompts, what)

        a = cfg["num_adapters"]
        cases = [("prefill", f"prefill {n}x{length}", n, "prefill_throughput")]
        cases += [
            ("decode", f"decode b{b} ctx{length}", b, "decode_throughput")
            for b in cfg["decode_batches"]
        ]
        rows = []  # (case, variant, metric, {runner: value})
        for kind, label, batch, metric in cases:
            case_prompts = (
                prompts if kind == "prefill" else prompts_for(batch, length, vocab, batch)
            )
            if kind == "prefill":
                vals = time_prefill(variants(), case_prompts, cfg["repeats"])
            else:
                vals = time_decode(variants(), case_prompts, steps)
            adapters = min(batch, a)
            lora_tag = f"{adapters} adapter{'s' if adapters > 1 else ''} r{cfg['rank']}"
            for key in lorart_variants:
                tag = (
                    "base" if key == "base" else lora_tag + (" bf16" if key == "lora_bf16" else "")
                )
                ref_key = "base" if key == "base" else "lora"
                rows.append(
                    (
                        f"{label} {tag}",
                        key,
                        metric,
                        {
                            "lorart": vals[("lorart", key)],
                            "transformers": vals[("transformers", ref_key)],
                        },
                    )
                )

    report(rows, bench, device, baseline, args.out)


def report(rows, bench: str, device: str, baseline: str, out: Path) -> None:
    records = []
    print(f"\n{'case':<44} {'lorart':>10} {'transformers':>13} {'ratio':>7}")
    for case, _, metric, vals in rows:
        ours, ref = vals["lorart"], vals["transformers"]
        print(f"{case:<44} {ours:>10.1f} {ref:>13.1f} {ours / ref:>7.2f}   tokens/s")
        records.append(
            dict(
                bench=bench,
                case=case,
                device=device,
                metric=metric,
                value=round(ours, 3),
                unit="tokens/s",
                baseline=baseline,
                baseline_value=round(ref, 3),
                ratio=round(ours / ref, 4),
            )
        )
    # LoRA overhead: each LoRA row against the base row of the same case (the row before it).
    print(f"\n{'LoRA on / LoRA off (throughput)':<44} {'lorart':>10} {'transformers':>13}")
    base = None
    for case, variant, metric, vals in rows:
        if variant == "base":
            base = (case, vals)
            continue
        ours = vals["lorart"] / base[1]["lorart"]
        ref = vals["transformers"] / base[1]["transformers"]
        print(f"{case:<44} {ours:>10.2f} {ref:>13.2f}")
        records.append(
            dict(
                bench=bench,
                case=f"{case} vs base",
                device=device,
                metric=f"lora_overhead_{metric}",
                value=round(vals["lorart"], 3),
                unit="tokens/s",
                baseline=f"lorart {base[0]}",
                baseline_value=round(base[1]["lorart"], 3),
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

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
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_util import SHAPES, append_records, device_name

import lorart
from lorart.model import Model, SequenceChunk

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BLOCK = 16
RESULTS = Path(__file__).parent / "results" / "cpu_forward.jsonl"

FULL = dict(
    model=SHAPES["110m"],
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


def build_model(out_dir: Path, model_kw: dict, dtype: str = "float32") -> int:
    """A random Llama saved in `dtype` (its float32 init rounded to nearest even)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(bos_token_id=None, eos_token_id=None, **model_kw))
    model.to(getattr(torch, dtype)).save_pretrained(out_dir)
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
        return out.logits[:, -1].float().numpy()

    @torch.inference_mode()
    def decode(self, next_tokens) -> np.ndarray:
        ids = torch.tensor([[int(t)] for t in next_tokens], dtype=torch.long)
        out = self.model(input_ids=ids, past_key_values=self.cache, use_cache=True, **self.kw)
        self.cache = out.past_key_values
        return out.logits[:, -1].float().numpy()


# ----------------------------------------------------------------------------- check, then time


def check(ours, ref, prompts, what: str, tol: float = 1e-3) -> None:
    """Last-token logits of the prefill and of two decode steps agree with transformers, within
    tol x max(1, |logits|)."""
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


def time_prefill(variants: dict, prompts, repeats: int, warmup: bool = True) -> dict[str, float]:
    """Tokens/s of each variant's fastest of `repeats` round-robin runs (after a warm-up)."""
    for runner in variants.values() if warmup else ():
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
    parser.add_argument(
        "--mode",
        choices=("compare", "dtypes"),
        default="compare",
        help="compare: lorart against transformers (+ peft); dtypes: lorart's float32 path "
        "against bf16 weights (exact) and bf16 weights with precision='bfloat16'",
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), default="110m", help="model shape")
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="compare mode: the checkpoint's stored dtype, loaded with dtype='auto' "
        "(transformers runs float32 on the same values)",
    )
    parser.add_argument(
        "--precision",
        choices=("float32", "bfloat16"),
        default="float32",
        help="compare mode: lorart's matmul precision",
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="decode steps timed (default: 32, quick: 4)"
    )
    args = parser.parse_args()
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    torch.set_num_threads(args.threads)
    if args.mode == "dtypes":
        dtypes_main(args)
        return
    cfg = dict(QUICK if args.quick else FULL)
    if not args.quick:
        cfg["model"] = SHAPES[args.shape]
    if args.steps is not None:
        cfg["decode_steps"] = args.steps
    bench = "cpu_forward_quick" if args.quick else f"cpu_forward_{args.shape}"
    if args.dtype != "float32" or args.precision != "float32":
        bench += f"_{args.dtype}_{args.precision}"
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
        num_params = build_model(tmp / "model", cfg["model"], args.dtype)
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
            dtype="auto",
            precision=args.precision,
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
        tol = 1e-3
        if args.precision == "bfloat16":
            # Activations rounded to bf16: held to 2x transformers' own bf16 error instead.
            hf_bf16 = Transformers(
                AutoModelForCausalLM.from_pretrained(str(tmp / "model"), dtype=torch.bfloat16),
                None,
            )
            bf16_logits = hf_bf16.prefill(prompts)
            hf_err = np.max(np.abs(bf16_logits - v[("transformers", "base")].prefill(prompts)))
            tol = 2 * float(hf_err) / max(1.0, float(np.max(np.abs(bf16_logits))))
            del hf_bf16
            print(f"  precision bfloat16: tolerance 2 x transformers bf16's error = {tol:.2e}")
        for key, what in (("base", "base"), ("lora", "LoRA fp32"), ("lora_bf16", "LoRA bf16")):
            ref = v[("transformers", "lora" if key != "base" else "base")]
            check(v[("lorart", key)], ref, prompts, what, tol)

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


# ----------------------------------------------------------------------------- --mode dtypes

DTYPE_VARIANTS = {  # name -> (Model dtype, precision, adapter storage)
    "float32": ("float32", "float32", "float32"),
    "bf16": ("auto", "float32", "bfloat16"),
    "bf16 precision": ("auto", "bfloat16", "bfloat16"),
}
DTYPES_FULL = dict(
    prompt_len=64, prefill=(8, 512), decode_steps=32, num_adapters=8, rank=16, repeats=1
)
DTYPES_QUICK = dict(
    prompt_len=16, prefill=(4, 32), decode_steps=4, num_adapters=4, rank=16, repeats=1
)


def measure_read_bandwidth(threads: int, nbytes: int = 1 << 30, repeats: int = 7) -> float:
    """Streaming-read bandwidth (bytes/s) of `threads` threads over a 1 GiB float32 array (far
    past the last-level cache): the best of three readers (torch's sum and dot with `threads`
    intra-op threads, numpy's add.reduce on one slice per Python thread), each the fastest of
    `repeats`. The best is the ceiling: a slower reader only measures itself."""
    import threading

    torch.set_num_threads(threads)
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    half = x.numel() // 2
    parts = np.array_split(x.numpy(), threads)

    def numpy_threads() -> None:
        pool = [threading.Thread(target=np.add.reduce, args=(p,)) for p in parts]
        for t in pool:
            t.start()
        for t in pool:
            t.join()

    best = float("inf")
    for reader in (x.sum, lambda: torch.dot(x[:half], x[half:]), numpy_threads):
        reader()  # pages in, warms up
        for _ in range(repeats):
            t0 = time.perf_counter()
            reader()
            best = min(best, time.perf_counter() - t0)
    return nbytes / best


def decode_bytes(
    config, weight_itemsize: int, adapter_rank: int, adapter_itemsize: int, ctx: float
) -> float:
    """Bytes one batch-1 decode step reads: every weight once (the embedding: one row, unless it
    is the tied lm_head), one adapter's A and B on all seven projections, and the K and V of
    `ctx` cached positions (float32)."""
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    q = config.num_attention_heads * config.head_dim
    kv = config.num_kv_heads * config.head_dim
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h
    if config.attention_bias:
        per_layer += q + 2 * kv
    weights = config.num_layers * per_layer + h + v * h + (0 if config.tie_word_embeddings else h)
    lora = 0
    if adapter_rank:
        dims = [config.lora_module_dims(m) for m in range(1, 8)]
        lora = config.num_layers * adapter_rank * sum(a + b for a, b in dims)
    cache = config.num_layers * 2 * kv * 4 * ctx
    return weights * weight_itemsize + lora * adapter_itemsize + cache


def dtypes_main(args) -> None:
    """float32 path vs bf16 weights (exact) vs bf16 weights with precision='bfloat16', the same
    values (a bf16 checkpoint; the float32 path loads it with dtype='float32'), round-robin."""
    from transformers import AutoModelForCausalLM

    cfg = DTYPES_QUICK if args.quick else DTYPES_FULL
    shape = QUICK["model"] if args.quick else SHAPES[args.shape]
    bench = "cpu_forward_dtypes_quick" if args.quick else f"cpu_forward_dtypes_{args.shape}"
    steps = args.steps or cfg["decode_steps"]
    length, (pn, plen), a, rank = (
        cfg["prompt_len"],
        cfg["prefill"],
        cfg["num_adapters"],
        cfg["rank"],
    )
    device = device_name(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        num_params = build_model(tmp / "model", shape, "bfloat16")
        peft_model, adapter_dirs = build_adapters(tmp / "model", tmp / "adapters", a, rank)
        del peft_model
        vocab = shape["vocab_size"]
        ref_prompt = prompts_for(1, length, vocab, 99)[0]
        # References for precision='bfloat16': transformers in float64 and in bf16, one at a time.
        ids = torch.tensor([ref_prompt])
        refs = {}
        for dt in ("float64", "bfloat16"):
            hf_model = AutoModelForCausalLM.from_pretrained(
                str(tmp / "model"), dtype=getattr(torch, dt)
            ).eval()
            with torch.inference_mode():
                refs[dt] = hf_model(input_ids=ids).logits[0].double().numpy()
            del hf_model
        hf_err = float(np.max(np.abs(refs["bfloat16"] - refs["float64"])))

        per_seq = -(-max(plen, length + steps + 2) // BLOCK)
        models, slots = {}, {}
        for name, (dtype, precision, adapter_dtype) in DTYPE_VARIANTS.items():
            models[name] = Model.from_pretrained(
                str(tmp / "model"),
                dtype=dtype,
                precision=precision,
                max_num_tokens=max(pn * plen, 256),
                num_kv_blocks=2 * max(pn, 8) * per_seq,
                block_size=BLOCK,
                max_lora_rank=rank,
                threads=args.threads,
                progress=False,
            )
            slots[name] = []
            for d in adapter_dirs:
                weights, lcfg = lorart.lora.from_peft(
                    str(d), models[name].config, dtype=adapter_dtype
                )
                slots[name].append(models[name].add_adapter(weights, lcfg))
        config = models["float32"].config
        print(
            f"model: {args.shape if not args.quick else 'quick'} ({num_params / 1e6:.1f}M "
            f"parameters) stored in bf16; {a} adapters of rank {rank} on {len(PROJECTIONS)} "
            f"projections; weights as loaded: "
            + ", ".join(f"{k} {m.weight_dtype}" for k, m in models.items())
            + f"; setup {time.perf_counter() - t0:.1f}s"
        )
        print(f"device: {device}")

        def runners(batch: int, lora: bool, members=DTYPE_VARIANTS) -> dict:
            """A fresh runner per (variant, base|lora); base on blocks [0, ..), lora after."""
            out = {}
            for name in members:
                for j, on in enumerate((False, True) if lora is None else (lora,)):
                    seq_slots = [slots[name][i % a] for i in range(batch)] if on else None
                    first = j * max(pn, 8) * per_seq
                    out[(name, "lora" if on else "base")] = Lorart(
                        models[name], batch, seq_slots, first, per_seq
                    )
            return out

        # Correctness first. bf16 exact == float32 path bitwise (prefill + 2 decode steps, mixed
        # adapters); precision bf16 within 2x transformers' bf16 error against float64.
        prompts = prompts_for(pn, length, vocab)
        r = runners(pn, True, ("float32", "bf16"))
        f32, b16 = r[("float32", "lora")], r[("bf16", "lora")]
        a_out, b_out = f32.prefill(prompts), b16.prefill(prompts)
        for step in range(3):
            if not np.array_equal(a_out.view(np.uint32), b_out.view(np.uint32)):
                raise SystemExit(
                    f"check failed: bf16 weights (exact) differ from the float32 path at step "
                    f"{step} by up to {float(np.max(np.abs(a_out - b_out))):.3g}"
                )
            tokens = np.argmax(a_out, axis=-1)
            a_out, b_out = f32.decode(tokens), b16.decode(tokens)
        print(
            f"  check bf16 exact: logits bitwise equal to the float32 path ({pn} sequences, "
            f"{a} adapters, prefill + 2 decode steps)"
        )
        variants = list(DTYPE_VARIANTS)
        chunk = SequenceChunk(ref_prompt, 0, list(range(per_seq)), -1, all_logits=True)
        try:
            [got] = models["bf16 precision"].forward([chunk])
        except ValueError as err:
            print(f"  precision='bfloat16' unavailable, measured without it: {err}")
            variants.remove("bf16 precision")
        else:
            err = float(np.max(np.abs(got - refs["float64"])))
            [exact] = models["float32"].forward([chunk])
            exact_err = float(np.max(np.abs(exact - refs["float64"])))
            if not np.isfinite(got).all() or err > 2 * hf_err:
                raise SystemExit(
                    f"check failed: precision='bfloat16' is {err:.3g} from transformers float64, "
                    f"over 2 x transformers bf16's own error {hf_err:.3g}"
                )
            print(
                f"  check bf16 precision: max |lorart - HF f64| = {err:.3g} <= 2 x HF bf16's "
                f"{hf_err:.3g} (float32 path: {exact_err:.3g})"
            )
        for name in DTYPE_VARIANTS:
            if name not in variants:
                del models[name]
        load = os.getloadavg()[0]
        if load > 0.5:
            print(f"warning: load average {load:.2f} before timing; other work may skew results")

        bandwidth = measure_read_bandwidth(args.threads)
        print(f"streaming-read bandwidth ({args.threads} threads): {bandwidth / 1e9:.2f} GB/s")
        results = {}  # (case, variant, base|lora) -> tokens/s
        for batch in (1, 8 if not args.quick else 4):
            vals = time_decode(
                runners(batch, None, variants), prompts_for(batch, length, vocab, batch), steps
            )
            for (name, kind), value in vals.items():
                results[(f"decode b{batch}", name, kind)] = value
        vals = time_prefill(
            runners(pn, True, variants), prompts_for(pn, plen, vocab, 7), cfg["repeats"], False
        )
        for (name, kind), value in vals.items():
            results[(f"prefill {pn}x{plen}", name, kind)] = value
        # Again after timing: a neighbour's burst during one measurement must not lower the
        # ceiling (a lower ceiling would flatter the roofline fraction).
        bandwidth = max(bandwidth, measure_read_bandwidth(args.threads))

    ctx = length + 1 + steps / 2  # the median step's context
    itemsize = {"float32": 4, "bf16": 2, "bf16 precision": 2}
    records, base = [], dict(bench=bench, device=device)
    print(f"\n{'case':<40} {'variant':<16} {'tokens/s':>9} {'/ float32':>9} {'roofline':>9}")
    for (case, name, kind), value in results.items():
        n_ad = min(a, int(case.split("b")[1]) if case.startswith("decode") else pn)
        label = f"{case} ctx{length} " if case.startswith("decode") else f"{case} "
        label += "base" if kind == "base" else f"{n_ad} adapter{'s' if n_ad > 1 else ''} r{rank}"
        ref = results[(case, "float32", kind)]
        rec = dict(
            base,
            case=f"{label}, {name}",
            metric=f"{case.split()[0]}_throughput",
            value=round(value, 3),
            unit="tokens/s",
            baseline="lorart float32 path (same values)",
            baseline_value=round(ref, 3),
            ratio=round(value / ref, 4),
        )
        roof = ""
        if case == "decode b1":
            step_bytes = decode_bytes(
                config,
                itemsize[name],
                rank if kind == "lora" else 0,
                2 if name != "float32" else 4,
                ctx,
            )
            rec["roofline_fraction"] = round(step_bytes * value / bandwidth, 4)
            roof = f"{rec['roofline_fraction']:>9.2f}"
        records.append(rec)
        print(f"{label:<40} {name:<16} {value:>9.1f} {value / ref:>9.2f} {roof}")
    print(f"\n{'LoRA on / LoRA off (throughput)':<40} {'variant':<16} {'ratio':>9}")
    for (case, name, kind), value in results.items():
        if kind != "lora" or (case, name, "base") not in results:
            continue
        off = results[(case, name, "base")]
        print(f"{case + ' ctx' + str(length):<40} {name:<16} {value / off:>9.2f}")
        records.append(
            dict(
                base,
                case=f"{case} ctx{length} LoRA on vs off, {name}",
                metric="lora_overhead_decode_throughput",
                value=round(value, 3),
                unit="tokens/s",
                baseline=f"lorart {case} base, {name}",
                baseline_value=round(off, 3),
                ratio=round(value / off, 4),
            )
        )
    print(
        f"(roofline: bytes of weights + adapter + KV per step at context {ctx:.0f} x tokens/s "
        f"over the measured bandwidth {bandwidth / 1e9:.2f} GB/s)"
    )
    append_records(args.out, records)


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
    append_records(out, records)


if __name__ == "__main__":
    main()

"""A Llama-2-7B-shaped bf16 checkpoint on this machine: load time, peak RSS, batch-of-8 speed.

Writes a random-weight checkpoint in bfloat16 (``--shape 7b``: hidden 4096, intermediate 11008,
32 layers, 32 heads, 32 KV heads, vocab 32000, untied lm_head, 4096 positions, 13.5 GB;
``--shape 1.1b``: hidden 2048, intermediate 5632, 22 layers, 32/4 heads, vocab 32000, 2.2 GB) as
sharded safetensors with ``model.safetensors.index.json``, streamed to disk tensor by tensor (each
file's header is written first, with offsets computed from the shapes; each tensor is generated
in chunks, written and freed, so the model is never in memory), and eight rank-16 PEFT adapters
on all seven projections (``adapter_config.json`` + ``adapter_model.safetensors`` in bf16).

Weights are random bf16 bit patterns: a random sign, a random 7-bit mantissa and an exponent
giving magnitudes in [2**-9, 2**-5) (std about 0.014, like ``normal * 0.02`` but generated at
memory speed); norms are 1. The forward stays finite and far from degenerate.

Then, in a fresh child process (so that its peak RSS is the load's alone), the checkpoint is
loaded with ``lorart.model.Model.from_pretrained(dtype="auto")`` and the eight adapters are
added. Reported: load time; peak RSS (``ru_maxrss``) after the load and at the end; the file
size, KV cache and workspace bytes and the ratio peak RSS / (files + KV + workspace) (the
issue's target: <= 1.15). Before timing, correctness: every sequence of the mixed batch (each on
its own adapter, prompts of 64 tokens) run alone gives bitwise the logits and greedy tokens it
gets in the batch, for ``--check-tokens`` tokens; logits are finite and not constant; two
sequences with the same prompt and different adapters get different logits. Timed: the prefill
of the 8 x 64 prompts in one forward and ``--new-tokens`` greedy decode steps of the batch.
Prints a table and appends JSON lines to benchmarks/results/big_model.jsonl.

The checkpoint goes to ``--dir`` (default: a temporary directory under /tmp, removed afterwards
unless ``--keep``); a complete one already there (same shape and seed) is reused.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_util import SHAPES, append_records, device_name

RESULTS = Path(__file__).parent / "results" / "big_model.jsonl"
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NUM_SEQS = 8
PROMPT_LEN = 64
RANK = 16
BLOCK = 16
COMPLETE = "big_model_complete.json"  # written last: the directory is whole
CHUNK = 1 << 25  # elements generated at a time (64 MiB of bf16)
ST_DTYPE = "BF16"


# ----------------------------------------------------------------------------- the checkpoint


def model_tensors(shape: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of an untied Llama checkpoint, in HF's order."""
    h, i, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    head_dim = h // shape["num_attention_heads"]
    kv = shape["num_key_value_heads"] * head_dim
    out = [("model.embed_tokens.weight", (v, h))]
    for layer in range(shape["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        out += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
        ]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return out


def projection_dims(shape: dict) -> dict[str, tuple[int, int]]:
    """HF projection name -> (in_features, out_features)."""
    h, i = shape["hidden_size"], shape["intermediate_size"]
    kv = shape["num_key_value_heads"] * (h // shape["num_attention_heads"])
    return {
        "q_proj": (h, h),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (h, h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
    }


def random_bf16(gen: np.random.SFC64, n: int, min_exp: int) -> np.ndarray:
    """n random bf16 bit patterns: random sign and 7-bit mantissa, magnitude in
    [2**min_exp, 2**(min_exp + 4)). Straight from the generator's raw bits: normal draws and a
    float32 round trip would make writing 13.5 GB take minutes."""
    bits = gen.random_raw(-(-n // 4)).view(np.uint16)[:n]
    exponent = (bits >> 7) & np.uint16(3)
    exponent += np.uint16(127 + min_exp)
    exponent <<= 7
    bits &= np.uint16(0x807F)  # sign and mantissa
    bits |= exponent
    return bits


ONE_BF16 = np.uint16(0x3F80)


def write_safetensors(path: Path, tensors: list[tuple[str, tuple[int, ...]]], fill) -> int:
    """Write a safetensors file tensor by tensor: the header (offsets from the shapes) first,
    then each tensor's bytes as ``fill(name, offset, count)`` hands them out in chunks.
    Returns the file size."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in tensors:
        nbytes = 2 * math.prod(shape)
        header[name] = {
            "dtype": ST_DTYPE,
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, shape in tensors:
            count = math.prod(shape)
            for start in range(0, count, CHUNK):
                chunk = fill(name, start, min(CHUNK, count - start))
                f.write(chunk.data)
                del chunk
    return 8 + len(raw) + offset


def config_json(shape: dict) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **{k: v for k, v in shape.items() if k != "tie_word_embeddings"},
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "hidden_act": "silu",
        "bos_token_id": None,
        "eos_token_id": None,  # greedy runs never stop early
    }


def write_checkpoint(out: Path, shape_name: str, seed: int, shard_bytes: int) -> None:
    """The model (sharded, with its index) and NUM_SEQS adapters under out/model, out/adapters."""
    shape = SHAPES[shape_name]
    model_dir = out / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps(config_json(shape), indent=2))
    gen = np.random.SFC64(seed)

    def fill(name: str, start: int, count: int) -> np.ndarray:
        if name.endswith("norm.weight"):
            return np.full(count, ONE_BF16, dtype=np.uint16)
        return random_bf16(gen, count, -9)

    tensors = model_tensors(shape)
    shards: list[list] = [[]]
    size = 0
    for name, tshape in tensors:
        nbytes = 2 * math.prod(tshape)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, tshape))
        size += nbytes
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        t0 = time.perf_counter()
        written = write_safetensors(model_dir / file, shard, fill)
        print(f"  wrote {file}: {written / 1e9:.2f} GB in {time.perf_counter() - t0:.1f} s")
        weight_map.update({name: file for name, _ in shard})
        total += sum(2 * math.prod(s) for _, s in shard)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))

    dims = projection_dims(shape)
    for a in range(NUM_SEQS):
        adapter_dir = out / "adapters" / f"a{a}"
        adapter_dir.mkdir(parents=True, exist_ok=True)
        tensors = []
        for layer in range(shape["num_hidden_layers"]):
            for proj in PROJECTIONS:
                part = "mlp" if proj in ("gate_proj", "up_proj", "down_proj") else "self_attn"
                key = f"base_model.model.model.layers.{layer}.{part}.{proj}"
                hi, ho = dims[proj]
                tensors += [
                    (f"{key}.lora_A.weight", (RANK, hi)),
                    (f"{key}.lora_B.weight", (ho, RANK)),
                ]
        write_safetensors(
            adapter_dir / "adapter_model.safetensors",
            tensors,
            lambda name, start, count: random_bf16(gen, count, -9),
        )
        cfg = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": RANK,
            "lora_alpha": 2 * RANK,
            "target_modules": PROJECTIONS,
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": False,
            "use_rslora": False,
            "base_model_name_or_path": str(model_dir),
        }
        (adapter_dir / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    (out / COMPLETE).write_text(json.dumps({"shape": shape_name, "seed": seed}))


def is_complete(out: Path, shape_name: str, seed: int) -> bool:
    try:
        return json.loads((out / COMPLETE).read_text()) == {"shape": shape_name, "seed": seed}
    except (OSError, ValueError):
        return False


def dir_bytes(path: Path, pattern: str) -> int:
    return sum(f.stat().st_size for f in path.rglob(pattern))


# ----------------------------------------------------------------------------- the child


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def child(args) -> dict:
    """Load, check, time; returns the figures (printed as one JSON line for the parent)."""
    import lorart
    from lorart import _core
    from lorart.model import Model, SequenceChunk

    res: dict = {"rss_after_import": peak_rss()}
    model_dir = args.dir / "model"
    config = lorart.hf.load_config(model_dir)
    new = args.new_tokens
    per_seq = -(-(PROMPT_LEN + new) // BLOCK)
    num_blocks = NUM_SEQS * per_seq
    max_tokens = NUM_SEQS * PROMPT_LEN
    res["kv_bytes"] = int(_core.KvCache.checked_bytes(config, num_blocks, BLOCK))
    res["workspace_bytes"] = int(_core.LlamaModel.workspace_bytes(config, max_tokens, RANK))

    t0 = time.perf_counter()
    model = Model.from_pretrained(
        model_dir,
        dtype=args.dtype,
        precision=args.precision,
        max_num_tokens=max_tokens,
        num_kv_blocks=num_blocks,
        block_size=BLOCK,
        max_lora_rank=RANK,
        threads=args.threads,
        progress=False,
    )
    res["load_s"] = time.perf_counter() - t0
    res["rss_after_load"] = peak_rss()
    res["weight_dtype"] = model.weight_dtype
    t0 = time.perf_counter()
    slots = []
    for a in range(NUM_SEQS):
        weights, lcfg = lorart.lora.from_peft(args.dir / "adapters" / f"a{a}", config, "bfloat16")
        slots.append(model.add_adapter(weights, lcfg))
        del weights
    res["adapters_s"] = time.perf_counter() - t0
    res["rss_after_adapters"] = peak_rss()

    rng = np.random.default_rng(args.seed)
    prompts = [[int(t) for t in rng.integers(0, config.vocab_size, PROMPT_LEN)] for _ in slots]
    prompts[1] = list(prompts[0])  # same prompt, another adapter: the adapters must matter
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(NUM_SEQS)]

    def run(members: list[int], steps: int, timed: bool = False):
        """Prefill members' prompts in one forward, then `steps` greedy decode steps.
        Returns ({member: [logits per step]}, {member: tokens}, prefill s, [decode step s])."""
        chunks = [SequenceChunk(prompts[i], 0, tables[i], slots[i]) for i in members]
        t = time.perf_counter()
        out = model.forward(chunks)
        prefill_s = time.perf_counter() - t
        logits = {i: [o[-1]] for i, o in zip(members, out, strict=True)}
        tokens = {i: [int(np.argmax(o[-1]))] for i, o in zip(members, out, strict=True)}
        step_s = []
        for step in range(steps):
            ctx = PROMPT_LEN + step
            chunks = [SequenceChunk([tokens[i][-1]], ctx, tables[i], slots[i]) for i in members]
            t = time.perf_counter()
            out = model.forward(chunks)
            step_s.append(time.perf_counter() - t)
            for i, o in zip(members, out, strict=True):
                if not timed:
                    logits[i].append(o[-1])
                tokens[i].append(int(np.argmax(o[-1])))
        return logits, tokens, prefill_s, step_s

    # Correctness first: the batch against each sequence alone, bitwise.
    t0 = time.perf_counter()
    k = args.check_tokens
    batch_logits, batch_tokens, _, _ = run(list(range(NUM_SEQS)), k - 1)
    for i in range(NUM_SEQS):
        steps = np.stack(batch_logits[i])
        if not np.isfinite(steps).all():
            raise SystemExit(f"check failed: sequence {i} has non-finite logits")
        if float(np.std(steps[0])) < 1e-3:
            raise SystemExit(f"check failed: sequence {i}'s logits are constant ({steps[0][:4]})")
    if np.array_equal(batch_logits[0][0], batch_logits[1][0]):
        raise SystemExit("check failed: adapters 0 and 1 give the same logits on the same prompt")
    for i in range(NUM_SEQS):
        alone_logits, alone_tokens, _, _ = run([i], k - 1)
        if alone_tokens[i] != batch_tokens[i]:
            raise SystemExit(
                f"check failed: sequence {i} alone gives tokens {alone_tokens[i]}, in the batch "
                f"{batch_tokens[i]}"
            )
        for step, (a, b) in enumerate(zip(alone_logits[i], batch_logits[i], strict=True)):
            if not np.array_equal(a.view(np.uint32), b.view(np.uint32)):
                raise SystemExit(
                    f"check failed: sequence {i}, step {step}: logits alone differ from the batch "
                    f"by up to {float(np.max(np.abs(a - b))):.3g} (batch invariance is bitwise)"
                )
    res["check_s"] = time.perf_counter() - t0
    res["check"] = (
        f"8 sequences alone == in the batch, bitwise, for {k} tokens; logits finite, "
        f"std {float(np.std(batch_logits[0][0])):.3f}; adapters differ"
    )

    _, tokens, prefill_s, step_s = run(list(range(NUM_SEQS)), new - 1, timed=True)
    if any(tokens[i][:k] != batch_tokens[i] for i in range(NUM_SEQS)):
        raise SystemExit("check failed: the timed run's first tokens differ from the checked run")
    res["prefill_s"] = prefill_s
    res["prefill_tok_s"] = NUM_SEQS * PROMPT_LEN / prefill_s
    res["decode_steps"] = len(step_s)
    res["decode_tok_s"] = NUM_SEQS * len(step_s) / sum(step_s)
    res["decode_step_median_s"] = float(np.median(step_s))
    res["distinct_tokens"] = len({t for seq in tokens.values() for t in seq})
    res["rss_end"] = peak_rss()
    return res


# ----------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    parser.add_argument("--dir", type=Path, help="checkpoint directory (reused when complete)")
    parser.add_argument("--keep", action="store_true", help="keep the default temporary directory")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens (32..64)")
    parser.add_argument("--check-tokens", type=int, default=3, help="tokens checked alone vs batch")
    parser.add_argument("--dtype", default="auto", help="Model.from_pretrained's dtype")
    parser.add_argument("--precision", default="float32", help="Model.from_pretrained's precision")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-gb", type=float, default=5.0, help="largest shard, GB")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON lines file (appended)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if not 2 <= args.new_tokens <= 4096:
        parser.error(f"--new-tokens must be in [2, 4096], got {args.new_tokens}")
    if not 1 <= args.check_tokens <= args.new_tokens:
        parser.error(f"--check-tokens must be in [1, --new-tokens], got {args.check_tokens}")
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return

    tmp = None
    if args.dir is None:
        tmp = Path(tempfile.mkdtemp(prefix=f"big_model_{args.shape}_", dir="/tmp"))
        args.dir = tmp
    try:
        run_parent(args)
    finally:
        if tmp is not None and not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp is not None:
            print(f"kept {tmp}")


def run_parent(args) -> None:
    out = args.dir
    if is_complete(out, args.shape, args.seed):
        print(f"reusing the complete checkpoint in {out}")
        write_s = None
    else:
        if (out / "model").exists() or (out / "adapters").exists():
            print(f"{out} holds an incomplete or different checkpoint: rewriting it")
            shutil.rmtree(out / "model", ignore_errors=True)
            shutil.rmtree(out / "adapters", ignore_errors=True)
        print(f"writing a random {args.shape} bf16 checkpoint and {NUM_SEQS} adapters to {out}")
        t0 = time.perf_counter()
        write_checkpoint(out, args.shape, args.seed, int(args.shard_gb * 1e9))
        write_s = time.perf_counter() - t0
    file_bytes = dir_bytes(out / "model", "*.safetensors")
    adapter_bytes = dir_bytes(out / "adapters", "*.safetensors")
    load = os.getloadavg()[0]
    if load > 0.5:
        print(f"warning: load average {load:.2f} before timing; other work may skew results")

    cmd = [sys.executable, __file__, "--child", "--dir", str(out), "--shape", args.shape]
    cmd += ["--threads", str(args.threads), "--new-tokens", str(args.new_tokens)]
    cmd += ["--check-tokens", str(args.check_tokens), "--seed", str(args.seed)]
    cmd += ["--dtype", args.dtype, "--precision", args.precision]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        print(proc.stdout)
        raise SystemExit(f"the child process failed (exit status {proc.returncode})")
    res = json.loads(lines[-1].removeprefix("RESULT "))
    report(args, res, file_bytes, adapter_bytes, write_s)


def report(args, res: dict, file_bytes: int, adapter_bytes: int, write_s) -> None:
    gib = 2**30
    denom = file_bytes + res["kv_bytes"] + res["workspace_bytes"]
    ratio_load = res["rss_after_load"] / denom
    ratio_end = res["rss_end"] / (denom + adapter_bytes)
    device = device_name(args.threads)
    case = (
        f"{args.shape} bf16 checkpoint, dtype={args.dtype} -> {res['weight_dtype']}, "
        f"precision={args.precision}"
    )
    print(f"\n{case}; {device}")
    print(f"check: {res['check']} ({res['check_s']:.1f} s)")
    if write_s is not None:
        print(f"{'checkpoint written':<44} {write_s:>10.1f} s")
    rows = [
        ("model files", file_bytes / gib, "GiB"),
        ("adapter files (8, bf16)", adapter_bytes / gib, "GiB"),
        ("KV cache", res["kv_bytes"] / gib, "GiB"),
        ("workspace", res["workspace_bytes"] / gib, "GiB"),
        ("load time", res["load_s"], "s"),
        ("adapters converted and added", res["adapters_s"], "s"),
        ("peak RSS after imports", res["rss_after_import"] / gib, "GiB"),
        ("peak RSS after load", res["rss_after_load"] / gib, "GiB"),
        ("  / (files + KV + workspace)", ratio_load, "x (target <= 1.15)"),
        ("peak RSS at the end (adapters, generation)", res["rss_end"] / gib, "GiB"),
        ("  / (files + adapters + KV + workspace)", ratio_end, "x"),
        (f"prefill {NUM_SEQS}x{PROMPT_LEN}, 8 adapters", res["prefill_tok_s"], "tokens/s"),
        (
            f"decode b{NUM_SEQS}, 8 adapters ({res['decode_steps']} steps)",
            res["decode_tok_s"],
            "tokens/s",
        ),
    ]
    for label, value, unit in rows:
        print(f"{label:<44} {value:>10.3f} {unit}")
    bench = f"big_model_{args.shape}"
    base = dict(bench=bench, device=device)
    records = [
        dict(
            base, case=f"{case}: load", metric="load_time", value=round(res["load_s"], 3), unit="s"
        ),
        dict(
            base,
            case=f"{case}: peak RSS after load",
            metric="peak_rss",
            value=res["rss_after_load"],
            unit="bytes",
            baseline="model files + KV cache + workspace",
            baseline_value=denom,
            ratio=round(ratio_load, 4),
        ),
        dict(
            base,
            case=f"{case}: peak RSS at the end (8 adapters, generation)",
            metric="peak_rss",
            value=res["rss_end"],
            unit="bytes",
            baseline="model files + adapter files + KV cache + workspace",
            baseline_value=denom + adapter_bytes,
            ratio=round(ratio_end, 4),
        ),
        dict(
            base,
            case=f"{case}: prefill {NUM_SEQS}x{PROMPT_LEN}, 8 adapters r{RANK}",
            metric="prefill_throughput",
            value=round(res["prefill_tok_s"], 3),
            unit="tokens/s",
        ),
        dict(
            base,
            case=f"{case}: decode b{NUM_SEQS} ctx{PROMPT_LEN}, 8 adapters r{RANK}",
            metric="decode_throughput",
            value=round(res["decode_tok_s"], 3),
            unit="tokens/s",
        ),
    ]
    append_records(args.out, records)


if __name__ == "__main__":
    main()

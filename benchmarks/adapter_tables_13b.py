"""The LoRA cache with an adapter the size of the seed's chinese-llama-2-lora-13b tables.

hfl/chinese-llama-2-lora-13b replaces embed_tokens and lm_head over a vocabulary of 55,296
tokens at Llama-2-13B's hidden size 5,120: two float16 tables of 283 M values (566 MB) each.
This writes a random one-layer model of that hidden size (bf16, vocab 32,000, about 0.9 GB on
disk: the 13B's other layers change nothing the cache does), draws such an adapter, and runs it
through ``lorart.Executor`` in one batch with a base request:

- the adapter's first request: ``enqueue_request`` time (validation and the host-level copy)
  and time to its final response (the device-level copy, the forward over its own tables);
- both cache levels' bytes against the adapter's, and the process RSS;
- correctness: the base request's tokens and logits are bitwise those of its solo run, the
  adapter's request ran over 55,296 ids (``Response.vocab_size``, ids past 32,000 in its
  prompt);
- with the default ``LoraCacheConfig`` (1 GiB host, 256 MiB device), the same adapter is refused
  with both sizes in the message, and the executor keeps serving.

Prints a table and appends a JSON line to benchmarks/results/adapter_tables_13b.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_util import append_records, device_name
from big_model import ONE_BF16, config_json, model_tensors, random_bf16, write_safetensors

import lorart

RESULTS = Path(__file__).parent / "results" / "adapter_tables_13b.jsonl"
SHAPE = dict(
    hidden_size=5120,
    intermediate_size=256,
    num_hidden_layers=1,
    num_attention_heads=40,
    num_key_value_heads=40,
    vocab_size=32000,
    max_position_embeddings=512,
)
ADAPTER_VOCAB = 55296


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def write_model(out: Path, seed: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config_json(SHAPE), indent=2))
    gen = np.random.SFC64(seed)

    def fill(name: str, start: int, count: int) -> np.ndarray:
        if "norm" in name:
            return np.full(count, ONE_BF16, np.uint16)
        return random_bf16(gen, count, -9)

    write_safetensors(out / "model.safetensors", model_tensors(SHAPE), fill)


def random_f16(gen: np.random.SFC64, shape: tuple[int, int]) -> np.ndarray:
    """float16 values of magnitude in [2**-9, 2**-5) with random signs, at memory speed."""
    n = shape[0] * shape[1]
    bits = gen.random_raw(-(-n // 4)).view(np.uint16)[:n]
    exponent = ((bits >> 10) & np.uint16(3)) + np.uint16(15 - 9)
    bits &= np.uint16(0x83FF)
    bits |= exponent << np.uint16(10)
    return bits.view(np.float16).reshape(shape)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    h = SHAPE["hidden_size"]
    with tempfile.TemporaryDirectory(prefix="lorart-13b-tables-") as tmp:
        model_dir = Path(tmp) / "model"
        start = time.monotonic()
        write_model(model_dir, seed=1)
        write_s = time.monotonic() - start
        gen = np.random.SFC64(2)
        tables = lorart.LoraEmbeddings(
            embed_tokens=random_f16(gen, (ADAPTER_VOCAB, h)),
            lm_head=random_f16(gen, (ADAPTER_VOCAB, h)),
        )
        weights = lorart.LoraWeights(np.zeros((0, 0), np.float16), embeddings=tables)
        config = lorart.LoraConfig(np.zeros((0, 3), np.int32))
        greedy = lorart.SamplingConfig(top_k=1)
        base_prompt = [int(t) for t in np.random.default_rng(3).integers(0, 32000, 16)]
        ext_prompt = [*base_prompt[:8], 40000, 55295, 32000, 12]

        def base_request():
            return lorart.InferenceRequest(
                base_prompt, max_new_tokens=4, sampling_config=greedy, return_context_logits=True
            )

        def final(exe, rid):
            return exe.await_responses(rid, timeout=600)[-1]

        big = lorart.LoraCacheConfig(host_cache_bytes=3 << 30, device_cache_bytes=3 << 30)
        cfg = lorart.ExecutorConfig(
            max_batch_size=4,
            max_num_tokens=64,
            max_seq_len=64,
            num_threads=args.threads,
            lora_cache=big,
        )
        with lorart.Executor(str(model_dir), cfg) as exe:
            solo = final(exe, exe.enqueue_request(base_request()))
            rss0 = rss_bytes()
            start = time.monotonic()
            ext_id = exe.enqueue_request(
                lorart.InferenceRequest(
                    ext_prompt,
                    max_new_tokens=4,
                    sampling_config=greedy,
                    lora_task_id=1,
                    lora_weights=weights,
                    lora_config=config,
                )
            )
            enqueue_s = time.monotonic() - start
            base_id = exe.enqueue_request(base_request())
            ext = final(exe, ext_id)
            first_s = time.monotonic() - start
            mixed = final(exe, base_id)
            stats = exe.stats()["lora_cache"]
            rss1 = rss_bytes()
        assert ext.finish_reason == "length", ext.error
        assert ext.vocab_size == ADAPTER_VOCAB and mixed.vocab_size == SHAPE["vocab_size"]
        assert list(mixed.output_token_ids) == list(solo.output_token_ids)
        assert np.array_equal(
            np.asarray(mixed.context_logits).view(np.uint32),
            np.asarray(solo.context_logits).view(np.uint32),
        ), "the base request's logits changed beside the adapter"
        # The default cache: refused, with both sizes; the executor goes on.
        cfg_default = lorart.ExecutorConfig(max_batch_size=4, max_num_tokens=64, max_seq_len=64)
        with lorart.Executor(str(model_dir), cfg_default) as exe:
            refused = final(
                exe,
                exe.enqueue_request(
                    lorart.InferenceRequest(
                        ext_prompt,
                        max_new_tokens=2,
                        lora_task_id=1,
                        lora_weights=weights,
                        lora_config=config,
                    )
                ),
            )
            after = final(exe, exe.enqueue_request(base_request()))
        assert refused.finish_reason == "error" and "more than" in refused.error, refused.error
        assert list(after.output_token_ids) == list(solo.output_token_ids)

    record = {
        "bench": "adapter_tables_13b",
        "device": device_name(args.threads),
        "threads": args.threads,
        "load_average": os.getloadavg()[0],
        "adapter_bytes": weights.nbytes,
        "host_bytes": stats["host_bytes"],
        "device_bytes": stats["device_bytes"],
        "enqueue_s": enqueue_s,
        "first_response_s": first_s,
        "rss_delta_bytes": rss1 - rss0,
        "write_model_s": write_s,
        "refused_with_default_cache": refused.error,
    }
    mib = 2**20
    print(f"adapter tables: 2 x [{ADAPTER_VOCAB}, {h}] float16 = {weights.nbytes / mib:.0f} MiB")
    print("| what | value |\n|---|---|")
    print(f"| enqueue_request (validate + host-level copy) | {enqueue_s:.2f} s |")
    print(f"| its final response (device-level copy + 4 tokens) | {first_s:.2f} s |")
    print(
        f"| host level / device level bytes | {stats['host_bytes'] / mib:.0f} / "
        f"{stats['device_bytes'] / mib:.0f} MiB ({stats['host_bytes'] / weights.nbytes:.3f}x / "
        f"{stats['device_bytes'] / weights.nbytes:.3f}x the adapter) |"
    )
    print(f"| process RSS after it, minus before | {(rss1 - rss0) / mib:.0f} MiB |")
    print(f"| default cache | refused: {refused.error} |")
    print(
        "checks: base request bitwise equal beside the adapter; the adapter ran over "
        f"{ext.vocab_size} ids; the executor kept serving after the refusal"
    )
    append_records(args.out, [record])


if __name__ == "__main__":
    main()

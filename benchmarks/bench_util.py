"""Helpers shared by the benchmark scripts (imported by file name from benchmarks/; no torch)."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

# Model shapes (config.json fields) the benchmarks share: cpu_forward's default, the issue's
# TinyLlama-1.1B-sized model (untied) and Llama-2-7B.
SHAPES: dict[str, dict] = {
    "110m": dict(
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=12,
        vocab_size=32000,
        tie_word_embeddings=True,
        max_position_embeddings=2048,
    ),
    "1.1b": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
        tie_word_embeddings=False,
        max_position_embeddings=2048,
    ),
    "7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        tie_word_embeddings=False,
        max_position_embeddings=4096,
    ),
}


def device_name(threads: int) -> str:
    """``cpu (<model name>, <threads> of <cores> threads)`` for the JSON records."""
    model = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu ({model}, {threads} of {os.cpu_count()} threads)"


def append_records(out: Path, records: list[dict]) -> None:
    """Append one JSON object per line (benchmarks/README.md's format)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    print(f"\nwrote {len(records)} records to {out}")

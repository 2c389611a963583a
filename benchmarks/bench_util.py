"""Helpers shared by the benchmark scripts (imported by file name from benchmarks/; no torch)."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path


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

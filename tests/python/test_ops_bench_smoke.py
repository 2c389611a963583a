"""benchmarks/gpu/ops_bench.py --device cpu --quick: the GPU benchmark's checks and records on the
CPU build's small shapes, so the script cannot rot between the runs on a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu" / "ops_bench.py"


def test_ops_bench_quick_on_cpu(tmp_path):
    out = tmp_path / "ops_bench.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("OUT", None)
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    ops = {r["op"] for r in records}
    assert ops == {"linear", "attention", "lora_gemm"}, ops
    for r in records:
        assert r["status"] == "ok", r
        assert r["check_rel_err"] <= r["check_tol"], r  # checked against float64 torch
        assert r["value"] > 0 and r["unit"] == "us" and 0 < r["roofline_fraction"] < 1, r
    # The shapes the smoke run covers: decode and prefill of each op, both linear precisions.
    cases = " | ".join(r["case"] for r in records)
    for part in ("M=1 bfloat16", "M=5 float32", "decode kv2", "prefill 1x40", "chunked", "B=3"):
        assert part in cases, part
    assert all("ratio" in r for r in records if r["op"] == "lora_gemm")
    assert "0 failed checks" in proc.stdout

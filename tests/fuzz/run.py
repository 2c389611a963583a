"""Run every fuzz target for a bounded time or number of inputs; exit 1 on any finding.

    python tests/fuzz/run.py --seconds 20            # CI: 20 s per target
    python tests/fuzz/run.py --runs 2000 --targets npy,config
    nice python tests/fuzz/run.py --seconds 3600 --workdir fuzz-work   # longer, keeps the corpus

Each target runs in its own process (libFuzzer exits the process when it is done) over a seed
corpus built from valid files (``seeds.py``) plus whatever corpus ``--workdir`` already holds,
so a long run resumes where the last one stopped. A finding is saved as
``WORKDIR/findings/TARGET-crash-*`` and the command that replays it is printed. Without atheris
(it has wheels for CPython 3.10-3.13 on x86-64 Linux) the runner says so and exits 0.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

TARGETS = ("safetensors", "npy", "config", "lora")
# Inputs longer than this are cut; the largest seed (a whole tiny checkpoint) is ~3 KiB.
MAX_LEN = 8192


def run_target(target: str, args: argparse.Namespace, work: Path) -> tuple[bool, str]:
    from seeds import write_seeds

    seeds = work / "seeds" / target
    shutil.rmtree(seeds, ignore_errors=True)
    write_seeds(target, seeds)
    corpus = work / "corpus" / target
    corpus.mkdir(parents=True, exist_ok=True)
    findings = work / "findings"
    findings.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f"lorart-fuzz-{target}-"))
    cmd = [
        sys.executable,
        str(HERE / "targets.py"),
        target,
        str(corpus),
        str(seeds),
        f"-max_len={MAX_LEN}",
        f"-timeout={args.timeout}",
        f"-rss_limit_mb={args.rss_limit_mb}",
        f"-artifact_prefix={findings}/{target}-",
        "-print_final_stats=1",
    ]
    if args.seconds:
        cmd.append(f"-max_total_time={args.seconds}")
    if args.runs:
        cmd.append(f"-runs={args.runs}")
    if args.seed is not None:
        cmd.append(f"-seed={args.seed}")
    env = {**os.environ, "LORART_FUZZ_WORKDIR": str(scratch)}
    start = time.monotonic()
    # Generous wall limit: startup (imports) plus the fuzzing time plus one input's timeout.
    limit = 120 + (args.seconds or 0) + args.timeout + (args.runs or 0) * 0.5
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=limit)
        out, rc = proc.stderr + proc.stdout, proc.returncode
    except subprocess.TimeoutExpired as err:
        out, rc = str(err.stderr or "") + f"\nrunner: killed after {limit:.0f} s", -1
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    elapsed = time.monotonic() - start
    execs = re.findall(r"stat::number_of_executed_units:\s*(\d+)", out)
    runs = execs[-1] if execs else "?"
    summary = (
        f"{target:12s} {runs:>9s} inputs in {elapsed:6.1f} s, corpus {len(list(corpus.iterdir()))}"
    )
    if rc == 0:
        return True, summary + ", no findings"
    saved = re.findall(r"Test unit written to (\S+)", out)
    lines = [summary + f", FAILED (exit {rc})", out[-4000:]]
    for path in saved:
        lines.append(f"replay: {sys.executable} {HERE / 'targets.py'} {target} {path}")
    return False, "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=0, help="fuzzing time per target")
    parser.add_argument("--runs", type=int, default=0, help="inputs per target (0: no limit)")
    parser.add_argument("--targets", default=",".join(TARGETS), help="comma-separated subset")
    parser.add_argument("--workdir", help="keeps corpus and findings (default: a temp dir)")
    parser.add_argument("--timeout", type=int, default=20, help="seconds one input may take")
    parser.add_argument("--seed", type=int, help="libFuzzer's random seed (default: random)")
    parser.add_argument("--rss_limit_mb", type=int, default=2048, help="memory limit per target")
    args = parser.parse_args(argv)
    if not args.seconds and not args.runs:
        parser.error("give --seconds and/or --runs (a bound per target)")
    targets = [t for t in args.targets.split(",") if t]
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown:
        parser.error(f"unknown target(s) {', '.join(unknown)} (known: {', '.join(TARGETS)})")
    if importlib.util.find_spec("atheris") is None:
        print("fuzz: atheris is not installed (pip install atheris); skipping the fuzz targets")
        return 0
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="lorart-fuzz-"))
    ok = True
    try:
        for target in targets:
            passed, report = run_target(target, args, work)
            print(f"fuzz: {report}", flush=True)
            ok &= passed
    finally:
        if not args.workdir and ok:
            shutil.rmtree(work, ignore_errors=True)
        elif not ok:
            print(f"fuzz: findings are kept in {work / 'findings'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

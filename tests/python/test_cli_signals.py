"""SIGINT (Ctrl-C) and SIGTERM stop `lorart run` mid-generation within a second or so: one line
on stderr, exit status 130 / 143, no traceback."""

from __future__ import annotations

import queue
import signal
import subprocess
import sys
import threading
import time

import pytest
from tiny_models import endless_demo_model

# Four prompts x 2000 greedy tokens on the endless demo model: many seconds of work.
MAX_OUTPUT_LEN = "2000"


@pytest.fixture(scope="module")
def endless_model(tmp_path_factory):
    return endless_demo_model(tmp_path_factory.mktemp("endless"))


def start_run(model_dir, stdout, *extra: str) -> tuple[subprocess.Popen, queue.Queue]:
    prompts = ["--input_text", "a", "b", "c", "d", "--max_output_len", MAX_OUTPUT_LEN]
    cmd = [sys.executable, "-m", "lorart", "run", "--model_dir", str(model_dir), *prompts, *extra]
    proc = subprocess.Popen(cmd, stdout=stdout, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()

    def read() -> None:
        for line in proc.stderr:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    return proc, lines


def wait_for_generation(lines: queue.Queue, timeout: float = 60.0) -> list[str]:
    """stderr lines up to the one saying generation started."""
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=deadline - time.monotonic())
        except queue.Empty:
            break
        if line is None:
            break
        seen.append(line)
        if "generating" in line:
            return seen
    pytest.fail(f"lorart run never started generating; stderr: {''.join(seen)}")


@pytest.mark.parametrize(
    "signum, status, streaming",
    [
        (signal.SIGINT, 130, False),
        (signal.SIGTERM, 143, False),
        (signal.SIGINT, 130, True),
    ],
)
def test_signal_stops_run_within_a_second(endless_model, tmp_path, signum, status, streaming):
    out = tmp_path / "stdout"
    with open(out, "w") as stdout_file:
        proc, lines = start_run(endless_model, stdout_file, *(["--streaming"] * streaming))
    try:
        wait_for_generation(lines)
        time.sleep(0.5)  # well into the generation
        assert proc.poll() is None, "the run finished before the signal: make it longer"
        sent = time.monotonic()
        proc.send_signal(signum)
        proc.wait(timeout=30)
        elapsed = time.monotonic() - sent
    finally:
        proc.kill()
        proc.wait()
    rest = []
    while (line := lines.get(timeout=5)) is not None:
        rest.append(line)
    stderr, stdout = "".join(rest), out.read_text()
    assert proc.returncode == status, stderr
    assert elapsed < 2.5, f"took {elapsed:.2f} s to stop"
    assert "Traceback" not in stderr
    name = signal.Signals(signum).name
    assert stderr.strip().splitlines() == [f"lorart run: interrupted by {name}; stopped"]
    if streaming:
        assert stdout.startswith('Input [Text 0]: "<s> a"\nOutput [Text 0 Beam 0]: "')
        assert stdout.endswith("\n")  # the half-printed line was ended

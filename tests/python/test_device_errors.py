"""``device="cuda"`` on a machine (or build) without a GPU: a DeviceError naming the device, raised
before any weight is read, from every entry point (ExecutorConfig.resolve, Executor, LLM, the
model loader, ``lorart run`` and ``lorart serve``). The GPU runs are tests/cpp/runtime/cuda."""

from __future__ import annotations

import re

import pytest
from tiny_models import run_lorart_cli

import lorart
from lorart import demo, hf
from lorart.model import load_core_model

MODEL = demo.DEMO / "model"
INFO = lorart.build_info()
no_gpu = pytest.mark.skipif(INFO["cuda_device_count"] > 0, reason="this machine has a GPU")


def expected_message(device: str) -> str:
    if INFO["cuda"]:
        return f"device {device} is not available ({INFO['cuda_device_count']} CUDA device(s)"
    return f"device {device}: this lorart build has no CUDA backend"


def test_device_names_are_checked_by_the_config():
    for name in ("cpu", "cuda", "cuda:0", "cuda:7"):
        assert lorart.ExecutorConfig(device=name).device == name
    for bad in ("gpu", "cuda:", "cuda:one", "CUDA", "cuda:-1"):
        with pytest.raises(ValueError, match=r"ExecutorConfig.device must be 'cpu', 'cuda' or"):
            lorart.ExecutorConfig(device=bad)


@no_gpu
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_resolve_raises_device_error(device):
    config = lorart.ExecutorConfig(device=device)
    name = "cuda:0" if device == "cuda" else device
    with pytest.raises(lorart.DeviceError, match=re.escape(expected_message(name))):
        config.resolve(hf.load_config(MODEL))


@no_gpu
def test_executor_and_llm_raise_device_error_before_loading(monkeypatch):
    def no_load(*args, **kwargs):  # the check comes first: the weights are never read
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(lorart.executor, "load_core_model", no_load)
    with pytest.raises(lorart.DeviceError, match="device cuda:0"):
        lorart.Executor(MODEL, lorart.ExecutorConfig(device="cuda"))
    with pytest.raises(lorart.DeviceError, match="device cuda:0"):
        lorart.LLM(MODEL, device="cuda")


@no_gpu
def test_model_loader_raises_device_error():
    with pytest.raises(lorart.DeviceError, match="device cuda:0"):
        load_core_model(MODEL, 64, 8, device="cuda")


def test_cpu_model_reports_its_device():
    model = load_core_model(MODEL, 64, 8)
    assert model.device == "cpu"
    assert lorart._core.KvCache(model.config, 4, 16).device == "cpu"


def user_error_line(result, command: str) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith(f"lorart {command}: error: ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


@no_gpu
def test_cli_run_device_cuda_is_a_user_error():
    result = run_lorart_cli(
        "run", "--model_dir", str(MODEL), "--max_output_len", "2", "--input_text", "a",
        "--device", "cuda",
    )  # fmt: skip
    assert "device cuda:0" in user_error_line(result, "run")


@no_gpu
def test_cli_serve_device_cuda_is_a_user_error():
    result = run_lorart_cli("serve", "--model_dir", str(MODEL), "--port", "0", "--device", "cuda")
    assert "device cuda:0" in user_error_line(result, "serve")


def test_cli_run_bad_device_names_the_field():
    result = run_lorart_cli(
        "run", "--model_dir", str(MODEL), "--max_output_len", "2", "--input_text", "a",
        "--device", "tpu",
    )  # fmt: skip
    assert "ExecutorConfig.device must be 'cpu', 'cuda' or 'cuda:N'" in user_error_line(
        result, "run"
    )

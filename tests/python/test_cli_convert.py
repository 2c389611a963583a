"""`lorart convert` / `python -m lorart convert`: PEFT dir -> TensorRT-LLM .npy file pair."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from tiny_models import bits, run_lorart_cli

import lorart


@pytest.mark.parametrize("storage", ["float32", "float16", "bfloat16"])
def test_convert_matches_from_peft(all_proj_adapter, tmp_path, storage):
    out = tmp_path / "out"
    res = run_lorart_cli(
        "convert", "-i", str(all_proj_adapter.dir), "-o", str(out), "--storage-type", storage
    )
    assert res.returncode == 0, res.stderr
    assert (out / "model.lora_weights.npy").is_file()
    assert (out / "model.lora_config.npy").is_file()
    assert np.load(out / "model.lora_config.npy").shape[0] == 1

    w, c = lorart.lora.load_npy(str(out))
    ref_w, ref_c = lorart.lora.from_peft(str(all_proj_adapter.dir), dtype=storage)
    assert str(w.numpy().dtype) == storage
    np.testing.assert_array_equal(c.numpy(), ref_c.numpy())
    assert w.numpy().shape == ref_w.numpy().shape
    np.testing.assert_array_equal(bits(w.numpy()), bits(ref_w.numpy()))
    assert np.count_nonzero(w.numpy().astype(np.float32)) > 0


def test_convert_default_storage_type(all_proj_adapter, tmp_path):
    out = tmp_path / "out"
    res = run_lorart_cli("convert", "-i", str(all_proj_adapter.dir), "-o", str(out))
    assert res.returncode == 0, res.stderr
    w, c = lorart.lora.load_npy(str(out))
    ref_w, ref_c = lorart.lora.from_peft(str(all_proj_adapter.dir), dtype=str(w.numpy().dtype))
    np.testing.assert_array_equal(c.numpy(), ref_c.numpy())
    np.testing.assert_array_equal(bits(w.numpy()), bits(ref_w.numpy()))


@pytest.mark.skipif(shutil.which("lorart") is None, reason="lorart console script not on PATH")
def test_console_script(all_proj_adapter, tmp_path):
    out = tmp_path / "out"
    res = run_lorart_cli(
        "convert",
        "-i",
        str(all_proj_adapter.dir),
        "-o",
        str(out),
        "--storage-type",
        "float16",
        exe=shutil.which("lorart"),
    )
    assert res.returncode == 0, res.stderr
    w, _ = lorart.lora.load_npy(str(out))
    assert w.numpy().dtype == np.float16


def test_convert_bad_input_dir(tmp_path):
    missing = tmp_path / "does_not_exist"
    res = run_lorart_cli("convert", "-i", str(missing), "-o", str(tmp_path / "out"))
    assert res.returncode != 0
    assert res.stderr.strip()
    assert "Traceback" not in res.stderr
    assert "does_not_exist" in res.stderr or "adapter_config" in res.stderr
    assert not (tmp_path / "out" / "model.lora_weights.npy").exists()


def test_convert_unsupported_modules_to_save_fails_cleanly(make_adapter, llama_dir, tmp_path):
    ad = make_adapter(
        llama_dir, r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["norm"]
    )
    res = run_lorart_cli("convert", "-i", str(ad.dir), "-o", str(tmp_path / "out"))
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    assert "modules_to_save entries ['norm']" in res.stderr


def test_convert_bad_storage_type(all_proj_adapter, tmp_path):
    res = run_lorart_cli(
        "convert",
        "-i",
        str(all_proj_adapter.dir),
        "-o",
        str(tmp_path / "out"),
        "--storage-type",
        "int8",
    )
    assert res.returncode != 0
    assert "Traceback" not in res.stderr


def test_convert_checks_against_model_dir(all_proj_adapter, llama_dir, llama_other_dir, tmp_path):
    ok = run_lorart_cli(
        "convert",
        "-i",
        str(all_proj_adapter.dir),
        "-o",
        str(tmp_path / "ok"),
        "--storage-type",
        "float32",
        "--model_dir",
        str(llama_dir),
    )
    assert ok.returncode == 0, ok.stderr
    w, _ = lorart.lora.load_npy(str(tmp_path / "ok"))
    ref_w, _ = lorart.lora.from_peft(str(all_proj_adapter.dir))
    np.testing.assert_array_equal(w.numpy(), ref_w.numpy())

    bad = run_lorart_cli(
        "convert",
        "-i",
        str(all_proj_adapter.dir),
        "-o",
        str(tmp_path / "bad"),
        "--model_dir",
        str(llama_other_dir),
    )
    assert bad.returncode != 0
    assert bad.stderr.strip() and "Traceback" not in bad.stderr

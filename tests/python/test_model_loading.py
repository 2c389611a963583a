"""Checkpoint loading: fused projections, shards, stored dtypes, and the load-time errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from lorart.model import Model, SequenceChunk

PROMPT = list(range(3, 40))


def logits(model_dir: Path) -> np.ndarray:
    model = Model.from_pretrained(model_dir, max_num_tokens=64, num_kv_blocks=8)
    return model.forward([SequenceChunk(PROMPT, 0, [0, 1, 2], all_logits=True)])[0]


def rewrite(src: Path, dst: Path, tensors: dict[str, np.ndarray], config_edit=None) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    config = json.loads((src / "config.json").read_text())
    if config_edit:
        config_edit(config)
    (dst / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


@pytest.fixture(scope="module")
def split_weights(llama_dir) -> dict[str, np.ndarray]:
    return load_file(str(llama_dir / "model.safetensors"))


@pytest.fixture(scope="module")
def reference(llama_dir) -> np.ndarray:
    return logits(llama_dir)


def test_fused_qkv_and_gate_up_checkpoint_equals_split(
    llama_dir, split_weights, reference, tmp_path
):
    fused = {}
    for name, value in split_weights.items():
        if ".q_proj." in name:
            parts = [
                split_weights[name.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")
            ]
            fused[name.replace("q_proj", "qkv_proj")] = np.concatenate(parts)
        elif ".gate_proj." in name:
            parts = [value, split_weights[name.replace("gate_proj", "up_proj")]]
            fused[name.replace("gate_proj", "gate_up_proj")] = np.concatenate(parts)
        elif not any(p in name for p in (".k_proj.", ".v_proj.", ".up_proj.")):
            fused[name] = value
    np.testing.assert_array_equal(logits(rewrite(llama_dir, tmp_path, fused)), reference)


def test_sharded_checkpoint_equals_single_file(llama_dir, split_weights, reference, tmp_path):
    names = sorted(split_weights)
    halves = {
        "model-00001-of-00002.safetensors": names[::2],
        "model-00002-of-00002.safetensors": names[1::2],
    }
    shutil.copy(llama_dir / "config.json", tmp_path / "config.json")
    weight_map = {}
    for shard, shard_names in halves.items():
        save_file({n: split_weights[n] for n in shard_names}, str(tmp_path / shard))
        weight_map.update({n: shard for n in shard_names})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    np.testing.assert_array_equal(logits(tmp_path), reference)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        logits(tmp_path)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_checkpoint_is_converted_exactly(llama_dir, split_weights, tmp_path, dtype):
    np_dtype = np.float16 if dtype == "float16" else ml_dtypes.bfloat16
    low = {n: v.astype(np_dtype) for n, v in split_weights.items()}
    widened = {n: v.astype(np.float32) for n, v in low.items()}
    got = logits(
        rewrite(
            llama_dir, tmp_path / "low", low, lambda c: c.update(torch_dtype=dtype, dtype=dtype)
        )
    )
    expected = logits(rewrite(llama_dir, tmp_path / "f32", widened))
    np.testing.assert_array_equal(got, expected)


def test_load_errors_name_the_problem(llama_dir, split_weights, tmp_path):
    missing = dict(split_weights)
    del missing["model.layers.1.mlp.down_proj.weight"]
    with pytest.raises(ValueError, match="missing 1 tensor.*model.layers.1.mlp.down_proj.weight"):
        logits(rewrite(llama_dir, tmp_path / "missing", missing))
    extra = dict(split_weights, **{"model.layers.0.mlp.experts.weight": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="'model.layers.0.mlp.experts.weight' is not part of"):
        logits(rewrite(llama_dir, tmp_path / "extra", extra))
    bad = dict(split_weights)
    bad["model.norm.weight"] = np.zeros(7, np.float32)
    with pytest.raises(
        ValueError,
        match=r"'model.norm.weight' has shape \[7\], config.json "
        r"implies \[64\]",
    ):
        logits(rewrite(llama_dir, tmp_path / "shape", bad))
    with pytest.raises(
        ValueError,
        match="architecture 'GPT2LMHeadModel' is not supported "
        r"\(supported: LlamaForCausalLM",
    ):
        logits(
            rewrite(
                llama_dir,
                tmp_path / "arch",
                split_weights,
                lambda c: c.update(architectures=["GPT2LMHeadModel"]),
            )
        )
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(llama_dir / "config.json", no_weights / "config.json")
    with pytest.raises(FileNotFoundError, match="no model.safetensors or model.safetensors.index"):
        logits(no_weights)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        logits(tmp_path / "nowhere")


def test_kv_cache_of_another_shape_is_refused(llama_dir):
    from lorart import _core

    model = Model.from_pretrained(llama_dir, max_num_tokens=64, num_kv_blocks=8)
    other = model.config.copy()
    other.num_layers = model.config.num_layers - 1
    good = model.kv_cache
    model.kv_cache = _core.KvCache(other, 8, 16)
    with pytest.raises(ValueError, match=r"kv cache was built for \d+ layers"):
        model.forward([SequenceChunk(PROMPT[:4], 0, [0])])
    model.kv_cache = good
    assert model.forward([SequenceChunk(PROMPT[:4], 0, [0])])[0].shape == (
        1,
        model.config.vocab_size,
    )


def test_builder_allocates_only_what_the_checkpoint_fills(llama_dir, split_weights):
    """A config.json claiming 4000 layers next to a 3-layer checkpoint: the builder allocates the
    weights as they arrive, not the 4000 layers' worth up front."""
    from lorart import _core, hf

    config = hf.load_config(llama_dir)
    layers = config.num_layers
    config.num_layers = 4000
    builder = _core.ModelWeightsBuilder(config)
    assert builder.allocated_bytes == 0
    for name, array in split_weights.items():
        builder.add(name, array)
    assert builder.allocated_bytes == sum(a.size for a in split_weights.values()) * 4
    missing = builder.missing()
    assert len(missing) == (4000 - layers) * 9
    with pytest.raises(ValueError, match=r"checkpoint is missing \d+ tensor\(s\)"):
        _core.LlamaModel(config, builder, 64, 8)


def test_config_claiming_4000_layers_fails_without_allocating_them(tmp_path):
    """End to end on the demo checkpoint (3 layers): 4000 layers of its size are 2.4 GB."""
    from lorart.demo import DEMO

    src = DEMO / "model"
    dst = tmp_path / "deep"
    dst.mkdir()
    config = json.loads((src / "config.json").read_text())
    config["num_hidden_layers"] = 4000
    (dst / "config.json").write_text(json.dumps(config))
    (dst / "model.safetensors").symlink_to(src / "model.safetensors")
    # VmHWM: this process's own peak (ru_maxrss would include the forked pytest's pages).
    script = (
        "import re, sys\n"
        "from lorart.model import Model\n"
        "try:\n"
        f"    Model.from_pretrained({str(dst)!r})\n"
        "except ValueError as e:\n"
        "    print('ValueError:', e, file=sys.stderr)\n"
        "    status = open('/proc/self/status').read()\n"
        "    print(re.search(r'VmHWM:\\s+(\\d+) kB', status).group(1))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    assert "ValueError:" in done.stderr, done.stderr
    peak_mib = int(done.stdout.split()[-1]) / 1024
    assert peak_mib < 1024, f"peak RSS {peak_mib:.0f} MiB: the claimed layers were allocated"


def test_load_progress_bar_and_log(llama_dir, capsys, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="lorart"):
        Model.from_pretrained(llama_dir, max_num_tokens=64, num_kv_blocks=8, progress=True)
    bar = capsys.readouterr().err
    assert f"loading {llama_dir.name}" in bar and "100%" in bar
    assert f"loaded {llama_dir} (LlamaForCausalLM" in caplog.text
    Model.from_pretrained(llama_dir, max_num_tokens=64, num_kv_blocks=8)  # small: no bar
    assert capsys.readouterr().err == ""


def test_progress_bar_shows_for_big_work_unless_lorart_logs_above_info():
    import logging

    from lorart.model import PROGRESS_MIN_BYTES, progress_bar

    def shown(size_bytes: int, progress: bool | None = None) -> bool:
        with progress_bar(1, "x", "B", size_bytes, progress) as bar:
            return not bar.disable

    big, small = PROGRESS_MIN_BYTES + 1, PROGRESS_MIN_BYTES
    assert shown(big) and not shown(small) and shown(small, progress=True)
    lorart_logger = logging.getLogger("lorart")
    previous = lorart_logger.level
    lorart_logger.setLevel(logging.WARNING)  # what `lorart ... --quiet` sets
    try:
        assert not shown(big) and shown(big, progress=True)
    finally:
        lorart_logger.setLevel(previous)

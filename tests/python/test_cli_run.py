"""`lorart run` with TensorRT-LLM run.py's flags: input files, truncation, streaming,
profiling, aliases; its log lines, timing line and the tokenizer-vocabulary warning."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from tiny_models import build_causal_lm, run_lorart_cli

from lorart import demo
from lorart.llm import load_tokenizer

DEMO = demo.DEMO
TEXTS = [demo.ZH_PROMPT, demo.JA_PROMPT]
ADAPTERS = ["--lora_dir", str(DEMO / "lora_zh"), str(DEMO / "lora_ja"), "--lora_task_uids"]


def run(*args: str):
    result = run_lorart_cli("run", "--model_dir", str(DEMO / "model"), *args)
    assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def table() -> str:
    """stdout of the reference run: both prompts as --input_text, adapters 0 and 1."""
    return run("--input_text", *TEXTS, *ADAPTERS, "0", "1", "--max_output_len", "12").stdout


def test_reference_table(table):
    assert 'Output [Text 0 Beam 0]: "华盛顿。"' in table
    assert 'Output [Text 1 Beam 0]: "ワシントン D.C."' in table


def test_a_16bit_kv_cache_gives_the_demo_answers():
    # The demo's greedy answers are far from ties: rounding the cached keys / values to bf16
    # does not move them.
    out = run(
        "--input_text",
        *TEXTS,
        *ADAPTERS,
        "0",
        "1",
        "--max_output_len",
        "12",
        "--kv_cache_dtype",
        "bfloat16",
    ).stdout
    assert 'Output [Text 0 Beam 0]: "华盛顿。"' in out
    assert 'Output [Text 1 Beam 0]: "ワシントン D.C."' in out
    bad = run_lorart_cli("run", "--model_dir", str(DEMO / "model"), "--kv_cache_dtype", "int8")
    assert bad.returncode != 0 and "kv_cache_dtype" in bad.stderr


def test_version():
    result = run_lorart_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == "lorart 0.1.0"


def test_streaming_prints_the_same_table(table):
    streamed = run(
        "--input_text", *TEXTS, *ADAPTERS, "0", "1", "--max_output_len", "12", "--streaming"
    )
    assert streamed.stdout == table


def test_streaming_holds_later_outputs_until_earlier_ones_finish():
    # Input 0 generates 30 tokens, input 1 stops after a few: the lines still come in order.
    result = run(
        "--input_text",
        "a b c",
        demo.JA_PROMPT,
        "--lora_dir",
        str(DEMO / "lora_ja"),
        "--lora_task_uids",
        "-1",
        "0",
        "--max_output_len",
        "30",
        "--streaming",
    )
    lines = [line for line in result.stdout.splitlines() if line]
    assert [line.split("]")[0] for line in lines] == [
        "Input [Text 0",
        "Output [Text 0 Beam 0",
        "Input [Text 1",
        "Output [Text 1 Beam 0",
    ]
    assert lines[3] == 'Output [Text 1 Beam 0]: "ワシントン D.C."'


def test_txt_input_file(tmp_path, table):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    result = run("--input_file", str(path), *ADAPTERS, "0", "1", "--max_output_len", "12")
    assert result.stdout == table


def token_ids() -> list[list[int]]:
    tokenizer = load_tokenizer(DEMO / "model")
    return [tokenizer.encode(t).ids for t in TEXTS]


def test_csv_input_file(tmp_path, table):
    path = tmp_path / "prompts.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(token_ids())
    result = run("--input_file", str(path), *ADAPTERS, "0", "1", "--max_output_len", "12")
    assert result.stdout == table


def test_npy_input_file_drops_padding(tmp_path, table):
    ids = token_ids()
    width = max(len(i) for i in ids) + 3
    padded = np.full((len(ids), width), 2, dtype=np.int32)  # 2 = </s>, run.py's pad fallback
    for row, prompt in zip(padded, ids, strict=True):
        row[: len(prompt)] = prompt
    np.save(tmp_path / "prompts.npy", padded)
    result = run(
        "--input_file", str(tmp_path / "prompts.npy"), *ADAPTERS, "0", "1", "--max_output_len", "12"
    )
    assert result.stdout == table


def test_max_input_length_keeps_the_last_tokens():
    tokenizer = load_tokenizer(DEMO / "model")
    ids = tokenizer.encode(demo.ZH_PROMPT).ids
    kept = [ids[0], *ids[-3:]]  # <s> and the last 3 tokens
    result = run("--input_text", demo.ZH_PROMPT, "--max_input_length", "4", "--max_output_len", "2")
    want = tokenizer.decode(kept, skip_special_tokens=False)
    assert f'Input [Text 0]: "{want}"' in result.stdout
    assert "warning: input 0 is longer than --max_input_length 4" in result.stderr


def test_run_py_flags_are_accepted(table):
    result = run(
        "--input_text",
        *TEXTS,
        *ADAPTERS,
        "0",
        "1",
        "--max_output_len",
        "12",
        "--lora_ckpt_source",
        "hf",
        "--num_beams",
        "1",
        "--use_py_session",
    )
    assert result.stdout == table


@pytest.mark.parametrize("flag", ["--hf_model_dir", "--engine_dir"])
def test_model_dir_aliases(flag, table):
    result = run_lorart_cli(
        "run",
        flag,
        str(DEMO / "model"),
        "--input_text",
        *TEXTS,
        *ADAPTERS,
        "0",
        "1",
        "--max_output_len",
        "12",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == table


def test_engine_dir_beside_hf_model_dir_is_ignored(tmp_path, table):
    result = run_lorart_cli(
        "run",
        "--engine_dir",
        str(tmp_path),
        "--hf_model_dir",
        str(DEMO / "model"),
        "--input_text",
        *TEXTS,
        *ADAPTERS,
        "0",
        "1",
        "--max_output_len",
        "12",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == table
    assert f"warning: --engine_dir {tmp_path} is ignored" in result.stderr


def test_logs_and_timing_line_on_stderr_quiet_silences_them():
    result = run("--input_text", *TEXTS, *ADAPTERS, "0", "1", "--max_output_len", "12")
    lines = result.stderr.splitlines()
    assert any(line.startswith("lorart: converted 2 adapter(s)") for line in lines)
    assert any(line.startswith("lorart: loaded ") for line in lines)
    timing = lines[-1]
    assert timing.startswith("lorart: timing: load "), result.stderr
    for part in ("prefill 14 tokens in", "tok/s", "decode ", "2 inputs"):
        assert part in timing
    quiet = run("--input_text", *TEXTS, "--max_output_len", "4", "--quiet")
    assert quiet.stderr == ""
    errors_only = run("--input_text", *TEXTS, "--max_output_len", "4", "--log_level", "error")
    assert errors_only.stderr == ""


def test_run_profiling_prints_the_average_latency():
    result = run("--input_text", *TEXTS, "--max_output_len", "4", "--run_profiling")
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("batch_size: 2, avg latency of 10 iterations: ")
    assert last.endswith(" sec") and float(last.split()[-2]) > 0


@pytest.fixture(scope="module")
def wide_vocab_model(tmp_path_factory):
    """A random Llama whose vocabulary (1100) is larger than the demo tokenizer's (1024)."""
    return build_causal_lm(tmp_path_factory.mktemp("wide"), "llama", seed=3, vocab_size=1100)


def test_warns_when_the_tokenizer_vocabulary_is_smaller_than_the_models(wide_vocab_model):
    result = run_lorart_cli(
        "run",
        "--model_dir",
        str(wide_vocab_model),
        "--tokenizer_dir",
        str(DEMO / "model"),
        "--input_text",
        "a",
        "--max_output_len",
        "2",
    )
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "warning:" in line]
    assert len(warnings) == 1
    assert "the tokenizer has 1024 ids but the model's vocabulary has 1100" in warnings[0]
    same = run("--input_text", "a", "--max_output_len", "2")
    assert "warning" not in same.stderr


def test_timing_line_decode_window_holds_every_decoded_token():
    """One input's first token at 0.1 s, the other's at 0.9 s of 1.0 s: the 10 tokens decoded
    after the first ones took at least 0.9 s, not the 0.1 s after the last first token."""
    from lorart.cli import timing_line
    from lorart.llm import GenerationOutput

    outputs = [
        GenerationOutput("", list(range(9)), "length", [1, 2], first_token_seconds=0.1),
        GenerationOutput("", list(range(3)), "length", [1, 2], first_token_seconds=0.9),
    ]
    line = timing_line(0.5, 1.0, outputs)
    assert "prefill 4 tokens in 0.900 s" in line
    assert "decode 10 tokens in 0.900 s (11.1 tok/s)" in line, line

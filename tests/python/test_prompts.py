"""lorart.prompts: run.py's input formats (.txt, .csv, .npy) and --max_input_length."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from lorart import demo, hf, prompts
from lorart.llm import load_tokenizer

TOKENIZER_FILE = demo.DEMO / "model" / "tokenizer.json"


@pytest.fixture
def tokenizer():
    return load_tokenizer(TOKENIZER_FILE)


def test_text_lines_drop_line_endings_and_blank_lines(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes(b"first prompt\r\n\n  \nsecond \\n prompt\nlast")
    assert prompts.read_text_lines(path) == ["first prompt", "second \\n prompt", "last"]
    path.write_text("\n \n")
    with pytest.raises(ValueError, match="no prompts"):
        prompts.read_text_lines(path)


def test_csv_rows_are_prompts_of_token_ids(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("1, 450, 783\n\n1,29\n")
    assert prompts.read_csv_ids(path) == [[1, 450, 783], [1, 29]]
    path.write_text("1,2\n1,x,3\n")
    with pytest.raises(ValueError, match=r"p.csv line 2: 'x' is not a token id"):
        prompts.read_csv_ids(path)
    path.write_text("")
    with pytest.raises(ValueError, match="no prompts"):
        prompts.read_csv_ids(path)


def test_npy_rows_lose_their_padding(tmp_path):
    path = tmp_path / "p.npy"
    np.save(path, np.array([[1, 450, 783, 2, 2], [2, 2, 1, 29, 5]], dtype=np.int32))
    assert prompts.read_npy_ids(path, pad_id=2) == [[1, 450, 783], [1, 29, 5]]
    assert prompts.read_npy_ids(path, pad_id=None)[0] == [1, 450, 783, 2, 2]
    np.save(path, np.array([1, 450, 783], dtype=np.int64))
    assert prompts.read_npy_ids(path, pad_id=2) == [[1, 450, 783]]


@pytest.mark.parametrize(
    "content, match",
    [
        (b"", "not a readable .npy"),
        (b"\x93NUMPY garbage", "not a readable .npy"),
        (np.zeros((2, 3), np.float32), "token ids must be integers, got dtype float32"),
        (np.zeros((1, 2, 3), np.int32), r"expected a \[prompts, length\] array, got shape"),
        (np.array([[5, 5, 5]], np.int32), "row 0: no token ids"),
    ],
)
def test_npy_errors_name_the_file(tmp_path, content, match):
    path = tmp_path / "p.npy"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        np.save(path, content)
    with pytest.raises(ValueError, match=match):
        prompts.read_npy_ids(path, pad_id=5)


def test_pad_id_is_the_end_token_without_a_pad_token(tokenizer, tmp_path):
    model_config = hf.load_config(demo.DEMO / "model")
    # The demo's tokenizer_config.json names eos "</s>" and no pad token: run.py pads with eos.
    assert prompts.pad_token_id(tokenizer, TOKENIZER_FILE, model_config) == 2
    (tmp_path / "tokenizer_config.json").write_text('{"pad_token": {"content": "<unk>"}}')
    assert prompts.pad_token_id(tokenizer, tmp_path / "tokenizer.json", model_config) == 0


def test_text_truncation_keeps_the_last_tokens_as_run_py(tokenizer, caplog):
    transformers = pytest.importorskip("transformers")
    # run.py's load_tokenizer sets truncation_side='left'; the reference is that tokenizer.
    reference = transformers.AutoTokenizer.from_pretrained(
        demo.DEMO / "model", truncation_side="left"
    )
    texts = [demo.ZH_PROMPT, "a"]
    with caplog.at_level(logging.WARNING, logger="lorart"):
        got = prompts.tokenize(tokenizer, texts, max_input_length=5, add_special_tokens=True)
    for text, ids in zip(texts, got, strict=True):
        assert ids == reference(text, truncation=True, max_length=5)["input_ids"]
    assert got[0][0] == 1 and len(got[0]) == 5  # <s> kept
    assert "input 0 is longer than --max_input_length 5" in caplog.text
    assert "input 1" not in caplog.text
    # The tokenizer is left as it was: no truncation afterwards.
    assert len(tokenizer.encode(demo.ZH_PROMPT).ids) > 5


def test_keep_last_cuts_token_id_prompts_from_the_left(caplog):
    with caplog.at_level(logging.WARNING, logger="lorart"):
        assert prompts.keep_last([[1, 2, 3, 4], [5]], 2) == [[3, 4], [5]]
    assert "input 0 has 4 tokens, over --max_input_length 2" in caplog.text

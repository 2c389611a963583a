"""Prompts for ``lorart run`` in TensorRT-LLM ``run.py``'s input formats.

``run.py`` takes ``--input_text`` or an ``--input_file``: ``.txt`` (one prompt per line,
tokenized), ``.csv`` (one prompt of token ids per line) or ``.npy`` (a ``[prompts, length]``
array of token ids whose padding is dropped). Every prompt keeps only its last
``--max_input_length`` tokens: ``run.py``'s tokenizer truncates on the left, and its ``.csv`` /
``.npy`` readers take ``ids[-max_input_length:]``.

Errors are ``ValueError`` naming the file and the line or row.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from lorart._core import ModelConfig

logger = logging.getLogger(__name__)


def tokenize(
    tokenizer: Tokenizer, texts: list[str], max_input_length: int, add_special_tokens: bool
) -> list[list[int]]:
    """Token ids of each text, longer ones cut to their last ``max_input_length`` tokens (the
    special tokens the tokenizer adds, such as ``<s>``, are kept and counted)."""
    tokenizer.enable_truncation(max_input_length, direction="left")
    try:
        encodings = tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)
    finally:
        tokenizer.no_truncation()
    for i, enc in enumerate(encodings):
        if enc.overflowing:
            logger.warning(
                "input %d is longer than --max_input_length %d: kept its last tokens",
                i,
                max_input_length,
            )
    return [enc.ids for enc in encodings]


def keep_last(prompts: list[list[int]], max_input_length: int) -> list[list[int]]:
    """Each prompt's last ``max_input_length`` ids (``run.py``'s ``ids[-max_input_length:]``)."""
    for i, ids in enumerate(prompts):
        if len(ids) > max_input_length:
            logger.warning(
                "input %d has %d tokens, over --max_input_length %d: kept the last %d",
                i,
                len(ids),
                max_input_length,
                max_input_length,
            )
    return [ids[-max_input_length:] for ids in prompts]


def read_text_lines(path: str | Path) -> list[str]:
    """One prompt per line, line endings removed; blank lines are skipped. Undecodable bytes
    become U+FFFD, as in ``run.py``."""
    with open(path, encoding="utf-8", errors="replace") as f:
        texts = [line.rstrip("\r\n") for line in f]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError(f"{path}: no prompts (every line is blank)")
    return texts


def read_csv_ids(path: str | Path) -> list[list[int]]:
    """One prompt per line, its token ids separated by commas; blank lines are skipped."""
    prompts = []
    with open(path, encoding="utf-8", newline="") as f:
        for line, row in enumerate(csv.reader(f), start=1):
            cells = [c.strip() for c in row if c.strip()]
            if not cells:
                continue
            try:
                prompts.append([int(c) for c in cells])
            except ValueError:
                bad = next(c for c in cells if not _is_int(c))
                raise ValueError(f"{path} line {line}: {bad!r} is not a token id") from None
    if not prompts:
        raise ValueError(f"{path}: no prompts (the file has no token ids)")
    return prompts


def read_npy_ids(path: str | Path, pad_id: int | None) -> list[list[int]]:
    """Rows of a 2-D integer array (a 1-D array is one prompt), ``pad_id`` entries dropped."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, EOFError, OSError) as err:
        raise ValueError(
            f"{path}: not a readable .npy array ({err or type(err).__name__})"
        ) from None
    if array.dtype.kind not in "iu":
        raise ValueError(f"{path}: token ids must be integers, got dtype {array.dtype}")
    if array.ndim not in (1, 2):
        raise ValueError(f"{path}: expected a [prompts, length] array, got shape {array.shape}")
    rows = array[None] if array.ndim == 1 else array
    prompts = []
    for i, row in enumerate(rows):
        ids = row[row != pad_id] if pad_id is not None else row
        if ids.size == 0:
            raise ValueError(f"{path} row {i}: no token ids (only padding, id {pad_id})")
        prompts.append([int(t) for t in ids])
    if not prompts:
        raise ValueError(f"{path}: no prompts (shape {array.shape})")
    return prompts


def pad_token_id(
    tokenizer: Tokenizer, tokenizer_file: str | Path, model_config: ModelConfig
) -> int | None:
    """The id ``.npy`` rows are padded with: the tokenizer's pad token, else its end token, else
    the model's ``eos_token_id`` (``run.py`` pads with the end token when there is no pad)."""
    config_path = Path(tokenizer_file).parent / "tokenizer_config.json"
    names = {}
    if config_path.is_file():
        try:
            with open(config_path, encoding="utf-8") as f:
                names = json.load(f)
        except (OSError, ValueError):
            names = {}  # the tokenizer itself loaded; a bad side file only loses the pad name
    for key in ("pad_token", "eos_token"):
        token = names.get(key) if isinstance(names, dict) else None
        if isinstance(token, dict):
            token = token.get("content")
        if isinstance(token, str) and tokenizer.token_to_id(token) is not None:
            return tokenizer.token_to_id(token)
    return model_config.eos_token_ids[0] if model_config.eos_token_ids else None


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True

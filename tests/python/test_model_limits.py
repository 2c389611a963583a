"""Sizes, positions and ids at and past their limits in lorart.model.Model (issue 8).

Every size computed from user input is refused with a ValueError naming the field and the limit
before anything is allocated; a batch the kernels cannot take (positions past int32 or
max_position_embeddings, ids out of range) is refused before the KV cache is touched; and
generate_greedy stops at the model's end-of-sequence token.
"""

from __future__ import annotations

import numpy as np
import pytest

from lorart import _core
from lorart import model as model_module
from lorart.demo import DEMO
from lorart.model import Model, SequenceChunk

DEMO_MODEL = DEMO / "model"  # vocab 1024, max_position_embeddings 128, 3 layers, 2 x 32 KV width
BLOCKS, BLOCK = 8, 16
PER_TOKEN = 3 * 2 * 64 * 4  # KV bytes per token


@pytest.fixture(scope="module")
def demo() -> Model:
    return Model.from_pretrained(DEMO_MODEL, max_num_tokens=64, num_kv_blocks=BLOCKS)


@pytest.fixture
def no_weight_load(monkeypatch):
    """Sizes must be refused before a single checkpoint tensor is read."""

    def refuse(*args, **kwargs):
        raise AssertionError("weights were read before the sizes were checked")

    monkeypatch.setattr(model_module.hf, "iter_weight_ranges", refuse)


# ------------------------------------------------------------------------------ load-time sizes


@pytest.mark.parametrize("blocks", [2**51, 2**31, 0, -1])
def test_kv_block_counts_outside_int32_are_refused(blocks, no_weight_load):
    # 2**51 blocks made the byte count wrap to 0: a zero-byte cache, then a segfault in forward.
    with pytest.raises(
        ValueError,
        match=rf"num_kv_blocks must be in \[1, 2147483647\] \(block ids are int32\), got {blocks}",
    ):
        Model.from_pretrained(DEMO_MODEL, num_kv_blocks=blocks)


def test_sizes_past_int64_are_value_errors(no_weight_load):
    with pytest.raises(ValueError, match=r"num_kv_blocks = 1180591620717411303424 is out of the "):
        Model.from_pretrained(DEMO_MODEL, num_kv_blocks=2**70)
    with pytest.raises(
        ValueError, match=r"block_size = -1180591620717411303424 is out of the int64"
    ):
        Model.from_pretrained(DEMO_MODEL, block_size=-(2**70))
    with pytest.raises(TypeError, match="num_kv_blocks must be an integer, got float"):
        Model.from_pretrained(DEMO_MODEL, num_kv_blocks=1.5)


@pytest.mark.parametrize("block_size", [0, 1025, 2**40])
def test_block_size_outside_its_range_is_refused(block_size, no_weight_load):
    with pytest.raises(ValueError, match=rf"block_size must be in \[1, 1024\], got {block_size}"):
        Model.from_pretrained(DEMO_MODEL, block_size=block_size)


def test_kv_pool_over_the_host_memory_is_refused(no_weight_load):
    blocks = 2**31 - 1
    need = blocks * 1024 * PER_TOKEN
    assert need > _core.host_memory_limit()
    with pytest.raises(
        ValueError,
        match=rf"cannot allocate the KV cache \(num_kv_blocks = {blocks}, block_size = 1024\): "
        rf"{need} bytes .* exceed this host's memory limit of {_core.host_memory_limit()} bytes",
    ):
        Model.from_pretrained(DEMO_MODEL, num_kv_blocks=blocks, block_size=1024)
    assert _core.KvCache.checked_bytes(_demo_config(), BLOCKS, BLOCK) == BLOCKS * BLOCK * PER_TOKEN


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(max_num_tokens=0), r"max_num_tokens must be in \[1, 2147483647\].*got 0"),
        (dict(max_num_tokens=2**31), r"max_num_tokens must be in \[1, 2147483647\]"),
        (dict(max_num_tokens=2**70), r"max_num_tokens = 1180591620717411303424 is out of"),
        (
            dict(max_num_tokens=2**31 - 1),
            r"cannot allocate the LlamaModel workspace \(max_num_tokens = 2147483647, "
            r"max_lora_rank = 64\): \d+ bytes .* exceed this host's memory limit",
        ),
        (dict(max_lora_rank=0), r"max_lora_rank must be in \[1, 2147483647\], got 0"),
    ],
)
def test_workspace_sizes_are_refused_before_loading(kwargs, message, no_weight_load):
    with pytest.raises(ValueError, match=message):
        Model.from_pretrained(DEMO_MODEL, **kwargs)


def _demo_config():
    from lorart import hf

    return hf.load_config(DEMO_MODEL)


def test_config_sizes_are_refused_before_loading(no_weight_load, tmp_path):
    config = _demo_config()
    config.vocab_size = 2**31
    with pytest.raises(ValueError, match="vocab_size = 2147483648 exceeds the limit 2147483647"):
        _core.ModelWeightsBuilder(config)
    config.vocab_size = 2**31 - 1
    config.hidden_size = 2**20
    with pytest.raises(
        ValueError, match=r"cannot allocate the model's float32 weights \(config.json's sizes\)"
    ):
        _core.ModelWeightsBuilder(config)


def test_model_config_is_a_copy(demo):
    # Editing the config the checks rely on would let token ids past the embedding through.
    config = demo._core.config
    config.vocab_size = 10**6
    assert demo._core.config.vocab_size == 1024
    with pytest.raises(ValueError, match=r"token_ids\[0\] = 5000 is out of range \[0, vocab_size"):
        _raw_forward(demo, tokens=[5000], context=0, table=[0])


# ------------------------------------------------------------------------------ forward batches


PROBE, SPARE = BLOCKS - 1, BLOCKS - 2


def _probed(model: Model) -> np.ndarray:
    """Fills block PROBE with 16 cached tokens and returns the logits of a decode step that
    attends to all of them: a later write into PROBE changes what _probe returns."""
    model.forward([SequenceChunk(list(range(10, 10 + BLOCK)), 0, [PROBE])])
    return _probe(model)


def _probe(model: Model) -> np.ndarray:
    return model.forward([SequenceChunk([30], BLOCK, [PROBE, SPARE])])[0]


def _raw_forward(model: Model, tokens, context, table, slot=-1):
    """The binding's forward with hand-made arrays: the C++ checks, without the Python ones."""
    return model._core.forward(
        np.array(tokens, np.int32),
        (np.int64(context) + np.arange(len(tokens))).astype(np.int32),
        np.array([0, len(tokens)], np.int32),
        np.array([context], np.int32),
        np.array([table], np.int32),
        np.array([slot], np.int32),
        np.array([len(tokens) - 1], np.int32),
        model.kv_cache,
        [],
    )


OK = SequenceChunk([1, 2, 3], 0, [0])


def bad_chunks():
    """name -> (the chunk put after OK, exception, regex); the message names chunk 1. Their
    block tables point at the probe's block, so a write that got through would show."""
    full = [PROBE] * (BLOCKS + 1)
    return {
        "position past max_position_embeddings": (
            SequenceChunk([1, 2, 3], 126, full),
            ValueError,
            r"chunk 1: context_len 126 \+ 3 token\(s\) reaches position 129, past "
            r"max_position_embeddings = 128",
        ),
        "position past int32": (
            SequenceChunk([1, 2, 3], 2**31 - 2, full),
            ValueError,
            r"chunk 1: context_len 2147483646 \+ 3 token\(s\) reaches position 2147483649",
        ),
        "context_len past int32": (
            SequenceChunk([1], 2**31, full),
            ValueError,
            r"chunk 1: context_len 2147483648 \+ 1 token\(s\) reaches position",
        ),
        "negative context_len": (
            SequenceChunk([1], -1, [1]),
            ValueError,
            r"chunk 1: context_len = -1 is negative",
        ),
        "float context_len": (
            SequenceChunk([1], 2.0, [1]),
            TypeError,
            r"chunk 1: context_len must be an integer, got float",
        ),
        "token id = vocab": (
            SequenceChunk([4, 1024], 0, [1]),
            ValueError,
            r"chunk 1: token_ids\[1\] = 1024 is out of range \[0, 1024\)",
        ),
        "token id past int64": (
            SequenceChunk([4, 2**70], 0, [1]),
            ValueError,
            r"chunk 1: token_ids\[1\] = 1180591620717411303424 is out of range",
        ),
        "negative token id": (
            SequenceChunk(np.array([-3]), 0, [1]),
            ValueError,
            r"chunk 1: token_ids\[0\] = -3 is out of range",
        ),
        "float token ids": (
            SequenceChunk([1.0, 2.0], 0, [1]),
            TypeError,
            r"chunk 1: token_ids\[0\] must be an integer, got float",
        ),
        "no tokens": (SequenceChunk([], 0, [1]), ValueError, r"chunk 1: token_ids is empty"),
        "block id = num_kv_blocks": (
            SequenceChunk([1], 0, [BLOCKS]),
            ValueError,
            rf"chunk 1: block_table\[0\] = {BLOCKS} is out of range \[0, {BLOCKS}\)",
        ),
        "block id past int32": (
            SequenceChunk([1], 0, [2**40]),
            ValueError,
            r"chunk 1: block_table\[0\] = 1099511627776 is out of range",
        ),
        "block_table too short": (
            SequenceChunk(list(range(20)), 0, [1]),
            ValueError,
            r"chunk 1: block_table has 1 blocks but positions up to 20 need 2",
        ),
        "lora_slot past int32": (
            SequenceChunk([1], 0, [1], lora_slot=2**40),
            ValueError,
            r"chunk 1: lora_slot = 1099511627776 names no loaded adapter \(0 slot\(s\)",
        ),
        "lora_slot -2": (
            SequenceChunk([1], 0, [1], lora_slot=-2),
            ValueError,
            r"chunk 1: lora_slot = -2 names no loaded adapter",
        ),
        "over max_num_tokens": (
            SequenceChunk(list(range(62)), 0, [1, 2, 3, 4]),
            ValueError,
            r"forward: 65 tokens in 2 chunk\(s\); at most max_num_tokens = 64",
        ),
    }


@pytest.mark.parametrize("name", list(bad_chunks()))
def test_bad_chunks_are_refused_before_the_cache_is_touched(demo, name):
    before = _probed(demo)
    bad, error, message = bad_chunks()[name]
    with pytest.raises(error, match=message):
        demo.forward([OK, bad])
    np.testing.assert_array_equal(_probe(demo), before)


@pytest.mark.parametrize(
    ("context", "tokens", "table", "message"),
    [
        (
            126,
            [1, 2, 3],
            [PROBE] * (BLOCKS + 1),
            r"sequence 0: context_lens\[0\] = 126 plus 3 token\(s\) reaches position 129, past "
            r"max_position_embeddings = 128",
        ),
        (
            2**31 - 2,
            [1, 2, 3],
            [PROBE] * (BLOCKS + 1),
            r"context_lens\[0\] = 2147483646 plus 3 token\(s\) reaches position 2147483649",
        ),
        (-5, [1], [PROBE], r"context_lens\[0\] = -5 is negative"),
        (0, [1, 2000], [PROBE], r"token_ids\[1\] = 2000 is out of range \[0, vocab_size = 1024\)"),
        (0, [1], [BLOCKS], rf"block_tables\[0, 0\] = {BLOCKS} is out of range"),
    ],
)
def test_the_core_checks_the_same_without_the_python_layer(demo, context, tokens, table, message):
    before = _probed(demo)
    with pytest.raises(ValueError, match=message):
        _raw_forward(demo, tokens, context, table)
    np.testing.assert_array_equal(_probe(demo), before)


def test_the_last_position_still_runs(demo):
    logits = demo.forward([SequenceChunk([1, 2, 3], 125, list(range(BLOCKS)))])[0]
    assert logits.shape == (1, 1024) and np.isfinite(logits).all()


# ------------------------------------------------------------------------------ generate_greedy

# The demo model answers this prompt ("What is the capital of France? \nAnswer:") with a few
# tokens and then its end-of-sequence token, id 2.
PROMPT = [1, 539, 575, 523, 527, 525, 519, 517, 950, 542, 920, 312, 535, 529, 536]


def test_generate_greedy_stops_at_the_models_eos_by_default(demo):
    assert list(demo.config.eos_token_ids) == [2]
    unstopped = demo.generate_greedy([PROMPT], 20, eos_token_id=[])[0]
    assert len(unstopped) == 20
    first = unstopped.index(2)  # the greedy continuation does reach EOS ...
    assert first < 19  # ... well before max_new_tokens
    assert demo.generate_greedy([PROMPT], 20)[0] == unstopped[: first + 1]
    assert demo.generate_greedy([PROMPT], 20, eos_token_id=2)[0] == unstopped[: first + 1]


def test_generate_greedy_accepts_a_list_of_eos_ids(demo):
    unstopped = demo.generate_greedy([PROMPT], 6, eos_token_id=[])[0]
    second = unstopped[1]
    assert demo.generate_greedy([PROMPT], 6, eos_token_id=[999, second])[0] == unstopped[:2]
    assert demo.generate_greedy([PROMPT], 6, eos_token_id=(second,))[0] == unstopped[:2]
    # One sequence stopping early leaves the others of the batch as they run alone.
    other = [1, 807, 667, 548, 503, 511]
    alone = demo.generate_greedy([other], 6, eos_token_id=[second])[0]
    both = demo.generate_greedy([PROMPT, other], 6, eos_token_id=[second])
    assert both == [unstopped[:2], alone]


def test_generate_greedy_argument_errors(demo):
    assert demo.generate_greedy([PROMPT, [3]], 0) == [[], []]
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0, got -1"):
        demo.generate_greedy([PROMPT], -1)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        demo.generate_greedy([PROMPT, []], 3)
    with pytest.raises(
        ValueError,
        match=r"prompt 0: 15 tokens \+ max_new_tokens 115 need 129 positions, past "
        r"max_position_embeddings = 128",
    ):
        demo.generate_greedy([PROMPT], 115)
    with pytest.raises(TypeError, match=r"eos_token_id\[0\] must be an integer"):
        demo.generate_greedy([PROMPT], 3, eos_token_id=["</s>"])

"""Every validation rule of lorart.lora.validate (the C++ checks), each with its message."""

from __future__ import annotations

import numpy as np
import pytest

import lorart
from lorart import lora


@pytest.fixture(scope="module")
def model() -> lorart.ModelConfig:
    cfg = lorart.hf.config_from_dict(
        {
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": 100,
            "hidden_size": 32,
            "intermediate_size": 48,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        }
    )
    return cfg


def adapter(model, rows, dtype=np.float32, pad=0):
    """(LoraWeights, LoraConfig) with random values for rows [(module_id, layer, r)]."""
    rng = np.random.default_rng(0)
    lengths = [r * sum(model.lora_module_dims(m)) for m, _, r in rows]
    values = np.zeros((len(rows), max(lengths) + pad), dtype=np.float32)
    for i, n in enumerate(lengths):
        values[i, :n] = rng.standard_normal(n)
    return lorart.LoraWeights(values.astype(dtype)), lorart.LoraConfig(
        np.array(rows, dtype=np.int32)
    )


def check(match, model, weights, config, **kw):
    with pytest.raises(lorart.LoraError, match=match) as info:
        lora.validate(weights, config, model, **kw)
    assert isinstance(info.value, ValueError)


def test_valid_adapter_passes(model):
    weights, config = adapter(model, [(m, layer, 4) for layer in range(2) for m in range(8)])
    lora.validate(weights, config, model, max_lora_rank=4, dtype="float32")


def test_missing_tensor(model):
    weights, config = adapter(model, [(1, 0, 2)])
    check("lora_weights is missing", model, None, config)
    check("lora_config is missing", model, weights, None)


def test_row_count_mismatch(model):
    weights, _ = adapter(model, [(1, 0, 2), (2, 0, 2)])
    _, config = adapter(model, [(1, 0, 2)])
    check("lora_weights has 2 rows but lora_config has 1", model, weights, config)


def test_config_shape_and_dtype_rules():
    with pytest.raises(lorart.LoraError, match="must have dtype int32, got int64"):
        lorart.LoraConfig(np.zeros((2, 3), dtype=np.int64))
    with pytest.raises(lorart.LoraError, match="must have 3 columns .* or 4 .is_dora appended"):
        lorart.LoraConfig(np.zeros((2, 5), dtype=np.int32))
    assert lorart.LoraConfig(np.zeros((2, 4), dtype=np.int32)).num_columns == 4
    with pytest.raises(lorart.LoraError, match="leading dim of the 3-D form must be 1"):
        lorart.LoraConfig(np.zeros((2, 2, 3), dtype=np.int32))
    with pytest.raises(lorart.LoraError, match="lora_weights must have dtype float32"):
        lorart.LoraWeights(np.zeros((2, 4), dtype=np.int32))


def test_unknown_module_id(model):
    weights, _ = adapter(model, [(1, 0, 2)])
    config = lorart.LoraConfig(np.array([[42, 0, 2]], dtype=np.int32))
    check(r"row 0: module_id 42 is unknown \(valid ids are 0..17\)", model, weights, config)


def test_module_the_model_lacks(model):
    weights, _ = adapter(model, [(1, 0, 2)])
    config = lorart.LoraConfig(np.array([[9, 0, 2]], dtype=np.int32))
    check(
        r"module_id 9 \(cross_attn_q\) is not a LoRA module of LlamaForCausalLM",
        model,
        weights,
        config,
    )


@pytest.mark.parametrize("layer", [-1, 2])
def test_layer_out_of_range(model, layer):
    weights, _ = adapter(model, [(1, 0, 2)])
    config = lorart.LoraConfig(np.array([[1, layer, 2]], dtype=np.int32))
    check(rf"row 0: layer_idx {layer} is out of range \[0, 2\)", model, weights, config)


@pytest.mark.parametrize("rank", [0, 9])
def test_rank_out_of_range(model, rank):
    weights, _ = adapter(model, [(1, 0, 8)])
    config = lorart.LoraConfig(np.array([[1, 0, rank]], dtype=np.int32))
    check(
        rf"adapter_size {rank} must be in \[1, max_lora_rank = 8\]",
        model,
        weights,
        config,
        max_lora_rank=8,
    )


def test_duplicate_module_layer(model):
    weights, config = adapter(model, [(1, 0, 2), (2, 0, 2), (1, 0, 2)])
    check("rows 0 and 2 both adapt attn_q of layer 0", model, weights, config)


def test_row_too_short(model):
    weights, _ = adapter(model, [(1, 0, 2)])  # holds 2 * (32 + 32) = 128 values
    config = lorart.LoraConfig(np.array([[1, 0, 3]], dtype=np.int32))
    check(r"needs 192 values \(3\*32 in \+ 32\*3 out\) but rows hold 128", model, weights, config)


def test_dtype_mismatch(model):
    weights, config = adapter(model, [(1, 0, 2)], dtype=np.float16)
    check(
        "dtype float16 does not match the model dtype float32",
        model,
        weights,
        config,
        dtype="float32",
    )
    lora.validate(weights, config, model, dtype="float16")


@pytest.mark.parametrize("bad, word", [(np.nan, "nan"), (np.inf, "inf")])
def test_non_finite_values(model, bad, word):
    weights, config = adapter(model, [(1, 0, 2), (5, 1, 2)], pad=3)
    values = weights.numpy().copy()
    values[1, 7] = bad
    check(
        rf"row 1 \(mlp_h_to_4h, layer 1\): value at column 7 is {word}",
        model,
        lorart.LoraWeights(values),
        config,
    )
    values = weights.numpy().copy()
    values[0, -1] = bad  # padding of the shorter row 0 is never read
    lora.validate(lorart.LoraWeights(values), config, model)

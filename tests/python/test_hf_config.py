"""lorart.hf.load_config on config.json files as transformers v5 and older versions write them."""

from __future__ import annotations

import json

import pytest
from tiny_models import TINY_LLAMA, Dims

import lorart

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def write_config(d, cfg: dict):
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg, indent=2))
    return d


def legacy_llama(**overrides) -> dict:
    """A config.json as transformers 4.x wrote it (rope_theta / rope_scaling at top level)."""
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 128,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "rope_theta": 500000.0,
        "rope_scaling": dict(LLAMA3_ROPE),
        "tie_word_embeddings": True,
        "attention_bias": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.45.0",
    }
    cfg.update(overrides)
    return cfg


def assert_llama3_scaling(rs):
    assert rs.rope_type == "llama3"
    assert rs.factor == pytest.approx(8.0)
    assert rs.low_freq_factor == pytest.approx(1.0)
    assert rs.high_freq_factor == pytest.approx(4.0)
    assert rs.original_max_position_embeddings == 8192


def assert_dims(mc, dims: Dims):
    for mid in range(1, 8):
        assert tuple(mc.lora_module_dims(mid)) == dims.module_dims(mid), mid


def test_saved_tiny_llama(llama_dir):
    mc = lorart.hf.load_config(str(llama_dir))
    assert isinstance(mc, lorart.ModelConfig)
    assert mc.architecture == "LlamaForCausalLM"
    assert mc.vocab_size == 128
    assert mc.hidden_size == 64
    assert mc.intermediate_size == 96
    assert mc.num_layers == 3
    assert mc.num_attention_heads == 4
    assert mc.num_kv_heads == 2  # GQA
    assert mc.head_dim == 16
    assert mc.rope_theta == pytest.approx(10000.0)
    assert mc.tie_word_embeddings is False
    assert mc.attention_bias is False
    assert mc.dtype == "float32"
    assert_dims(mc, Dims.from_kwargs(TINY_LLAMA))


def test_lora_module_dims_gqa(model_config):
    assert tuple(model_config.lora_module_dims(1)) == (64, 64)  # q: 4 heads * 16
    assert tuple(model_config.lora_module_dims(2)) == (64, 32)  # k: 2 kv heads * 16
    assert tuple(model_config.lora_module_dims(3)) == (64, 32)  # v
    assert tuple(model_config.lora_module_dims(4)) == (64, 64)  # o
    assert tuple(model_config.lora_module_dims(5)) == (64, 96)  # gate_proj
    assert tuple(model_config.lora_module_dims(6)) == (96, 64)  # down_proj
    assert tuple(model_config.lora_module_dims(7)) == (64, 96)  # up_proj


def test_v5_rope_parameters_llama3(tmp_path):
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        **{**TINY_LLAMA, "max_position_embeddings": 131072},
        architectures=["LlamaForCausalLM"],
        rope_parameters={"rope_theta": 500000.0, **LLAMA3_ROPE},
        tie_word_embeddings=True,
        dtype="float16",
    )
    cfg.save_pretrained(str(tmp_path))
    raw = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" in raw and "rope_theta" not in raw  # really the v5 form

    mc = lorart.hf.load_config(str(tmp_path))
    assert mc.rope_theta == pytest.approx(500000.0)
    assert_llama3_scaling(mc.rope_scaling)
    assert mc.tie_word_embeddings is True
    assert mc.dtype == "float16"
    assert mc.num_kv_heads == 2


def test_v5_rope_parameters_default_theta(tmp_path):
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        **TINY_LLAMA,
        architectures=["LlamaForCausalLM"],
        rope_parameters={"rope_type": "default", "rope_theta": 250000.0},
    )
    cfg.save_pretrained(str(tmp_path))
    mc = lorart.hf.load_config(str(tmp_path))
    assert mc.rope_theta == pytest.approx(250000.0)
    assert mc.rope_scaling is None or mc.rope_scaling.rope_type != "llama3"


@pytest.mark.parametrize("type_key", ["rope_type", "type"])
def test_legacy_rope_scaling_llama3(tmp_path, type_key):
    rs = dict(LLAMA3_ROPE)
    rs[type_key] = rs.pop("rope_type")
    write_config(tmp_path, legacy_llama(rope_scaling=rs))
    mc = lorart.hf.load_config(str(tmp_path))
    assert mc.rope_theta == pytest.approx(500000.0)
    assert_llama3_scaling(mc.rope_scaling)
    assert mc.dtype == "bfloat16"
    assert mc.tie_word_embeddings is True
    assert mc.head_dim == 16  # no head_dim key: hidden / heads
    assert_dims(mc, Dims.from_kwargs(TINY_LLAMA))


def test_legacy_no_rope_scaling_and_no_kv_heads(tmp_path):
    cfg = legacy_llama(rope_scaling=None, rope_theta=1000000.0, tie_word_embeddings=False)
    del cfg["num_key_value_heads"]  # absent means multi-head attention
    write_config(tmp_path, cfg)
    mc = lorart.hf.load_config(str(tmp_path))
    assert mc.rope_theta == pytest.approx(1e6)
    assert mc.rope_scaling is None or mc.rope_scaling.rope_type != "llama3"
    assert mc.num_kv_heads == 4
    assert mc.tie_word_embeddings is False
    assert tuple(mc.lora_module_dims(2)) == (64, 64)


def test_llama_attention_bias(tmp_path):
    write_config(tmp_path, legacy_llama(attention_bias=True))
    assert lorart.hf.load_config(str(tmp_path)).attention_bias is True


def test_mistral_explicit_head_dim(tmp_path):
    from transformers import MistralConfig

    kw = {**TINY_LLAMA, "head_dim": 32}  # head_dim != hidden / heads (as in Mistral-Nemo)
    MistralConfig(**kw, architectures=["MistralForCausalLM"]).save_pretrained(str(tmp_path))
    mc = lorart.hf.load_config(str(tmp_path))
    assert mc.architecture == "MistralForCausalLM"
    assert mc.head_dim == 32
    assert mc.num_kv_heads == 2
    assert mc.attention_bias is False
    assert tuple(mc.lora_module_dims(1)) == (64, 128)
    assert tuple(mc.lora_module_dims(2)) == (64, 64)
    assert tuple(mc.lora_module_dims(4)) == (128, 64)
    assert_dims(mc, Dims.from_kwargs(kw))


@pytest.mark.parametrize("tie", [False, True])
def test_qwen2(tmp_path, tie):
    from transformers import Qwen2Config

    kw = {k: v for k, v in TINY_LLAMA.items()}
    Qwen2Config(**kw, architectures=["Qwen2ForCausalLM"], tie_word_embeddings=tie).save_pretrained(
        str(tmp_path)
    )
    raw = json.loads((tmp_path / "config.json").read_text())
    assert "attention_bias" not in raw  # Qwen2 always has q/k/v biases; the key is implicit

    mc = lorart.hf.load_config(str(tmp_path))
    assert mc.architecture == "Qwen2ForCausalLM"
    assert mc.attention_bias is True
    assert mc.tie_word_embeddings is tie
    assert mc.head_dim == 16 and mc.num_kv_heads == 2
    assert_dims(mc, Dims.from_kwargs(kw))


def test_unsupported_architecture(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_embd=64, n_layer=2, n_head=4, architectures=["GPT2LMHeadModel"]).save_pretrained(
        str(tmp_path)
    )
    with pytest.raises(ValueError, match="GPT2LMHeadModel") as exc:
        lorart.hf.load_config(str(tmp_path))
    msg = str(exc.value)
    for supported in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"):
        assert supported in msg


def test_missing_config_json(tmp_path):
    with pytest.raises((FileNotFoundError, ValueError), match=r"config\.json"):
        lorart.hf.load_config(str(tmp_path))


# ----------------------------------------------------------------------------- hostile configs


def load_edited(tmp_path, **changes):
    cfg = legacy_llama()
    for key, value in changes.items():
        if value is DELETE:
            del cfg[key]
        else:
            cfg[key] = value
    write_config(tmp_path, cfg)
    return lorart.hf.load_config(str(tmp_path))


DELETE = object()


@pytest.mark.parametrize(
    "changes,match",
    [
        # before: ZeroDivisionError
        ({"num_attention_heads": 0}, r"num_attention_heads is 0; expected an integer in \[1, "),
        # before: silently multi-head attention
        ({"num_key_value_heads": 0}, r"num_key_value_heads is 0; expected an integer in \[1, "),
        # before: silently 1e-6
        ({"rms_norm_eps": 0}, "rms_norm_eps is 0; expected a finite number > 0"),
        ({"rms_norm_eps": -1e-5}, "rms_norm_eps is -1e-05; expected a finite number > 0"),
        ({"rms_norm_eps": float("nan")}, "rms_norm_eps is NaN; expected a finite number > 0"),
        # before: AttributeError
        ({"rope_scaling": "linear"}, r'rope_scaling is "linear"; expected an object \(or null\)'),
        ({"rope_parameters": [1]}, r"rope_parameters is \[1\]; expected an object"),
        ({"vocab_size": 2**70}, r"vocab_size is 1180591620717411303424; expected an integer in"),
        ({"vocab_size": 128.0}, r"vocab_size is 128.0; expected an integer"),
        ({"vocab_size": "128"}, r'vocab_size is "128"; expected an integer'),
        ({"vocab_size": True}, r"vocab_size is true; expected an integer"),
        ({"vocab_size": None}, r"vocab_size is null; expected an integer"),
        ({"vocab_size": DELETE}, r"missing required key vocab_size \(expected an integer"),
        ({"hidden_size": 2**21}, r"hidden_size is 2097152; expected an integer in \[1, 1048576\]"),
        ({"num_hidden_layers": -3}, "num_hidden_layers is -3"),
        ({"intermediate_size": [96]}, "intermediate_size is"),
        ({"num_key_value_heads": 3}, r"num_attention_heads \(4\) must be a multiple of num_key"),
        ({"num_attention_heads": 3, "num_key_value_heads": 3}, "not divisible by num_attention"),
        ({"head_dim": 15}, r"head_dim \(15\) must be even"),
        ({"head_dim": 0}, "head_dim is 0"),
        ({"max_position_embeddings": 0}, "max_position_embeddings is 0"),
        ({"max_position_embeddings": 2**31}, "max_position_embeddings is 2147483648"),
        ({"tie_word_embeddings": "true"}, 'tie_word_embeddings is "true"; expected true or false'),
        ({"attention_bias": 1}, "attention_bias is 1; expected true or false"),
        ({"rope_theta": 0}, "rope_theta is 0; expected a finite number > 0"),
        ({"rope_theta": "1e4"}, "rope_theta is"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "'yarn' is not supported"),
        ({"rope_scaling": {"rope_type": 3}}, "rope_scaling.rope_type is 3; expected a string"),
        ({"rope_scaling": {"type": "linear"}}, r"missing required key rope_scaling.factor"),
        ({"rope_scaling": {"type": "linear", "factor": 0}}, "rope_scaling.factor is 0"),
        (
            {"rope_scaling": {**LLAMA3_ROPE, "low_freq_factor": None}},
            "rope_scaling.low_freq_factor is null",
        ),
        (
            {"rope_scaling": {**LLAMA3_ROPE, "high_freq_factor": 0.5}},
            r"high_freq_factor \(0.5\) must be > low_freq_factor \(1.0\)",
        ),
        (
            {"rope_scaling": {**LLAMA3_ROPE, "original_max_position_embeddings": 1.5}},
            "original_max_position_embeddings is 1.5",
        ),
        ({"architectures": "LlamaForCausalLM"}, "architectures is"),
        ({"architectures": None, "model_type": ["llama"]}, "model_type is"),
        ({"torch_dtype": 16}, "torch_dtype is 16; expected a string"),
        ({"torch_dtype": "int8"}, "torch_dtype 'int8' is not supported"),
        ({"bos_token_id": -5}, "bos_token_id is -5"),
        ({"eos_token_id": [1, "2"]}, "eos_token_id is"),
        ({"sliding_window": -1}, "sliding_window is -1"),
    ],
)
def test_bad_fields_name_the_field(tmp_path, changes, match):
    with pytest.raises(ValueError, match=match) as exc:
        load_edited(tmp_path, **changes)
    assert "config.json" in str(exc.value)


def test_null_optional_fields_take_defaults(tmp_path):
    mc = load_edited(
        tmp_path,
        num_key_value_heads=None,
        head_dim=None,
        rms_norm_eps=None,
        max_position_embeddings=None,
        rope_theta=None,
        rope_scaling=None,
        tie_word_embeddings=None,
        bos_token_id=None,
        eos_token_id=None,
    )
    assert mc.num_kv_heads == 4 and mc.head_dim == 16
    assert mc.rms_norm_eps == pytest.approx(1e-6)
    assert mc.max_position_embeddings == 2048
    assert mc.rope_theta == pytest.approx(10000.0) and mc.rope_scaling.rope_type == "default"
    assert mc.tie_word_embeddings is False and mc.bos_token_id == -1 and mc.eos_token_ids == []


def test_explicit_head_dim_needs_no_divisibility(tmp_path):
    mc = load_edited(tmp_path, hidden_size=60, num_attention_heads=4, head_dim=16)
    assert mc.head_dim == 16


@pytest.mark.parametrize(
    "raw",
    [b"[1, 2]", b"null", b"{", b"\xff\xfe", b"[" * 100000],
    ids=["list", "null", "truncated", "not-utf8", "deep"],
)
def test_config_json_not_an_object(tmp_path, raw):
    (tmp_path / "config.json").write_bytes(raw)
    with pytest.raises(ValueError, match="config.json") as exc:
        lorart.hf.load_config(str(tmp_path))
    assert type(exc.value) is ValueError


def test_strings_that_are_not_utf8(tmp_path):
    # Found by fuzzing: JSON can escape a lone surrogate, which pybind11 cannot pass to C++.
    text = json.dumps(legacy_llama()).replace('"rope_type": "llama3"', '"rope_type": "\\udcff"')
    assert "udcff" in text
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ValueError, match="rope_scaling.rope_type '.udcff' is not supported"):
        lorart.hf.load_config(str(tmp_path))


def test_rope_parameters_without_theta_use_the_top_level_theta(tmp_path):
    mc = load_edited(tmp_path, rope_scaling=DELETE, rope_parameters={**LLAMA3_ROPE})
    assert mc.rope_theta == pytest.approx(500000.0)
    assert_llama3_scaling(mc.rope_scaling)

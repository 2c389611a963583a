"""Shared fixtures: tiny random models and PEFT adapters, built once per session."""

from __future__ import annotations

import signal
import sys
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

# The Ctrl-C tests raise KeyboardInterrupt through _thread.interrupt_main, which does nothing
# while SIGINT is ignored, as it is for a background job of a non-interactive shell.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

from tiny_models import (
    build_causal_lm,
    build_llama,
    make_peft_adapter,
    make_peft_adapter_ext,
    peft_reference,
)


@dataclass
class Adapter:
    dir: Path
    model: object  # peft.PeftModel

    @cached_property
    def ref(self) -> dict:
        """{(module_id, layer): (A, B * scaling)} from PEFT's own modules (float64)."""
        return peft_reference(self.model)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    """Tiny GQA Llama: hidden 64, intermediate 96, 3 layers, 4 heads, 2 KV heads, vocab 128."""
    return build_llama(tmp_path_factory.mktemp("llama"), seed=0)


@pytest.fixture(scope="session")
def llama_mha_dir(tmp_path_factory) -> Path:
    """Same sizes but 4 KV heads, so every projection splits 4 ways under TP."""
    return build_llama(tmp_path_factory.mktemp("llama_mha"), seed=1, num_key_value_heads=4)


@pytest.fixture(scope="session")
def llama_other_dir(tmp_path_factory) -> Path:
    """A model of a different size (hidden 32, intermediate 48), for shape-mismatch errors."""
    return build_llama(
        tmp_path_factory.mktemp("llama_other"),
        seed=2,
        hidden_size=32,
        intermediate_size=48,
        num_attention_heads=2,
        num_key_value_heads=1,
    )


@pytest.fixture(scope="session")
def model_config(llama_dir):
    import lorart

    return lorart.hf.load_config(str(llama_dir))


@pytest.fixture(scope="session")
def mha_model_config(llama_mha_dir):
    import lorart

    return lorart.hf.load_config(str(llama_mha_dir))


@pytest.fixture(scope="session")
def make_adapter(tmp_path_factory):
    """Factory: make_adapter(model_dir, seed=..., **peft LoraConfig kwargs) -> Adapter (cached)."""
    cache: dict = {}

    def factory(model_dir, seed: int = 1234, **lora_kwargs) -> Adapter:
        key = (str(model_dir), seed, repr(sorted(lora_kwargs.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp("adapter")
            model = make_peft_adapter(model_dir, out, seed=seed, **lora_kwargs)
            cache[key] = Adapter(dir=out, model=model)
        return cache[key]

    return factory


@pytest.fixture(scope="session")
def all_proj_adapter(make_adapter, llama_dir) -> Adapter:
    """r=8, alpha=16 on all seven projections of every layer."""
    from tiny_models import ALL_PROJECTIONS

    return make_adapter(llama_dir, r=8, lora_alpha=16, target_modules=ALL_PROJECTIONS)


@pytest.fixture(scope="session")
def ext_llama_dir(tmp_path_factory) -> Path:
    """Untied Llama for adapters with embedding-side parts and DoRA (build_causal_lm weights:
    std 0.1, random norms): GQA 4/2, 3 layers, vocab 128."""
    return build_causal_lm(tmp_path_factory.mktemp("ext_llama"), "llama", seed=20)


@pytest.fixture(scope="session")
def ext_tied_dir(tmp_path_factory) -> Path:
    """Llama with tied embeddings (Llama-3.2 style): 2 layers, vocab 160."""
    return build_causal_lm(
        tmp_path_factory.mktemp("ext_tied"),
        "llama",
        seed=21,
        num_hidden_layers=2,
        vocab_size=160,
        tie_word_embeddings=True,
    )


@pytest.fixture(scope="session")
def make_ext_adapter(tmp_path_factory):
    """Factory: make_ext_adapter(model_dir, seed=..., resize=None, **peft LoraConfig kwargs) ->
    Adapter (cached); see tiny_models.make_peft_adapter_ext."""
    cache: dict = {}

    def factory(model_dir, seed: int = 1234, resize: int | None = None, **lora_kwargs) -> Adapter:
        key = (str(model_dir), seed, resize, repr(sorted(lora_kwargs.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp("ext_adapter")
            model = make_peft_adapter_ext(model_dir, out, seed=seed, resize=resize, **lora_kwargs)
            cache[key] = Adapter(dir=out, model=model)
        return cache[key]

    return factory


# ---------------------------------------------------------------------------------------------
# Checkpoints of each family for the model forward (weights with std 0.1, random norms/biases).

# Sizes every lorart.model.Model in the tests is built with.
MODEL_KW = dict(max_num_tokens=256, num_kv_blocks=96, block_size=16)


@pytest.fixture(scope="session")
def gqa_llama_dir(tmp_path_factory) -> Path:
    """Llama, GQA (4 heads, 2 KV heads), 3 layers, vocab 160."""
    return build_causal_lm(tmp_path_factory.mktemp("gqa_llama"), "llama", seed=10, vocab_size=160)


@pytest.fixture(scope="session")
def llama3_tied_dir(tmp_path_factory) -> Path:
    """Llama with llama3 rope scaling (original context 32, so it matters at short positions) and
    tied embeddings; 2 layers, vocab 256."""
    rope = {
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    }
    return build_causal_lm(
        tmp_path_factory.mktemp("llama3_tied"),
        "llama",
        seed=11,
        num_hidden_layers=2,
        vocab_size=256,
        tie_word_embeddings=True,
        rope_parameters=rope,
    )


@pytest.fixture(scope="session")
def mistral_mqa_dir(tmp_path_factory) -> Path:
    """Mistral, MQA (4 heads, 1 KV head), sliding window 8; 2 layers, vocab 200."""
    return build_causal_lm(
        tmp_path_factory.mktemp("mistral_mqa"),
        "mistral",
        seed=12,
        num_hidden_layers=2,
        num_key_value_heads=1,
        sliding_window=8,
        vocab_size=200,
    )


@pytest.fixture(scope="session")
def qwen2_bias_dir(tmp_path_factory) -> Path:
    """Qwen2 (random, non-zero q/k/v biases), GQA 4/2; 2 layers, vocab 152."""
    return build_causal_lm(
        tmp_path_factory.mktemp("qwen2_bias"), "qwen2", seed=13, num_hidden_layers=2, vocab_size=152
    )


@pytest.fixture(scope="session")
def lorart_model():
    """Factory: lorart_model(model_dir) -> lorart.model.Model, one per checkpoint (MODEL_KW)."""
    cache: dict = {}

    def load(model_dir):
        from lorart.model import Model

        key = str(model_dir)
        if key not in cache:
            cache[key] = Model.from_pretrained(key, **MODEL_KW)
        return cache[key]

    return load


@pytest.fixture(scope="session")
def adapter_slot():
    """Factory: adapter_slot(model, adapter_dir) -> the slot of that PEFT adapter, added once."""
    import lorart

    cache: dict = {}

    def slot(model, adapter_dir) -> int:
        key = (id(model), str(adapter_dir))
        if key not in cache:
            weights, config = lorart.lora.from_peft(str(adapter_dir), model.config)
            cache[key] = model.add_adapter(weights, config)
        return cache[key]

    return slot

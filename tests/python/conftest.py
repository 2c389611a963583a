"""Shared fixtures: tiny random models and PEFT adapters, built once per session."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import (
    build_llama,
    make_peft_adapter,
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

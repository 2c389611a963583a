"""Regenerates the embedded demo assets: a tiny Llama ``config.json`` and a PEFT LoRA adapter.

Run from the repository root (needs torch, transformers, peft; CPU, seconds):
    python python/lorart/assets/make_demo_adapter.py
The adapter has random (seeded) weights on all seven projections, a rank pattern and an alpha
pattern, so ``lorart demo`` exercises every conversion rule. It is written by PEFT itself.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

HERE = Path(__file__).resolve().parent


def main() -> None:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    model = LlamaForCausalLM(config)
    config.save_pretrained(HERE / "tiny_llama")
    peft_config = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
        rank_pattern={"down_proj": 4},
        alpha_pattern={"o_proj": 32},
    )
    peft_model = get_peft_model(model, peft_config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:  # PEFT starts B at zero; give both halves real values
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    peft_model.save_pretrained(HERE / "demo_adapter")


if __name__ == "__main__":
    main()

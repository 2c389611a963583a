"""Tiny random HF models and PEFT adapters for the Python tests.

Everything is built from seeded random weights; nothing is downloaded. torch, transformers and
peft are imported lazily so that modules which only need numpy stay cheap to import.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# HF projection name -> TensorRT-LLM module id (DESIGN.md, "The LoRA tensor format").
# Note gate_proj -> 5 (mlp_h_to_4h) and up_proj -> 7 (mlp_gate), as TensorRT-LLM maps them.
MODULE_IDS = {
    "q_proj": 1,
    "k_proj": 2,
    "v_proj": 3,
    "o_proj": 4,
    "gate_proj": 5,
    "down_proj": 6,
    "up_proj": 7,
}
ALL_PROJECTIONS = list(MODULE_IDS)
COLUMN_MODULES = {1, 2, 3, 5, 7}  # weight split by output features under TP: split B by rows
ROW_MODULES = {4, 6}  # weight split by input features under TP: split A by columns

# The default tiny Llama: GQA (4 query heads, 2 KV heads), head_dim 16.
TINY_LLAMA = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=256,
)

_LAYER_RE = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)$")


@dataclass(frozen=True)
class Dims:
    """Projection sizes of a Llama-family model, derived independently of lorart."""

    hidden: int
    intermediate: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def from_kwargs(cls, kw: dict) -> Dims:
        heads = kw["num_attention_heads"]
        return cls(
            hidden=kw["hidden_size"],
            intermediate=kw["intermediate_size"],
            num_layers=kw["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=kw.get("num_key_value_heads", heads),
            head_dim=kw.get("head_dim") or kw["hidden_size"] // heads,
        )

    def module_dims(self, module_id: int) -> tuple[int, int]:
        """(in_features, out_features) of the projection with this TensorRT-LLM module id."""
        h, i = self.hidden, self.intermediate
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return {
            1: (h, q),
            2: (h, kv),
            3: (h, kv),
            4: (q, h),
            5: (h, i),
            6: (i, h),
            7: (h, i),
        }[module_id]


def build_llama(out_dir: Path, seed: int = 0, **overrides) -> Path:
    """Save a tiny random LlamaForCausalLM (config.json + model.safetensors) to out_dir."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = {**TINY_LLAMA, **overrides}
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**kw))
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    return out_dir


def make_peft_adapter(model_dir, out_dir, seed: int = 1234, std: float = 0.5, **lora_kwargs):
    """Wrap the model in model_dir with a PEFT LoRA, randomize it, save it to out_dir.

    PEFT initialises lora_B to zero, so every lora_A / lora_B parameter is re-drawn from a seeded
    normal distribution (otherwise B*scaling would be all zeros and prove nothing).
    Returns the PeftModel.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    lora_kwargs.setdefault("r", 8)
    lora_kwargs.setdefault("lora_alpha", 16)
    peft_model = get_peft_model(model, LoraConfig(**lora_kwargs))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(peft_model.named_parameters()):
            if "lora_" in name:
                torch.nn.init.normal_(param, 0.0, std, generator=gen)
    peft_model.save_pretrained(str(out_dir))
    return peft_model


def make_peft_adapter_ext(
    model_dir, out_dir, seed: int = 1234, resize: int | None = None, std: float = 0.1, **lora_kwargs
):
    """make_peft_adapter for adapters with embedding-side parts and DoRA.

    The base is first resized to ``resize`` tokens (``resize_token_embeddings``, as a vocabulary
    extension is trained); every lora_A/B, lora_embedding_A/B and modules_to_save parameter is
    re-drawn from a seeded normal distribution, and DoRA magnitudes are scaled by 1 + 0.3 U(0, 1)
    (PEFT starts them at the weight norms, where DoRA equals LoRA). Parameters PEFT ties
    (``ensure_weight_tying``) are one parameter and stay tied. Returns the PeftModel (eval).
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=torch.float32, attn_implementation="eager"
    )
    if resize is not None:
        model.resize_token_embeddings(resize)
    peft_model = get_peft_model(model, LoraConfig(**lora_kwargs))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(peft_model.named_parameters()):
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.3 * torch.rand(param.shape, generator=gen))
            elif "lora_" in name or "modules_to_save" in name:
                torch.nn.init.normal_(param, 0.0, std, generator=gen)
    peft_model.save_pretrained(str(out_dir))
    return peft_model.eval()


def peft_reference(peft_model) -> dict[tuple[int, int], tuple[np.ndarray, np.ndarray]]:
    """{(module_id, layer_idx): (A [r, Hi], B * scaling [Ho, r])} read from PEFT's own modules."""
    ref = {}
    for name, module in peft_model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if lora_a is None or "default" not in lora_a:
            continue
        m = _LAYER_RE.search(name)
        assert m is not None, name
        layer, proj = int(m.group(1)), m.group(2)
        a = module.lora_A["default"].weight.detach().double().numpy()
        b = module.lora_B["default"].weight.detach().double().numpy()
        scaling = float(module.scaling["default"])
        ref[(MODULE_IDS[proj], layer)] = (a, b * scaling)
    assert ref, "the PEFT model has no LoRA layers"
    return ref


def peft_scalings(peft_model) -> dict[tuple[int, int], float]:
    """{(module_id, layer_idx): PEFT's scaling} for every LoRA layer."""
    out = {}
    for name, module in peft_model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if lora_a is None or "default" not in lora_a:
            continue
        m = _LAYER_RE.search(name)
        out[(MODULE_IDS[m.group(2)], int(m.group(1)))] = float(module.scaling["default"])
    return out


def parse_rows(
    w: np.ndarray, c: np.ndarray, dims_of
) -> list[tuple[int, int, np.ndarray, np.ndarray]]:
    """Split LoraWeights rows by hand (independently of lorart.lora.unpack).

    dims_of(module_id) -> (Hi, Ho) of the stored A [r, Hi] and B [Ho, r].
    Returns [(module_id, layer, A, B)] in row order, and asserts the padding is zero.
    """
    assert w.ndim == 2 and c.ndim == 2 and c.shape[1] == 3
    assert w.shape[0] == c.shape[0]
    out = []
    for row, (mid, layer, r) in zip(w, c, strict=True):
        hi, ho = dims_of(int(mid))
        na, nb = int(r) * hi, ho * int(r)
        assert na + nb <= row.shape[0]
        a = row[:na].reshape(int(r), hi)
        b = row[na : na + nb].reshape(ho, int(r))
        pad = row[na + nb :]
        assert np.all(pad.astype(np.float32) == 0), f"nonzero padding in row {(mid, layer, r)}"
        out.append((int(mid), int(layer), a, b))
    return out


# ---------------------------------------------------------------------------------------------
# Checkpoints of every supported family, for comparing the model forward with transformers.

_FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
}


def build_causal_lm(out_dir: Path, family: str = "llama", seed: int = 0, **overrides) -> Path:
    """Save a tiny random checkpoint of a Llama-family model (float32) to out_dir.

    Unlike build_llama, the weights are drawn with std ``initializer_range`` (default 0.1, not
    HF's 0.02) so that attention is far from uniform and positions, rope scaling and masks change
    the logits by far more than the tolerances; RMSNorm weights (HF: all ones) and attention
    biases (HF: zeros) are randomized so that a runtime which skips them is caught. No BOS/EOS
    ids, so greedy generation never stops early.
    """
    import torch
    import transformers

    config_cls, model_cls = (getattr(transformers, n) for n in _FAMILIES[family])
    kw = {
        **TINY_LLAMA,
        "initializer_range": 0.1,
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
        **overrides,
    }
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kw))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=gen))
            elif name.endswith(".bias"):
                param.copy_(0.3 * torch.randn(param.shape, generator=gen))
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    return out_dir


def load_hf(model_dir, dtype: str = "float32"):
    """The saved checkpoint as a transformers model in eval mode (eager attention)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=getattr(torch, dtype), attn_implementation="eager"
    )
    return model.eval()


def hf_logits(model, token_ids) -> np.ndarray:
    """[len(token_ids), vocab] logits of one sequence (float64 numpy, whatever the model dtype)."""
    import torch

    with torch.no_grad():
        out = model(torch.tensor([list(token_ids)], dtype=torch.long)).logits
    return out[0].double().numpy()


def hf_greedy(model, prompt, max_new_tokens: int) -> tuple[list[int], float]:
    """Greedy tokens by full recomputation (no KV cache) and the smallest top-1/top-2 gap seen."""
    ids = list(prompt)
    out, min_gap = [], float("inf")
    for _ in range(max_new_tokens):
        last = hf_logits(model, ids)[-1]
        top2 = np.sort(last)[-2:]
        min_gap = min(min_gap, float(top2[1] - top2[0]))
        tok = int(np.argmax(last))
        out.append(tok)
        ids.append(tok)
    return out, min_gap


def bits(a: np.ndarray) -> np.ndarray:
    """Bit pattern of an array, so that bfloat16/float16 compare exactly."""
    return np.ascontiguousarray(a).view(np.dtype(f"u{a.dtype.itemsize}"))


def run_lorart_cli(*args: str, exe: str | None = None) -> subprocess.CompletedProcess:
    """``python -m lorart ARGS`` (or the installed ``exe``), output captured, never raising."""
    cmd = [exe] if exe else [sys.executable, "-m", "lorart"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=120, check=False)


def endless_demo_model(out_dir: Path, max_position_embeddings: int = 4096) -> Path:
    """The shipped demo model with no end token and a long context, so that a greedy run goes
    on for as many tokens as asked (seconds of work for signal and cancellation tests)."""
    import json
    import shutil

    from lorart import demo

    out_dir = Path(out_dir)
    shutil.copytree(demo.DEMO / "model", out_dir, dirs_exist_ok=True)
    config = json.loads((out_dir / "config.json").read_text())
    config.update(max_position_embeddings=max_position_embeddings, eos_token_id=None)
    (out_dir / "config.json").write_text(json.dumps(config))
    (out_dir / "generation_config.json").unlink()
    return out_dir


def adapter_with_own_tokenizer(adapter_dir: Path, out_dir: Path, chat_template: str = "") -> Path:
    """A copy of ``adapter_dir`` with a ``tokenizer.json`` of its own: the demo model's vocabulary
    (so it runs where adapter vocabularies cannot grow), but no ``<s>`` in front of a prompt and
    ``_`` for a word boundary when decoding, so which tokenizer ran shows in the ids and the
    text. ``chat_template``: also a ``tokenizer_config.json`` with it."""
    import json
    import shutil

    from tokenizers import Tokenizer, decoders, processors

    from lorart import demo

    out_dir = Path(out_dir)
    shutil.copytree(adapter_dir, out_dir)
    tok = Tokenizer.from_file(str(demo.DEMO / "model" / "tokenizer.json"))
    tok.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", "_"), decoders.ByteFallback(), decoders.Fuse()]
    )
    tok.save(str(out_dir / "tokenizer.json"))
    if chat_template:
        config = {"chat_template": chat_template, "bos_token": "", "eos_token": "</s>"}
        (out_dir / "tokenizer_config.json").write_text(json.dumps(config))
    return out_dir

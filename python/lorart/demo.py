"""``lorart demo``: the seed tutorial's multi-LoRA table, offline on a CPU in seconds.

The tiny Llama, its tokenizer and three PEFT adapters ship inside the package
(``lorart/assets/demo``, made by ``assets/train_demo.py``). The base model answers capital
questions in English; ``lora_zh`` answers in Chinese; ``lora_ja`` answers Japanese questions in
Japanese. As in the tutorial, the same Chinese and Japanese question run three times each with
task uids ``-1 0 1 -1 0 1``, all in one mixed batch. In the same batch, a seventh row (task uid
2) is the seed's other kind of adapter, chinese-llama-2-lora-13b's: ``lora_ko`` brings its own
tokenizer (the base vocabulary plus Korean words) and its own ``embed_tokens`` and ``lm_head``
over that vocabulary, and answers a Korean question in Korean with token ids only it has.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from lorart import hf
from lorart._core import KvCacheConfig
from lorart.cli import print_table, timing_line
from lorart.llm import LLM

logger = logging.getLogger(__name__)

DEMO = Path(__file__).resolve().parent / "assets" / "demo"
# The tutorial's prompts, with its literal backslash-n (run.py receives "\n" unexpanded).
ZH_PROMPT = "美国的首都在哪里? \\n答案:"
JA_PROMPT = "アメリカ合衆国の首都はどこですか? \\n答え:"
KO_PROMPT = "미국의 수도는 어디입니까? \\n답:"


def run(max_output_len: int = 12, num_threads: int | None = None) -> int:
    """Print the table; return 0. ``num_threads``: CPU threads (None: the available CPUs)."""
    lora_dirs = [DEMO / "lora_zh", DEMO / "lora_ja", DEMO / "lora_ko"]
    texts = [ZH_PROMPT] * 3 + [JA_PROMPT] * 3 + [KO_PROMPT]
    adapters = [None, *lora_dirs[:2]] * 2 + [lora_dirs[2]]  # task uids -1 0 1 -1 0 1 2
    start = time.monotonic()
    with LLM(
        DEMO / "model",
        num_threads=num_threads,
        lora_dirs=lora_dirs,
        max_batch_size=8,
        max_num_tokens=512,
        max_seq_len=hf.load_config(DEMO / "model").max_position_embeddings,
        kv_cache=KvCacheConfig(block_size=16, max_tokens=2048),
    ) as llm:
        load_seconds = time.monotonic() - start
        start = time.monotonic()
        outputs = llm.generate(texts, lora=adapters, max_new_tokens=max_output_len)
        print_table(llm, outputs)
        logger.info("%s", timing_line(load_seconds, time.monotonic() - start, outputs))
    return 0
